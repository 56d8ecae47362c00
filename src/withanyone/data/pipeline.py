"""``build_dataset``: photo collections → MultiID-2M layout, as resumable Ray Data stages.

Stages: ingest (driver lists inputs) → faces (Ray Data actors, one unit of photos per row, each unit
written atomically and recorded in a manifest) → reference bank (driver; only embeddings of
single-person photos are held) → cluster centres, ``identities.json``, negative pool, reference shards →
assignment + filters + splits + shard writing (Ray Data actors, one shard per unit and split) → report.

Output (``out/``)::

    train_rec/<unit>.tar   train_cp/<unit>.tar   ref/tars/ref-<k>.tar   ref/cluster_centers.tar
    identities.json        negatives.safetensors report.json  report_*.png   _work/ (manifests, per-unit records)

Kill at any point and rerun with the same arguments: finished units are skipped, unfinished ones are
redone, shards appear only by atomic rename, so the output equals an uninterrupted run's. Inputs are
fingerprinted by content (size + mtime as a fast path, sha256 to confirm): a unit holding a photo replaced
under the same name has its faces redone, and every later stage follows the new content.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io import FileDigests
from ..progress import track
from .assign import Assignment, CenterIndex, Thresholds, thresholds_for
from .bank import BankMember, ReferenceBank, build_bank
from .faces_stage import FaceUnitWorker, PhotoRecord, read_unit, unit_path, write_unit_inputs
from .filters import FilterConfig, filter_photo, is_single_person, optional_models
from .ingest import (
    DEFAULT_NO_NAME_FOLDERS,
    InputItem,
    content_fingerprints,
    image_extension,
    ingest,
    read_item_bytes,
)
from .manifest import UnitManifest, check_settings, fingerprint, make_units
from .report import assigned_unit_path, summarize
from .shards import (
    image_label,
    json_bytes,
    npy_bytes,
    remove_stale_temporaries,
    write_cluster_centers,
    write_identities,
    write_negative_pool,
    write_shard,
)
from .splits import in_train_cp, reference_counts

log = logging.getLogger(__name__)

#: Object store size for a local Ray (small: rows are unit descriptors and summaries, not images).
LOCAL_OBJECT_STORE_BYTES = 400 * 1024 * 1024
#: Identities per reference shard.
REF_IDENTITIES_PER_SHARD = 64


@dataclass
class BuildResult:
    """What a build produced: output folder, counts and the report dict."""

    out: Path
    photos: int
    identities: int
    train_rec: int
    train_cp: int
    report: dict[str, Any] = field(default_factory=dict)


def build_dataset(inputs: Sequence[str | Path], out: str | Path, *, backend: str = "dlib",
                  backend_options: dict[str, Any] | None = None, workers: int = 1, address: str | None = None,
                  unit_size: int = 16, min_photos: int = 2, negatives_per_identity: int = 16,
                  filters: FilterConfig | None = None, thresholds: Thresholds | None = None,
                  no_name_folders: Sequence[str] = DEFAULT_NO_NAME_FOLDERS, fetch: bool = False,
                  progress: bool = True, overwrite: bool = False) -> BuildResult:
    """Build MultiID-2M-layout data from ``inputs`` into ``out`` (see the module docstring).

    ``workers`` Ray actors run the face and write stages (a local Ray with that many CPUs is started unless
    Ray is already initialised or ``address`` names a cluster). ``unit_size`` photos form one unit of work
    and one shard per split. Rerunning with the same arguments resumes; other arguments on an existing
    ``out`` raise :class:`~withanyone.data.errors.ConfigMismatchError` unless ``overwrite``.
    """
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    out = Path(out)
    work = out / "_work"
    filters = filters or FilterConfig()
    spec = {"backend": backend, **(backend_options or {})}
    check_backend(spec)
    th = thresholds or thresholds_for(backend, _same_person_threshold(spec))
    items = ingest(inputs, no_name_folders)
    settings = {"backend": spec, "unit_size": unit_size, "min_photos": min_photos,
                "negatives_per_identity": negatives_per_identity, "filters": asdict(filters),
                "thresholds": th.to_dict(), "fetch": fetch}
    if overwrite and out.exists():
        for sub in ("_work", "train_rec", "train_cp", "ref"):
            shutil.rmtree(out / sub, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    settings_fp = check_settings(work, settings, [it.to_dict() for it in items], overwrite)
    digests = FileDigests(work / "inputs.digests.json")
    content = content_fingerprints(items, digests)
    digests.save()
    changed = _changed_inputs(work, items, content)
    if changed:
        log.info("%d input(s) changed content since the last run; their units are redone", len(changed))
    removed = remove_stale_temporaries(out)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)
    units = make_units(len(items), unit_size)

    started = _ensure_ray(address, workers)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    try:
        unit_content = [fingerprint([content[i] for i in idx]) for idx in units]
        _faces_stage(items, units, work, spec, settings_fp, workers, fetch, progress, unit_content)
        lap("faces_s")
        bank = _bank_stage(units, work, filters, th, min_photos)
        lap("bank_s")
        bank_fp = fingerprint({"settings": settings_fp, "content": fingerprint(content), "table": bank.table(),
                               "centers": bank.centers().round(6).tolist(),
                               "members": [[m.photo for m in p.members] for p in bank.identities]})
        _write_bank(out, work, bank, bank_fp, negatives_per_identity, backend, progress, fetch)
        lap("references_s")
        _write_stage(units, out, work, bank, bank_fp, th, filters, workers, progress, fetch, backend)
        lap("write_s")
    finally:
        if started:
            from ..raysession import shutdown_ray

            shutdown_ray()
    report = summarize(out, bank.table(), {
        "backend": backend, "thresholds": th.to_dict(), "filters": asdict(filters), "units": len(units),
        "optional_stages": optional_models(), "names_dropped": bank.dropped, "names_merged": bank.merged,
        "bank_outliers": bank.outliers, "timings": timings, "workers": workers, "inputs_changed": changed})
    return BuildResult(out, report["photos"], report["identities"], report["train_rec"], report["train_cp"], report)


def check_backend(spec: dict) -> None:
    """Fail before Ray starts when the face backend is unknown or its model pack cannot be found."""
    from ..errors import ModelNotFoundError, one_line
    from ..faces.analyzer import BACKENDS
    from .errors import DatasetError

    name = spec["backend"]
    if name == "dlib":
        return
    if name not in (*BACKENDS, "onnx", "antelopev2", "buffalo_l"):
        raise DatasetError(f"--backend {name}: unknown face backend; choose one of {', '.join(BACKENDS)}")
    from ..faces.packs import find_pack
    from ..hub import hub_offline

    pack = spec.get("pack") or (name if name in ("antelopev2", "buffalo_l") else "antelopev2")
    try:
        find_pack(pack, hub=not hub_offline())
    except ModelNotFoundError as exc:
        raise DatasetError(f"--backend {name}: {one_line(str(exc))}") from exc


def _changed_inputs(work: Path, items: list[InputItem], content: list[str | None]) -> list[str]:
    """Sources whose content fingerprint differs from the last run's (recorded in ``_work``), then record these."""
    path = work / "inputs.content.json"
    old: dict[str, str | None] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = {}
    now = {it.source: c for it, c in zip(items, content, strict=True)}
    changed = [src for src, c in now.items() if src in old and old[src] != c]
    from ..io import atomic_write_json

    atomic_write_json(path, now)
    return changed


def _same_person_threshold(spec: dict) -> float | None:
    if spec["backend"] in ("dlib", "insightface", "onnx", "antelopev2", "buffalo_l"):
        return None
    from ..faces import FaceAnalyzer

    opts = dict(spec)
    return FaceAnalyzer(opts.pop("backend"), **opts).threshold


def _ensure_ray(address: str | None, workers: int) -> bool:
    """Start Ray unless running already; returns whether we started it (and must shut it down)."""
    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        _quiet_ray_data()
        return False
    if address:
        import withanyone

        ray.init(address=address, log_to_driver=False,
                 runtime_env={"py_modules": [str(Path(withanyone.__file__).parent)]})
    else:
        from ..raysession import start_local_ray

        start_local_ray(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                        object_store_memory=LOCAL_OBJECT_STORE_BYTES, logging_level=logging.WARNING)
    _quiet_ray_data()
    return True


def _quiet_ray_data() -> None:
    """Our own rich bars replace Ray Data's; its INFO/WARNING chatter (progress-bar notices) is hidden."""
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def _faces_stage(items: list[InputItem], units: list[range], work: Path, spec: dict, key: str, workers: int,
                 fetch: bool, progress: bool, unit_content: list[str]) -> None:
    import ray.data

    manifest = UnitManifest(work / "faces.manifest.jsonl", key)
    done = {u for u, r in manifest.records().items()
            if u < len(units) and r.get("content") == unit_content[u] and unit_path(work, u).exists()}
    pending = [u for u in range(len(units)) if u not in done]
    if not pending:
        return
    write_unit_inputs(work, items, units)
    rows = [{"unit": u} for u in pending]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        FaceUnitWorker, fn_constructor_kwargs={"backend_spec": spec, "work": str(work), "fetch": fetch},
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
    for row in track(ds.iter_rows(), total=len(pending), description="faces", enabled=progress):
        manifest.mark(int(row["unit"]), photos=int(row["photos"]), faces=int(row["faces"]),
                      errors=int(row["errors"]), t0=float(row["t0"]), t1=float(row["t1"]), pid=int(row["pid"]),
                      content=unit_content[int(row["unit"])])


def _bank_stage(units: list[range], work: Path, filters: FilterConfig, th: Thresholds,
                min_photos: int) -> ReferenceBank:
    candidates: dict[str, list[BankMember]] = {}
    for u in range(len(units)):
        for ph in read_unit(unit_path(work, u)):
            res = filter_photo(ph, filters)
            if is_single_person(ph, res):
                f = ph.faces[res.kept[0]]
                candidates.setdefault(ph.item.search_name, []).append(
                    BankMember(ph.index, res.kept[0], f.embedding_array(), ph.item.source, item=ph.item,
                               embedding_norm=f.embedding_norm))
    return build_bank(candidates, th.member, th.merge, min_photos)


def _write_bank(out: Path, work: Path, bank: ReferenceBank, bank_fp: str, k: int, backend: str,
                progress: bool, fetch: bool) -> None:
    """identities.json, cluster centres, negative pool (small; rewritten each run) and reference shards."""
    write_identities(out / "identities.json", bank.table())
    centers = bank.centers()
    write_cluster_centers(out / "ref" / "cluster_centers.tar", bank.ids, centers)
    pools = []
    for ident in bank.identities:
        best = sorted(ident.members, key=lambda m: (-m.similarity, m.photo))[:k]
        pools.append(np.stack([m.embedding for m in best]))
    write_negative_pool(out / "negatives.safetensors", bank.ids, pools, backend)
    chunks = [bank.identities[i:i + REF_IDENTITIES_PER_SHARD]
              for i in range(0, len(bank.identities), REF_IDENTITIES_PER_SHARD)]
    manifest = UnitManifest(work / "ref.manifest.jsonl", bank_fp)
    done = manifest.done()
    names = {f"ref-{c:05d}.tar" for c in range(len(chunks))}
    for stale in (out / "ref" / "tars").glob("ref-*.tar"):
        if stale.name not in names:
            stale.unlink()
    todo = [c for c in range(len(chunks)) if c not in done]
    for c in track(todo, total=len(todo), description="references", enabled=progress):
        path = out / "ref" / "tars" / f"ref-{c:05d}.tar"
        n = write_shard(path, _reference_samples(chunks[c], fetch))
        manifest.mark(c, samples=n)


def _reference_samples(identities: list, fetch: bool):
    for ident in identities:
        for m in sorted(ident.members, key=lambda m: m.photo):
            try:
                data = read_item_bytes(m.item or _item_for_source(m.source), fetch=fetch)
            except (OSError, ValueError) as exc:
                log.warning("reference %s unreadable now (%s); skipped", m.source, exc)
                continue
            yield {"__key__": f"{ident.id}__{m.photo:08d}", image_extension(data): data,
                   "npy": npy_bytes({"embeddings": (m.embedding * m.embedding_norm).reshape(1, -1).astype(np.float32),
                                     "name": ident.id}),
                   "json": json_bytes({"url": m.source, "name": ident.id, "similarity": round(m.similarity, 6)})}


def _item_for_source(source: str) -> InputItem:
    if "#" in source and Path(source.split("#", 1)[0]).suffix.lower() == ".tar":
        import tarfile

        tar, member = source.split("#", 1)
        with tarfile.open(tar, "r:") as tf:
            m = tf.getmember(member)
            return InputItem(source, tar=tar, offset=m.offset_data, length=m.size)
    return InputItem(source)


class UnitWriter:
    """Ray Data callable class for the write stage: filters, assignment and shards for one unit per row."""

    def __init__(self, out: str, ids: list[str], centers: list[list[float]], thresholds: dict,
                 filters: dict, bank_sizes: dict[str, int], own_refs: dict[str, dict[int, int]], fetch: bool,
                 backend: str):
        self.out = Path(out)
        self.work = self.out / "_work"
        th = Thresholds(**thresholds)
        c = np.asarray(centers, dtype=np.float32).reshape(len(ids), -1) if ids else np.zeros((0, 0), np.float32)
        self.index = CenterIndex(ids, c, th)
        self.filters = FilterConfig(**filters)
        self.bank_sizes = bank_sizes
        self.own_refs = {k: {int(p): n for p, n in v.items()} for k, v in own_refs.items()}
        self.fetch = fetch
        self.backend = backend

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"unit": [], "rec": [], "cp": []}
        for unit in batch["unit"]:
            rec, cp = write_unit_shards(int(unit), self.out, self.index, self.filters, self.bank_sizes,
                                        self.own_refs, self.fetch, self.backend)
            out["unit"].append(int(unit))
            out["rec"].append(rec)
            out["cp"].append(cp)
        return out


def write_unit_shards(unit: int, out: Path, index: CenterIndex, filters: FilterConfig, bank_sizes: dict[str, int],
                      own_refs: dict[str, dict[int, int]], fetch: bool = False, backend: str = "") -> tuple[int, int]:
    """Filter, assign and write one unit's ``train_rec``/``train_cp`` shards and its outcome record."""
    work = out / "_work"
    rec_samples, cp_samples, outcomes = [], [], []
    for ph in read_unit(unit_path(work, unit)):
        res = filter_photo(ph, filters)
        kept = [ph.faces[i] for i in res.kept]
        # faces of rejected photos are assigned too (for the report); only kept photos reach the shards
        assigned: list[Assignment] = index.assign(np.stack([f.embedding_array() for f in kept])) if kept else []
        names = [a.id for a in assigned]
        reason, error = res.reason, ph.error
        data = b""
        if reason is None:
            try:
                data = read_item_bytes(ph.item, fetch=fetch)
            except (OSError, ValueError) as exc:
                reason, error = "unreadable", f"{type(exc).__name__}: {exc}"
        cp = reason is None and in_train_cp(ph.index, names, bank_sizes, own_refs)
        outcomes.append(_outcome(ph, res.small, reason, error, kept, assigned, reason is None, cp))
        if reason is not None:
            continue
        sample = {"__key__": ph.key, image_extension(data): data, "json": json_bytes(_label(ph, kept, assigned, backend))}
        rec_samples.append(sample)
        if cp:
            cp_samples.append(sample)
    name = f"{unit:06d}.tar"
    _write_or_remove(out / "train_rec" / name, rec_samples)
    _write_or_remove(out / "train_cp" / name, cp_samples)
    from ..io import atomic_write_text

    atomic_write_text(assigned_unit_path(work, unit), json.dumps(outcomes) + "\n")
    return len(rec_samples), len(cp_samples)


def _write_or_remove(path: Path, samples: list[dict]) -> None:
    if samples:
        write_shard(path, samples)
    else:
        path.unlink(missing_ok=True)


def _label(ph: PhotoRecord, kept: list, assigned: list[Assignment], backend: str) -> dict[str, Any]:
    return image_label(
        ph.item.source, [f.bbox for f in kept], [a.id for a in assigned], [f.raw_embedding() for f in kept],
        caption=ph.item.caption, search_name=ph.item.search_name, size=list(ph.size),
        landmarks=[f.landmarks for f in kept], det_scores=[round(f.score, 4) for f in kept],
        id_scores=[round(a.score, 6) for a in assigned], face_sizes=[round(f.size, 2) for f in kept],
        sharpness=[round(f.sharpness, 2) for f in kept], frontal=[f.frontal for f in kept], backend=backend)


def _outcome(ph: PhotoRecord, small: int, reason: str | None, error: str | None, kept: list,
             assigned: list[Assignment], rec: bool, cp: bool) -> dict[str, Any]:
    faces = []
    for k, f in enumerate(kept):
        a = assigned[k] if k < len(assigned) else None
        faces.append({"bbox": f.bbox, "name": a.id if a else None,
                      "score": a.score if a else float("nan"), "runner_up": a.runner_up if a else -1.0,
                      "unknown": a.reason if a else reason, "size": f.size, "sharpness": f.sharpness,
                      "frontal": f.frontal})
    return {"index": ph.index, "source": ph.item.source, "search_name": ph.item.search_name,
            "size": list(ph.size), "detected": len(ph.faces), "small_faces": small, "reason": reason,
            "error": error, "train_rec": rec, "train_cp": cp, "faces": faces}


def _write_stage(units: list[range], out: Path, work: Path, bank: ReferenceBank, bank_fp: str, th: Thresholds,
                 filters: FilterConfig, workers: int, progress: bool, fetch: bool, backend: str) -> None:
    import ray.data

    manifest = UnitManifest(work / "write.manifest.jsonl", bank_fp)
    done = {u for u in manifest.done() if assigned_unit_path(work, u).exists()}
    pending = [u for u in range(len(units)) if u not in done]
    if not pending:
        return
    own = reference_counts(bank)
    kwargs = {"out": str(out), "ids": bank.ids, "centers": bank.centers().tolist(), "thresholds": th.to_dict(),
              "filters": asdict(filters), "bank_sizes": {p.id: len(p.members) for p in bank.identities},
              "own_refs": {k: {str(p): n for p, n in v.items()} for k, v in own.items()},
              "fetch": fetch, "backend": backend}
    ds = ray.data.from_items([{"unit": u} for u in pending], override_num_blocks=len(pending)).map_batches(
        UnitWriter, fn_constructor_kwargs=kwargs, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1)
    for row in track(ds.iter_rows(), total=len(pending), description="shards", enabled=progress):
        manifest.mark(int(row["unit"]), rec=int(row["rec"]), cp=int(row["cp"]))
