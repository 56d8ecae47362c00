"""Readers: the authors' per-sample folders, the hub parquet (``WithAnyone/MultiID-Bench``), method outputs.

* :func:`read_folder_layout` — ``<root>/<id>/{out.jpg, ori.jpg, ref_1..4.jpg, meta.json}`` (names and the
  caption key configurable); returns the benchmark and, when ``out.jpg`` files exist, that method's outputs.
* :func:`convert_hub` / :func:`read_hub` — the hub dataset's parquet rows (columns ``ID, GT, input_images,
  prompt, task_type, bboxes, subset, num_persons``; the older ``ref_1..ref_4`` base64 columns too), from a
  local parquet file, a folder of them, or a hub id (via ``datasets``), written out in the folder layout.
* :func:`read_method_outputs` — a folder of one method's images named by sample id (``<id>.jpg`` or
  ``<id>/out.jpg``).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import WithAnyoneError
from ..faces.image import image_extension
from ..io import atomic_write_bytes, atomic_write_json
from .samples import SUBSETS, Benchmark, MethodOutputs, Sample, subset_for

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_REF_NAMES = ("ref_1.jpg", "ref_2.jpg", "ref_3.jpg", "ref_4.jpg")
HUB_ID = "WithAnyone/MultiID-Bench"


class BenchmarkFormatError(WithAnyoneError, ValueError):
    """A benchmark source does not have the expected layout; ``source`` names it and ``reason`` says why."""

    def __init__(self, source: str | Path, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{source}: {reason}")


def _find(folder: Path, name: str) -> Path | None:
    """``folder/name``, or the same stem with another image suffix (``ori.png`` for ``ori.jpg``)."""
    p = folder / name
    if p.is_file():
        return p
    for suf in IMAGE_SUFFIXES:
        q = p.with_suffix(suf)
        if q.is_file():
            return q
    return None


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {"_meta_error": f"{path}: unreadable meta.json ({exc})"}
    return meta if isinstance(meta, dict) else {"_meta_error": f"{path}: meta.json is not a JSON object"}


def read_folder_layout(root: str | Path, *, output_name: str | None = "out.jpg", gt_name: str = "ori.jpg",
                       ref_names: Iterable[str] = DEFAULT_REF_NAMES, meta_name: str = "meta.json",
                       caption_key: str = "prompt", method: str | None = None,
                       name: str | None = None) -> tuple[Benchmark, MethodOutputs | None]:
    """Read the authors' layout ``<root>/<id>/{out, ori, ref_1..4, meta.json}``.

    A sample's number of people is ``meta["num_persons"]`` (or the number of ``bboxes``) when given, else the
    number of reference files found; a reference the metadata promises but the folder lacks is kept as a
    path so the run reports it missing. Returns the benchmark and the outputs found under ``output_name``
    as method ``method`` (default: the folder's name), or None when no sample has one.
    """
    root = Path(root)
    if not root.is_dir():
        raise BenchmarkFormatError(root, "benchmark folder not found")
    ref_names = list(ref_names)
    samples: list[Sample] = []
    outputs: dict[str, Path] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        meta = _read_meta(folder / meta_name)
        found = [_find(folder, n) for n in ref_names]
        boxes = meta.get("bboxes")
        declared = int(meta.get("num_persons") or (len(boxes) if isinstance(boxes, list) and boxes else 0))
        n_refs = max(declared, max((k + 1 for k, p in enumerate(found) if p is not None), default=0))
        if n_refs == 0 and _find(folder, gt_name) is None:
            continue  # not a sample folder
        refs = [found[k] or folder / ref_names[k] for k in range(min(n_refs, len(ref_names)))]
        prompt = meta.get(caption_key)
        if prompt is None:
            prompt = meta.get("prompt", meta.get("caption_en", ""))
        samples.append(Sample(
            id=folder.name, prompt=str(prompt or ""), references=refs, gt=_find(folder, gt_name),
            boxes=boxes if isinstance(boxes, list) else None, num_persons=declared or len(refs),
            subset=meta.get("subset") if meta.get("subset") in SUBSETS else "",
            meta={k: v for k, v in meta.items() if k not in (caption_key, "bboxes")},
        ))
        if output_name:
            out = _find(folder, output_name)
            if out is not None:
                outputs[folder.name] = out
    if not samples:
        raise BenchmarkFormatError(root, f"no sample folders (expected <id>/{gt_name} and <id>/{ref_names[0]})")
    bench = Benchmark(name or root.name, samples, root)
    return bench, (MethodOutputs(method or root.name, outputs) if outputs else None)


def read_method_outputs(folder: str | Path, name: str | None = None, output_name: str = "out.jpg",
                        sample_ids: Iterable[str] | None = None) -> MethodOutputs:
    """A method's images named by sample id: ``<folder>/<id>.<ext>`` or ``<folder>/<id>/<output_name>``.

    With ``sample_ids`` only those are looked up (others are ignored).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BenchmarkFormatError(folder, "method output folder not found")
    wanted = set(map(str, sample_ids)) if sample_ids is not None else None
    outputs: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            sid = p.stem
        elif p.is_dir() and (q := _find(p, output_name)) is not None:
            sid, p = p.name, q
        else:
            continue
        if wanted is None or sid in wanted:
            outputs[sid] = p
    return MethodOutputs(name or folder.name, outputs)


# ------------------------------------------------------------------------------------------------ hub parquet


def _image_bytes(value: Any, where: str) -> bytes | None:
    """Encoded image bytes from a parquet cell: ``{bytes, path}`` struct, raw bytes, base64 text, PIL image."""
    if value is None:
        return None
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path") and Path(value["path"]).is_file():
            return Path(value["path"]).read_bytes()
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        if not value:
            return None
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BenchmarkFormatError(where, "image cell is text but not base64") from exc
    if hasattr(value, "save"):  # PIL image (a decoded datasets Image feature)
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    raise BenchmarkFormatError(where, f"unsupported image cell of type {type(value).__name__}")


def _safe_id(value: Any, index: int) -> str:
    sid = str(value if value not in (None, "") else f"{index:04d}")
    sid = re.sub(r"[^A-Za-z0-9._-]+", "_", sid).strip("._") or f"{index:04d}"
    return sid


def looks_like_path(text: str | Path) -> bool:
    """True when ``text`` reads as a local path rather than a hub dataset id ``owner/name``."""
    t = str(text)
    return (isinstance(text, Path) or t.startswith((".", "/", "~")) or "\\" in t or t.count("/") != 1
            or t.endswith("/") or Path(t).suffix.lower() in (".parquet", ".pq"))


def check_source(source: str | Path, offline: bool | None = None) -> None:
    """Fail at once, before any hub call, when ``source`` is no local file or folder and either reads as a
    path or the hub must not be asked (``offline``, ``HF_HUB_OFFLINE`` or no network)."""
    if Path(source).expanduser().exists():
        return
    if looks_like_path(source):
        raise BenchmarkFormatError(source, "no such file or folder")
    from ..hub import hub_offline, offline_reason

    if hub_offline(offline):
        raise BenchmarkFormatError(source, f"no such file or folder, and {offline_reason(offline)}, so it was "
                                           "not looked up as a hub dataset")


def _iter_hub_rows(source: str | Path, split: str, offline: bool | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a local parquet file / folder (pyarrow) or a hub dataset id (``datasets``)."""
    check_source(source, offline)
    p = Path(source).expanduser()
    if p.exists():
        import pyarrow.parquet as pq

        files = sorted(p.rglob("*.parquet")) if p.is_dir() else [p]
        if not files:
            raise BenchmarkFormatError(p, "no .parquet files found")
        for f in files:
            try:
                pf = pq.ParquetFile(f)
            except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for non-parquet files
                raise BenchmarkFormatError(f, f"not a readable parquet file ({exc})") from exc
            for batch in pf.iter_batches(batch_size=16):
                yield from batch.to_pylist()
        return
    import datasets

    ds = datasets.load_dataset(str(source), split=split)
    for col, feat in ds.features.items():  # keep images encoded: no PIL decode/re-encode round trip
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
        elif isinstance(feat, (datasets.Sequence, list)) and isinstance(
                getattr(feat, "feature", feat[0] if isinstance(feat, list) and feat else None), datasets.Image):
            ds = ds.cast_column(col, [datasets.Image(decode=False)] if isinstance(feat, list)
                                else datasets.Sequence(datasets.Image(decode=False)))
    yield from ds


def convert_hub(source: str | Path = HUB_ID, out_dir: str | Path = "multiid-bench", split: str = "train",
                progress: bool = True, caption_key: str = "prompt", offline: bool | None = None) -> Benchmark:
    """Write the hub dataset (hub id, local parquet file or folder) out as the authors' folder layout.

    Each row becomes ``<out>/<ID>/ori.jpg, ref_1..n.jpg, meta.json`` (prompt under ``caption_key``, bboxes,
    subset, num_persons, task_type). Existing complete sample folders are kept (the conversion resumes).
    A source that is no local file or folder fails at once when it reads as a path or when offline.
    """
    from ..progress import track

    check_source(source, offline)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    for index, row in enumerate(track(_iter_hub_rows(source, split, offline), description="convert", enabled=progress)):
        sid = _safe_id(row.get("ID", row.get("id")), index)
        folder = out_dir / sid
        meta_path = folder / "meta.json"
        count += 1
        if meta_path.is_file():
            continue
        where = f"{source} row {index} (ID {sid})"
        refs = row.get("input_images")
        if refs is None:
            refs = [row.get(f"ref_{k}") for k in range(1, 5) if row.get(f"ref_{k}") is not None]
        ref_bytes = [_image_bytes(r, where) for r in (refs or [])]
        gt = _image_bytes(row.get("GT"), where)
        boxes = row.get("bboxes")
        if isinstance(boxes, str):
            try:
                boxes = json.loads(boxes)
            except json.JSONDecodeError:
                boxes = None
        num = int(row.get("num_persons") or len(ref_bytes) or 1)
        subset = row.get("subset")
        if subset not in SUBSETS:
            subset = subset_for(num)
        if gt is not None:
            atomic_write_bytes(folder / f"ori.{image_extension(gt)}", gt)
        for k, data in enumerate(ref_bytes, 1):
            if data is not None:
                atomic_write_bytes(folder / f"ref_{k}.{image_extension(data)}", data)
        meta = {caption_key: row.get("prompt", row.get("caption_en", "")) or "", "bboxes": boxes,
                "subset": subset, "num_persons": num, "task_type": row.get("task_type")}
        atomic_write_json(meta_path, meta)  # written last: its presence marks the sample complete
    if count == 0:
        raise BenchmarkFormatError(source, "no rows")
    bench, _ = read_folder_layout(out_dir, output_name=None, caption_key=caption_key)
    return bench


def read_hub(source: str | Path = HUB_ID, split: str = "train", cache_dir: str | Path | None = None,
             progress: bool = True, offline: bool | None = None) -> Benchmark:
    """The hub benchmark as a :class:`Benchmark`, converted once into ``cache_dir`` (default
    ``~/.cache/withanyone/bench/<name>``) and read from there afterwards (offline: only from there)."""
    if cache_dir is None:
        cache_dir = Path.home() / ".cache" / "withanyone" / "bench" / _safe_id(str(source).replace("/", "--"), 0)
    if not Path(source).expanduser().exists() and not looks_like_path(source) and Path(cache_dir).is_dir():
        from ..hub import hub_offline

        if hub_offline(offline):
            try:
                return read_folder_layout(cache_dir, output_name=None, name=str(source))[0]
            except BenchmarkFormatError:
                pass
    return convert_hub(source, cache_dir, split=split, progress=progress, offline=offline)
