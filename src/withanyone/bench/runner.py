"""Resumable benchmark runner: score every (sample, method, face model) once, append results as JSONL.

One row per sample × method × face model goes to ``<out>/results.jsonl`` the moment it is computed; a run
started again over the same folder reuses a row only when every input of it is unchanged — the content of
the output image, the GT and the references, the sample's metadata, the face model and the metric settings
(:func:`row_inputs`, stored in the row) — and rescores the others, saying why. So a killed run continues and
ends with the same numbers as an uninterrupted one, and a regenerated output is never reported stale. Faces come from the content-hash :class:`EmbeddingCache` kept in
``<out>/cache/``. A sample that cannot be scored is recorded with its reason — the run never aborts.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io import FileDigests, append_jsonl, atomic_write_json, read_jsonl
from .cache import REF_PAD, CachedFaces, EmbeddingCache, repair_jsonl
from .metrics import PAPER_CP_GATE, score_faces
from .samples import Benchmark, MethodOutputs, Sample
from .taxonomy import missing_data

RESULTS = "results.jsonl"
RUN_CONFIG = "run.json"


@dataclass
class FaceModelSpec:
    """A face model to score with: backend name, its options, and its CP gate on Sim(GT) (one, several).

    ``gate`` None means the default: the paper's (0.40, 0.35) for ArcFace-type backends, and the backend's
    own same-person threshold for dlib (whose cosines are compressed: same ≥ 0.93, different ≤ 0.92).
    """

    backend: str = "dlib"
    options: dict[str, Any] = field(default_factory=dict)
    gate: tuple[float, float] | None = None
    label: str = ""

    @classmethod
    def parse(cls, text: str) -> FaceModelSpec:
        """``"dlib"``, ``"insightface:pack=antelopev2"``, ``"dlib:gate=0.9/0.9,detector=cnn,label=dlib-cnn"``."""
        backend, _, rest = text.partition(":")
        opts: dict[str, Any] = {}
        gate = None
        label = ""
        for item in filter(None, rest.split(",")):
            k, sep, v = item.partition("=")
            if not sep:
                raise ValueError(f"face model option {item!r} in {text!r} is not key=value")
            if k == "gate":
                a, _, b = v.partition("/")
                gate = (float(a), float(b or a))
                continue
            if k == "label":
                label = v
                continue
            try:
                opts[k] = json.loads(v)
            except json.JSONDecodeError:
                opts[k] = v
        return cls(backend.strip(), opts, gate, label)


def check_face_model_spec(text: str | FaceModelSpec) -> FaceModelSpec:
    """Parse a ``-f`` spec and check its backend is known, before anything loads; ValueError naming it."""
    from ..faces.analyzer import BACKENDS

    spec = FaceModelSpec.parse(text) if isinstance(text, str) else text
    if spec.backend not in (*BACKENDS, "onnx", "antelopev2", "buffalo_l"):
        raise ValueError(f"unknown face backend {spec.backend!r}; choose one of {', '.join(BACKENDS)}")
    return spec


def default_gate(analyzer: Any) -> tuple[float, float]:
    """The CP gate for a face model: the paper's (0.40, 0.35) for ArcFace-type embeddings, the backend's
    same-person threshold for dlib (the paper's thresholds are tuned for ArcFace cosines)."""
    if analyzer.backend_name == "dlib":
        t = float(analyzer.threshold)
        return (t, t)
    return PAPER_CP_GATE


@dataclass
class FaceModel:
    """A loaded face model: its analyzer, cache and gate."""

    name: str
    analyzer: Any
    cache: EmbeddingCache
    gate: tuple[float, float]


def load_face_models(specs: Sequence[str | FaceModelSpec], cache_dir: Path | None) -> list[FaceModel]:
    """Build analyzers + caches for the given specs (``"dlib"`` etc.)."""
    from ..faces import FaceAnalyzer

    models: list[FaceModel] = []
    for spec in specs:
        spec = FaceModelSpec.parse(spec) if isinstance(spec, str) else spec
        analyzer = FaceAnalyzer(spec.backend, **spec.options)
        cache = EmbeddingCache(analyzer, cache_dir)
        name = spec.label or cache.key.split("-")[0]
        if any(m.name == name for m in models):
            name = cache.key
        models.append(FaceModel(name, analyzer, cache, spec.gate or default_gate(analyzer)))
    return models


@dataclass
class RunStats:
    """What a run did: rows written / reused (skipped) / rescored because an input changed (and why), model
    calls and cache use per face model, time."""

    rows_written: int = 0
    rows_skipped: int = 0
    rows_rescored: int = 0
    #: rows of this run (scored now or reused) that could not be scored (:func:`unscorable`), per reason
    rows_failed: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)
    rescore_reasons: dict[str, int] = field(default_factory=dict)
    images_seen: int = 0
    seconds: float = 0.0
    calls: dict[str, dict[str, int]] = field(default_factory=dict)
    cache: dict[str, dict[str, int]] = field(default_factory=dict)


def _row_key(row: dict[str, Any]) -> tuple[str, str, str]:
    return str(row["sample"]), str(row["method"]), str(row["face_model"])


#: Why a stored row is rescored, per input that changed (see :func:`row_inputs`).
INPUT_CHANGES = {"output": "output image changed", "gt": "GT changed", "references": "references changed",
                 "sample": "sample metadata changed", "face_model": "face model changed",
                 "settings": "metric settings changed"}


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def metric_settings(model: FaceModel, image_metrics: Sequence[Any] = (), cp_normalisation: str = "release") -> str:
    """Fingerprint of the settings a row's numbers depend on besides its images: the CP gate and normalisation,
    the reference padding and each image metric with its model (or that it was not computed)."""
    return _short_hash({"gate": list(model.gate), "ref_pad": REF_PAD, "cp_normalisation": cp_normalisation,
                        "metrics": {im.name: getattr(im, "model_name", None) if im.available else None
                                    for im in image_metrics}})


def row_inputs(sample: Sample, method: MethodOutputs, model: FaceModel, digests: FileDigests,
               settings: str) -> dict[str, Any]:
    """Content fingerprints of every input of one row: output, GT and reference bytes (None = missing),
    the sample's metadata, the face model (backend and options) and the metric ``settings``."""
    path = method.outputs.get(sample.id)
    return {
        "output": digests.digest(path) if path is not None else None,
        "gt": digests.digest(sample.gt) if sample.gt is not None else None,
        "references": [digests.digest(r) for r in sample.references],
        "sample": sample_fingerprint(sample.prompt, sample.num_persons, sample.subset),
        "face_model": model.cache.key,
        "settings": settings,
    }


def changed_inputs(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Why a stored row with inputs ``old`` is stale for ``new`` (empty when it can be reused)."""
    if not isinstance(old, dict):
        return ["no input fingerprint (row written by an older version)"]
    return [INPUT_CHANGES.get(k, f"{k} changed") for k in new if old.get(k) != new[k]]


def load_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of ``<out>/results.jsonl``, one per (sample, method, face model) — the last one wins — sorted."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in read_jsonl(Path(out_dir) / RESULTS):
        if "sample" in row and "method" in row and "face_model" in row:
            rows[_row_key(row)] = row
    return [rows[k] for k in sorted(rows)]


def unscorable(row: dict[str, Any]) -> bool:
    """True for a row that could not be scored: a missing or unreadable output, nothing to compare with.
    An output in which no face was found is a result (count accuracy counts it wrong), not a failure."""
    return row.get("status") != "ok" and row.get("reason") != "no face in output"


def sample_fingerprint(prompt: Any, num_persons: Any, subset: Any) -> str:
    """The hash of a sample's metadata a row depends on (prompt, number of people, subset)."""
    return _short_hash({"prompt": prompt, "num_persons": num_persons, "subset": subset})


def stale_reasons(row: dict[str, Any], samples: dict[str, Any], face_models: dict[str, dict[str, Any]],
                  digests: FileDigests) -> list[str]:
    """Why a stored row no longer describes the files on disk now (empty: it does).

    The row's ``inputs`` are checked against the output, GT and reference files as they are now (paths from
    the row and ``samples.json``), the sample's metadata, and — for face models of the last run
    (``face_models``: name → run.json entry) — the face model key and the metric settings. A row without
    fingerprints (written by an older version) is stale."""
    inputs = row.get("inputs")
    if not isinstance(inputs, dict):
        return ["no input fingerprint (row written by an older version)"]
    why = []
    out = row.get("output")
    if (digests.digest(out) if out else None) != inputs.get("output"):
        why.append(INPUT_CHANGES["output"])
    info = samples.get(str(row.get("sample")))
    if isinstance(info, dict):
        gt = info.get("gt")
        if (digests.digest(gt) if gt else None) != inputs.get("gt"):
            why.append(INPUT_CHANGES["gt"])
        if [digests.digest(r) for r in info.get("references", [])] != inputs.get("references"):
            why.append(INPUT_CHANGES["references"])
        if "num_persons" in info and sample_fingerprint(info.get("prompt"), info["num_persons"],
                                                        info.get("subset")) != inputs.get("sample"):
            why.append(INPUT_CHANGES["sample"])
    fm = face_models.get(str(row.get("face_model")))
    if fm is not None:
        if fm.get("key") is not None and fm["key"] != inputs.get("face_model"):
            why.append(INPUT_CHANGES["face_model"])
        if fm.get("settings") is not None and fm["settings"] != inputs.get("settings"):
            why.append(INPUT_CHANGES["settings"])
    return why


def current_results(out_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(current, stale)`` rows of ``<out>/results.jsonl``: a row is current when its content keys match
    the files on disk now and the last run's face model and settings (:func:`stale_reasons`); each stale
    row gets ``stale`` (the reasons). Reports show only current rows and list the stale ones."""
    out_dir = Path(out_dir)
    rows = load_results(out_dir)
    if not rows:
        return [], []

    def read(name: str) -> dict[str, Any]:
        try:
            data = json.loads((out_dir / name).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    samples = read("samples.json")
    face_models = {f["name"]: f for f in read(RUN_CONFIG).get("face_models", []) if isinstance(f, dict)
                   and "name" in f}
    digests = FileDigests(out_dir / "cache" / "digests.json")
    current, stale = [], []
    for r in rows:
        why = stale_reasons(r, samples, face_models, digests)
        if why:
            stale.append({**r, "stale": why})
        else:
            current.append(r)
    digests.save()
    return current, stale


def _ref_faces(model: FaceModel, sample: Sample) -> tuple[list[CachedFaces], list[str]]:
    refs, issues = [], []
    for k, p in enumerate(sample.references, 1):
        res = model.cache.faces(p, pad=REF_PAD)
        refs.append(res)
        if res.error:
            issues.append(f"reference {k} unreadable: {res.error}")
        elif not res.faces:
            issues.append(f"reference {k} has no face: {p}")
    return refs, issues


def path_missing(res: CachedFaces) -> bool:
    """True when the error is a missing file or a missing output (not a corrupt one)."""
    return bool(res.error) and (res.error.endswith("no such file") or res.error.startswith("no output"))


def score_output(sample: Sample, method: str, model: FaceModel, out: CachedFaces, gt: CachedFaces | None,
                 refs: list[CachedFaces], ref_issues: list[str], output_path: Path | None,
                 cp_normalisation: str = "release") -> dict[str, Any]:
    """One result row: the output's identity scores against GT and references, or why it has none."""
    row: dict[str, Any] = {
        "sample": sample.id, "method": method, "face_model": model.name, "subset": sample.subset,
        "num_persons": sample.num_persons, "status": "ok", "reason": None, "issues": list(ref_issues),
        "output": str(output_path) if output_path else None, "out_faces": 0, "gt_faces": None,
        "out_boxes": [], "gt_boxes": [], "ref_boxes": [r.boxes[:1] for r in refs],
        "sim_gt": None, "sim_ref": None, "sim_gt_unmatched": None, "sim_ref_unmatched": None,
        "cp": None, "cp_faces": [], "cp_gate_pass": None, "count_mismatch": False,
        "cp_normalisation": cp_normalisation, "count_acc": None, "identity_confusion": None, "confusion_faces": [],
    }
    if sample.meta.get("source"):  # the benchmark a sample comes from (the taxonomy plot's panels)
        row["source"] = str(sample.meta["source"])
    if sample.meta.get("_meta_error"):
        row["issues"].append(str(sample.meta["_meta_error"]))
    if out.error or not out.faces:
        row["status"] = "failed"
        if out.key is None and path_missing(out):
            row["reason"] = out.error
        else:
            row["reason"] = ("output unreadable: " + out.error) if out.error else "no face in output"
            row["count_acc"] = False if not out.error else None
        return row
    row["out_faces"] = len(out.faces)
    row["out_boxes"] = out.boxes
    gt_emb = None
    if gt is None:
        row["issues"].append("no GT image")
    elif gt.error:
        row["issues"].append(f"GT unreadable: {gt.error}")
    else:
        row["gt_faces"] = len(gt.faces)
        row["gt_boxes"] = gt.boxes
        if gt.faces:
            gt_emb = gt.embeddings
        else:
            row["issues"].append("no face in GT")
    ref_emb = [r.embeddings[0] for r in refs if not r.error and r.faces]
    if gt_emb is None and not ref_emb:
        row["status"] = "failed"
        row["reason"] = "nothing to compare with: " + "; ".join(row["issues"])
        return row
    if len(out.faces) != sample.num_persons:
        row["count_mismatch"] = True
        row["issues"].append(f"face-count mismatch: output has {len(out.faces)} faces, expected "
                             f"{sample.num_persons}")
    row["count_acc"] = not row["count_mismatch"]
    from ..faces.identity import cosine_matrix

    s = score_faces(out.embeddings, gt_emb, np.stack(ref_emb) if ref_emb else None, cp_normalisation)
    if len(ref_emb) == sample.num_persons:
        from .multi_metrics import identity_confusion, person_boxes_for

        people = person_boxes_for(sample.boxes, gt.size if gt is not None and not gt.error else None, out.size,
                                  gt.boxes if gt_emb is not None else None, gt_emb, np.stack(ref_emb))
        if people is not None and len(people) == len(ref_emb):
            conf, per_face = identity_confusion(out.embeddings, out.boxes, people, np.stack(ref_emb))
            row.update(identity_confusion=conf, confusion_faces=per_face, person_boxes=people)
        from .taxonomy import slot_boxes_for, slot_data

        slots = slot_boxes_for(sample.boxes if sample.gt is None else None, sample.meta, out.size,
                               people if people is not None and len(people) == len(ref_emb) else None)
        if slots is not None and len(slots) == len(ref_emb):  # failure taxonomy: per-slot similarity vectors
            row.update(slot_data(out.embeddings, out.boxes, slots, np.stack(ref_emb)))
    row.setdefault("slot_sims", None)
    row.update(sim_gt=s.sim_gt, sim_ref=s.sim_ref, sim_gt_unmatched=s.sim_gt_unmatched,
               sim_ref_unmatched=s.sim_ref_unmatched, cp_faces=s.cp_faces,
               gt_pairs=s.gt_pairs, ref_pairs=s.ref_pairs)
    if gt_emb is not None:  # per generated face: cosine to its matched GT face / reference (the explorer's values)
        cm = cosine_matrix(out.embeddings, gt_emb)
        row["face_sim_gt"] = [float(cm[i, j]) for i, j in s.gt_pairs]
    if ref_emb:
        cm = cosine_matrix(out.embeddings, np.stack(ref_emb))
        row["face_sim_ref"] = [float(cm[i, j]) for i, j in s.ref_pairs]
    # CP needs one GT face and one reference per generated face: a count mismatch or a missing reference
    # makes the triples ambiguous, so such samples feed Sim(GT)/Sim(Ref) but not CP.
    if s.cp is not None and not row["count_mismatch"] and len(ref_emb) == sample.num_persons:
        row["cp"] = s.cp
        gate = model.gate
        row["cp_gate_pass"] = bool(s.sim_gt is not None and s.sim_gt > (gate[0] if sample.num_persons <= 1
                                                                         else gate[1]))
    return row


def run_benchmark(bench: Benchmark, methods: Sequence[MethodOutputs], out_dir: str | Path,
                  face_models: Sequence[str | FaceModelSpec] = ("dlib",), image_metrics: Sequence[Any] = (),
                  progress: bool = True, max_rows: int | None = None, workers: int = 1,
                  cp_normalisation: str = "release") -> RunStats:
    """Score ``methods`` on ``bench`` into ``out_dir`` (results.jsonl, cache/, run.json); resumable.

    ``image_metrics`` are objects with ``name``, ``available``/``reason`` and ``score(sample, output) -> dict``
    (CLIP-I/T, aesthetics); their values are stored on every row of that (sample, method).
    ``max_rows`` stops after writing that many new rows (for tests and partial runs). ``workers`` > 1 first
    computes the faces of every image still missing from the cache in that many processes.
    ``cp_normalisation``: ``"release"`` (default: vectors divided by ‖x‖ + 1e-6 before the angles, as the
    release's evaluator) or ``"exact"`` (unit vectors); rows scored the other way are scored again.
    """
    from ..progress import track
    from .multi_metrics import CP_NORMALISATIONS

    if cp_normalisation not in CP_NORMALISATIONS:
        raise ValueError(f"cp_normalisation {cp_normalisation!r}: expected one of {', '.join(CP_NORMALISATIONS)}")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = load_face_models(face_models, out_dir / "cache")
    repair_jsonl(out_dir / RESULTS)
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"method name {', '.join(map(repr, dup))} given more than once; each method needs "
                         "its own name")
    prior = {_row_key(r): r for r in load_results(out_dir)}
    settings = {fm.name: metric_settings(fm, image_metrics, cp_normalisation) for fm in models}
    atomic_write_json(out_dir / RUN_CONFIG, {
        "benchmark": bench.name, "root": str(bench.root) if bench.root else None,
        "methods": [m.name for m in methods],
        "face_models": [{"name": m.name, "backend": m.analyzer.backend_name, "key": m.cache.key,
                         "threshold": m.analyzer.threshold, "gate": list(m.gate), "settings": settings[m.name]}
                        for m in models],
        "image_metrics": {im.name: (None if im.available else im.reason) for im in image_metrics},
        "reference_padding": REF_PAD, "cp_normalisation": cp_normalisation,
    })
    samples_path = out_dir / "samples.json"
    known = json.loads(samples_path.read_text()) if samples_path.is_file() else {}
    known.update({s.id: {"prompt": s.prompt, "gt": str(s.gt) if s.gt else None, "subset": s.subset,
                         "num_persons": s.num_persons, "references": [str(p) for p in s.references]}
                  for s in bench})
    atomic_write_json(samples_path, known)
    stats = RunStats()
    image_memo: dict[tuple[str, str], dict[str, Any]] = {}
    digests = FileDigests(out_dir / "cache" / "digests.json")
    todo: list[tuple[Sample, MethodOutputs, FaceModel, dict[str, Any]]] = []
    reasons: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    for s in bench:
        for m in methods:
            for fm in models:
                inputs = row_inputs(s, m, fm, digests, settings[fm.name])
                old = prior.get((s.id, m.name, fm.name))
                if old is not None:
                    why = changed_inputs(old.get("inputs"), inputs) or missing_data(old)
                    if not why:
                        if unscorable(old):
                            failed[str(old.get("reason"))] += 1
                        continue
                    stats.rows_rescored += 1
                    reasons.update(why)
                todo.append((s, m, fm, inputs))
    digests.save()
    stats.rescore_reasons = dict(reasons.most_common())
    stats.rows_skipped = len(bench) * len(methods) * len(models) - len(todo)
    if workers > 1 and todo and max_rows is None:
        for fm in models:
            items: list[tuple[Path, float | None]] = []
            for sample, method, _, _ in todo:
                items += [(sample.gt, None)] if sample.gt is not None else []
                items += [(r, REF_PAD) for r in sample.references]
                if sample.id in method.outputs:
                    items.append((method.outputs[sample.id], None))
            fm.cache.prefetch(items, workers=workers, progress=progress)
    per_sample: dict[tuple[str, str], tuple[CachedFaces | None, list[CachedFaces], list[str]]] = {}
    for sample, method, fm, inputs in track(todo, total=len(todo), description="bench", enabled=progress):
        if max_rows is not None and stats.rows_written >= max_rows:
            break
        ctx = per_sample.get((sample.id, fm.name))
        if ctx is None:
            gt = fm.cache.faces(sample.gt) if sample.gt is not None else None
            refs, ref_issues = _ref_faces(fm, sample)
            ctx = per_sample[(sample.id, fm.name)] = (gt, refs, ref_issues)
        gt, refs, ref_issues = ctx
        path = method.outputs.get(sample.id)
        out = fm.cache.faces(path) if path is not None else CachedFaces(None, error="no output for this sample")
        row = score_output(sample, method.name, fm, out, gt, refs, ref_issues, path, cp_normalisation)
        if sample.meta.get("source") == "multihuman-testbench":  # its count / Hungarian ID, same detections
            from .multihuman import score_multihuman

            row.update(score_multihuman(sample, out, refs, row))
        if image_metrics and path is not None and not out.error:
            memo = image_memo.get((sample.id, method.name))
            if memo is None:
                memo = {}
                for im in image_metrics:
                    if im.available:
                        try:
                            memo.update(im.score(sample, path))
                        except Exception as exc:  # one bad image never kills the run
                            memo[f"{im.name}_error"] = f"{type(exc).__name__}: {exc}"
                image_memo[(sample.id, method.name)] = memo
            row.update(memo)
        row["inputs"] = inputs
        append_jsonl(out_dir / RESULTS, row)
        stats.rows_written += 1
        if unscorable(row):
            failed[str(row["reason"])] += 1
    stats.rows_failed = sum(failed.values())
    stats.failure_reasons = dict(failed.most_common())
    clip = next((im for im in image_metrics if im.name == "clip" and im.available), None)
    if clip is not None:  # set-level: Fréchet distance of CLIP features, GT set vs each method's outputs
        from .fid import fid_by_method

        rows = [r for r in current_results(out_dir)[0] if r["face_model"] == models[0].name]
        atomic_write_json(out_dir / "fid.json", {"features": f"CLIP image features ({clip.model_name})",
                                                 "fd": fid_by_method(rows, known, clip)})
    for fm in models:
        stats.calls[fm.name] = dict(fm.analyzer.calls)
        stats.cache[fm.name] = dict(fm.cache.stats, entries=len(fm.cache))
    stats.images_seen = sum(c["hits"] + c["misses"] for c in stats.cache.values())
    stats.seconds = time.perf_counter() - t0
    return stats
