"""Ingest: folders, globs, WebDataset tars or a CSV/Parquet manifest → an ordered list of input photos.

Nothing is downloaded here; remote URLs in a manifest are only read when the fetch stage is on.
"""

from __future__ import annotations

import glob as globlib
import json
import tarfile
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..faces.image import image_extension  # noqa: F401  (re-exported: WebDataset key suffixes)
from ..io import FileDigests
from .errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
#: Folder names that hold multi-person photos rather than one searched person.
DEFAULT_NO_NAME_FOLDERS = ("group", "groups")
#: Largest remote file the fetch stage will read.
MAX_FETCH_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class InputItem:
    """One input photo: where its bytes live, its search name (or None) and its caption (or None).

    ``source`` is a file path, a URL, or ``<tar path>#<member>`` for a photo inside a tar (then ``tar``,
    ``offset`` and ``length`` locate its bytes).
    """

    source: str
    search_name: str | None = None
    caption: str | None = None
    tar: str | None = None
    offset: int = 0
    length: int = 0

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> InputItem:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


def ingest(inputs: Sequence[str | Path], no_name_folders: Iterable[str] = DEFAULT_NO_NAME_FOLDERS) -> list[InputItem]:
    """Expand every input (folder, glob, ``.tar``, ``.csv``/``.parquet`` manifest or single image) in order.

    Brace patterns (``crawl-{000..099}.tar``) are expanded first; a glob may match images or ``.tar`` shards.

    A folder ``root/<name>/<photo>`` gives search name ``<name>``, except folders listed in
    ``no_name_folders`` (multi-person photos) and photos directly in ``root`` (no name). Glob matches take
    the parent folder's name the same way. Duplicate sources are kept once.
    """
    if not inputs:
        raise InputError("--input", "no input given")
    skip = {n.lower() for n in no_name_folders}
    items: list[InputItem] = []
    for raw in expand_braces(inputs):
        spec = str(raw)
        path = Path(spec)
        if any(ch in spec for ch in "*?[") and not path.exists():
            matches = sorted(globlib.glob(spec, recursive=True))
            tars = [Path(m) for m in matches if Path(m).suffix.lower() == ".tar" and Path(m).is_file()]
            found = [Path(m) for m in matches if Path(m).suffix.lower() in IMAGE_SUFFIXES and Path(m).is_file()]
            if not found and not tars:
                raise InputError(spec, "glob matches no image files or .tar shards")
            for t in tars:
                items += _ingest_tar(t)
            items += [InputItem(str(p), _folder_name(p.parent.name, skip)) for p in found]
        elif path.is_dir():
            items += _ingest_folder(path, skip)
        elif path.is_file() and path.suffix.lower() == ".tar":
            items += _ingest_tar(path)
        elif path.is_file() and path.suffix.lower() in (".csv", ".parquet", ".pq"):
            items += _ingest_manifest(path)
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            items.append(InputItem(str(path), None))
        elif not path.exists():
            raise InputError(spec, "no such file or folder")
        else:
            raise InputError(spec, "not a folder, glob, .tar, .csv/.parquet manifest or image file")
    seen: set[str] = set()
    out = []
    for it in items:
        if it.source not in seen:
            seen.add(it.source)
            out.append(it)
    if not out:
        raise InputError(", ".join(map(str, inputs)), "no image files found")
    return out


def expand_braces(inputs: Iterable[str | Path]) -> list[str]:
    """Inputs with shell brace patterns expanded (``crawl-{000..099}.tar`` quoted, as WebDataset writes it);
    an input that exists as it is named is kept as it is."""
    from braceexpand import braceexpand

    out: list[str] = []
    for raw in inputs:
        spec = str(raw)
        out += [spec] if "{" not in spec or Path(spec).exists() else list(braceexpand(spec))
    return out


def content_fingerprints(items: Sequence[InputItem], digests: FileDigests) -> list[str | None]:
    """Fingerprint of each input's content: sha256 of its file (a tar member: of its tar, plus where the
    member lies in it), None for a remote URL. ``digests`` keeps unchanged files to a ``stat`` call."""
    out: list[str | None] = []
    for it in items:
        if it.tar is not None:
            d = digests.digest(it.tar)
            out.append(f"{d}@{it.offset}+{it.length}" if d else None)
        elif _is_url(it.source):
            out.append(None)
        else:
            out.append(digests.digest(it.source))
    return out


def _folder_name(name: str, skip: set[str]) -> str | None:
    return None if name.lower() in skip else name


def _ingest_folder(root: Path, skip: set[str]) -> list[InputItem]:
    items = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        name = _folder_name(rel.parts[0], skip) if len(rel.parts) > 1 else None
        items.append(InputItem(str(p), name))
    return items


def _ingest_tar(path: Path) -> list[InputItem]:
    """Image members of a WebDataset tar; a sibling ``.json``/``.txt`` gives search name and caption."""
    try:
        tf = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as exc:
        raise InputError(str(path), f"cannot open tar: {exc}") from exc
    with tf:
        try:
            members = [m for m in tf.getmembers() if m.isfile()]
        except (tarfile.TarError, OSError) as exc:
            raise InputError(str(path), f"truncated or damaged tar ({exc}); fetch it again or leave it out") from exc
        by_key: dict[str, dict[str, tarfile.TarInfo]] = {}
        for m in members:
            base = m.name.rsplit("/", 1)[-1]
            if "." not in base:
                continue
            prefix = m.name[: len(m.name) - len(base)]
            key, ext = base.split(".", 1)
            by_key.setdefault(prefix + key, {})[ext.lower()] = m
        items = []
        for key in sorted(by_key):
            parts = by_key[key]
            img_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
            if img_ext is None:
                continue
            name = caption = None
            if "json" in parts:
                try:
                    meta = json.loads(tf.extractfile(parts["json"]).read())
                    name = meta.get("search_name") or meta.get("query")
                    caption = meta.get("caption_en") or meta.get("caption")
                except (ValueError, AttributeError):
                    pass
            if caption is None and "txt" in parts:
                caption = tf.extractfile(parts["txt"]).read().decode("utf-8", "replace").strip() or None
            m = parts[img_ext]
            items.append(InputItem(f"{path}#{m.name}", name, caption, str(path), m.offset_data, m.size))
    return items


def _ingest_manifest(path: Path) -> list[InputItem]:
    """Rows of a CSV/Parquet manifest: ``path`` (or ``url``), optional ``search_name``/``name``, ``caption``."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path) if path.suffix.lower() in (".parquet", ".pq") else pacsv.read_csv(path)
    except Exception as exc:  # pyarrow raises several types for bad files
        raise InputError(str(path), f"cannot read manifest: {exc}") from exc
    cols = set(table.column_names)
    src_col = next((c for c in ("path", "url", "file") if c in cols), None)
    if src_col is None:
        raise InputError(str(path), f"manifest needs a 'path' (or 'url') column; found {sorted(cols)}")
    name_col = next((c for c in ("search_name", "name", "query") if c in cols), None)
    cap_col = next((c for c in ("caption", "caption_en") if c in cols), None)
    rows = table.to_pylist()
    items = []
    for row in rows:
        src = row[src_col]
        if src is None or str(src).strip() == "":
            continue
        src = str(src)
        if not _is_url(src) and not Path(src).is_absolute():
            src = str(path.parent / src)
        name = row.get(name_col) if name_col else None
        cap = row.get(cap_col) if cap_col else None
        items.append(InputItem(src, str(name) if name not in (None, "") else None, cap or None))
    return items


def _is_url(src: str) -> bool:
    return src.startswith(("http://", "https://"))


def read_item_bytes(item: InputItem, fetch: bool = False, timeout: float = 30.0) -> bytes:
    """The raw bytes of an input photo; raises ``OSError``/``ValueError`` with the reason when it cannot."""
    if item.tar is not None:
        with open(item.tar, "rb") as f:
            f.seek(item.offset)
            data = f.read(item.length)
        if len(data) != item.length:
            raise OSError(f"tar member truncated ({len(data)} of {item.length} bytes)")
        return data
    if _is_url(item.source):
        if not fetch:
            raise ValueError("remote URL not fetched: the fetch stage is off (pass --fetch to download)")
        with urllib.request.urlopen(item.source, timeout=timeout) as resp:  # noqa: S310 — explicit opt-in
            data = resp.read(MAX_FETCH_BYTES + 1)
        if len(data) > MAX_FETCH_BYTES:
            raise ValueError(f"remote file larger than {MAX_FETCH_BYTES} bytes")
        return data
    return Path(item.source).read_bytes()
