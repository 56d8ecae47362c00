"""MultiHuman-Testbench (Borse et al., NeurIPS 2025 D&B, arXiv 2506.20879) in our benchmark tools.

What its repository publishes (``Qualcomm-AI-research/MultiHuman-Testbench``) and how we read it:

* ``data/multihuman_metadata.json`` — a JSON list, one entry per prompt: ``people`` (reference face paths
  ``data/faces/<name>.jpg``), ``prompt``, ``identifier``, ``vlm_questions``, ``attributes``, ``pose_image``
  (``data/poses/<i>.png``) and the OmniGen prompts. The entry's position is its id: ``compute_scores.py``
  reads the generated image ``<idx>.png``; the first 1,500 entries are the *simple* prompts, the other 300
  the *complex* ones. :func:`convert_multihuman` writes every entry as one sample folder of our layout
  (``<out>/<idx>/ref_1..n.jpg, pose.png, meta.json`` with ``source: multihuman-testbench``).
* ``data/poses.zip`` (the pose images) and ``data/poses_metadata_final.json`` (DWPose keypoints, per pose a
  dict ``bodies.candidate`` / ``bodies.subset`` / ``faces`` / ``hands``, coordinates normalised to the
  image, as ``data_generation/parse_keypoints.py`` renders them) → head boxes (:func:`head_boxes`), the
  benchmark's *regional prior* for ``bench generate --layout prior``.
* ``benchmarking/compute_scores.py`` — per image: faces detected, each embedded; cosine matrix people ×
  generated faces; an assignment by its own ``hungarian_algorithm`` (:func:`release_assignment`, which is
  *not* always the optimal assignment; :func:`optimal_assignment` is scipy's); **ID similarity** = sum of
  the assigned cosines / number of people (an unmatched person counts 0, an image without faces 0);
  **count accuracy** = detected faces == people. Images that do not exist are left out of every mean.
  HPS(v2.1) per image and an MLLM action score (Gemini; per question ``1 + answer digit``, pooled over
  every question) complete its table; here they are computed only from models given locally.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import zipfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write_bytes, atomic_write_json
from .readers import BenchmarkFormatError, read_folder_layout
from .samples import Benchmark, Sample, subset_for

#: The ``source`` tag of converted samples (in each ``meta.json``) and the marker file of a converted folder.
SOURCE = "multihuman-testbench"
MARKER = "multihuman.json"
METADATA = Path("data/multihuman_metadata.json")
POSE_KEYPOINTS = Path("data/poses_metadata_final.json")
POSES_ZIP = Path("data/poses.zip")
#: ``compute_scores.py``: entries 0…1499 are the simple prompts, the rest the complex ones.
NUM_SIMPLE = 1500
SPLITS = ("simple", "complex", "all")
MAX_PEOPLE = 5
REF_NAMES = tuple(f"ref_{k}.jpg" for k in range(1, MAX_PEOPLE + 1))
#: DWPose / OpenPose-18 body keypoints used for the head.
NOSE, NECK, R_EYE, L_EYE, R_EAR, L_EAR = 0, 1, 14, 15, 16, 17
#: DWPose marks an absent normalised face landmark by coordinates ≤ this (``dwpose_utils.eps``).
LANDMARK_EPS = 0.01


class MultiHumanFormatError(BenchmarkFormatError):
    """A MultiHuman-Testbench file is not as published; the message names the file and the entry."""


# ------------------------------------------------------------------------------------------------ metadata


@dataclass
class Entry:
    """One prompt of ``multihuman_metadata.json`` (``index`` = its position = the output file's name)."""

    index: int
    people: list[str]
    prompt: str
    pose_image: str | None = None
    identifier: list[Any] = field(default_factory=list)
    vlm_questions: list[str] = field(default_factory=list)
    attributes: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def split(self, num_simple: int = NUM_SIMPLE) -> str:
        """``simple`` (the first 1,500 entries) or ``complex``."""
        return split_of(self.index, num_simple)


def split_of(index: int, num_simple: int = NUM_SIMPLE) -> str:
    """The split of entry ``index`` as ``compute_scores.py`` counts it: simple below 1,500, else complex."""
    return "simple" if int(index) < num_simple else "complex"


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def parse_entry(raw: Any, index: int, where: str | Path) -> Entry:
    """Check one metadata entry; :class:`MultiHumanFormatError` naming the file, entry and field."""
    at = f"entry {index}"

    def bad(msg: str) -> MultiHumanFormatError:
        return MultiHumanFormatError(where, f"{at}: {msg}")

    if not isinstance(raw, dict):
        raise bad(f"is a {type(raw).__name__}, expected an object with 'people' and 'prompt'")
    people = raw.get("people")
    if not _is_str_list(people) or not people:
        raise bad(f"'people' must be a non-empty list of face paths, got {json.dumps(people)[:80]}")
    if len(people) > MAX_PEOPLE:
        raise bad(f"'people' lists {len(people)} faces; the benchmark has 1–{MAX_PEOPLE} per prompt")
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad(f"'prompt' must be a non-empty string, got {json.dumps(prompt)[:80]}")
    pose = raw.get("pose_image")
    if pose is not None and not isinstance(pose, str):
        raise bad(f"'pose_image' must be a path string, got {json.dumps(pose)[:80]}")
    questions = raw.get("vlm_questions", [])
    if not _is_str_list(questions):
        raise bad(f"'vlm_questions' must be a list of strings, got {json.dumps(questions)[:80]}")
    for key in ("identifier", "attributes"):
        if not isinstance(raw.get(key, []), list):
            raise bad(f"'{key}' must be a list, got {json.dumps(raw.get(key))[:80]}")
    known = {"people", "prompt", "pose_image", "vlm_questions", "identifier", "attributes"}
    return Entry(index, list(people), prompt, pose, list(raw.get("identifier", [])), list(questions),
                 list(raw.get("attributes", [])), {k: v for k, v in raw.items() if k not in known})


def is_lfs_pointer(path: Path) -> bool:
    """True when ``path`` is a git-LFS pointer file (the repository cloned without ``git lfs pull``)."""
    try:
        with open(path, "rb") as f:
            return f.read(40).startswith(b"version https://git-lfs.github.com/spec")
    except OSError:
        return False


def _lfs_hint(path: Path) -> str:
    return f"{path} is a git-LFS pointer, not the file: run `git lfs pull` in the repository"


def _read_json(path: Path) -> Any:
    """A published JSON file's content; a git-LFS pointer or unreadable JSON → :class:`MultiHumanFormatError`."""
    if is_lfs_pointer(path):
        raise MultiHumanFormatError(path, _lfs_hint(path))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MultiHumanFormatError(path, f"not readable JSON ({exc})") from exc


def read_metadata(path: str | Path) -> list[Entry]:
    """The entries of ``multihuman_metadata.json`` (a JSON list), each checked (:func:`parse_entry`)."""
    path = Path(path)
    if not path.is_file():
        raise MultiHumanFormatError(path, "metadata file not found (expected data/multihuman_metadata.json "
                                          "of a MultiHuman-Testbench checkout)")
    data = _read_json(path)
    if not isinstance(data, list):
        raise MultiHumanFormatError(path, f"top level is a {type(data).__name__}, expected a list of entries")
    if not data:
        raise MultiHumanFormatError(path, "no entries")
    return [parse_entry(raw, i, path) for i, raw in enumerate(data)]


# -------------------------------------------------------------------------------------------------- poses


def read_pose_keypoints(path: str | Path) -> dict[str, dict[str, Any]]:
    """``poses_metadata_final.json``: pose name → its first pose dict (``bodies``, ``faces``, ``hands``).

    As ``parse_keypoints.py`` reads it: a JSON object whose values are a pose dict or a list of them; keys
    are matched to pose images by :func:`pose_key` (``"12"``, ``"12.png"`` or ``"data/poses/12.png"``).
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise MultiHumanFormatError(path, f"top level is a {type(data).__name__}, expected an object "
                                          "pose name → keypoints")
    out = {}
    for key, val in data.items():
        poses = [val] if isinstance(val, dict) else [v for v in val if isinstance(v, dict)] if isinstance(
            val, list) else []
        if poses:
            out[pose_key(key)] = poses[0]
    return out


def pose_key(name: str | Path) -> str:
    """The stem of a pose name or path (``data/poses/12.png`` → ``12``)."""
    return Path(str(name)).stem


def _rows(a: Any) -> np.ndarray:
    arr = np.asarray(a if a is not None else [], dtype=np.float64)
    return arr.reshape(len(arr), -1) if arr.size else np.zeros((0, 2))


def head_boxes(pose: dict[str, Any], width: int, height: int) -> list[list[float]]:
    """Head boxes ``x1, y1, x2, y2`` (pixels of a ``width`` × ``height`` pose image), one per body, left
    to right, from DWPose keypoints.

    A body with face landmarks (``faces[n]``, 68 points; ≤ 0.01 = absent) gets their bounding box grown by
    8 % a side; without them the box is a square around the mean of nose, eyes and ears, its side the
    largest of 1.0 × ear span, 2.5 × eye span and 1.1 × nose–neck distance (0.45 × shoulder span when that
    is all there is). Coordinates ≤ 1.5 are taken as normalised (as DWPose dumps them), larger as pixels.
    """
    bodies = pose.get("bodies") if isinstance(pose, dict) else None
    if not isinstance(bodies, dict):
        raise ValueError("pose has no 'bodies' object")
    cand = _rows(bodies.get("candidate"))
    subset = _rows(bodies.get("subset"))
    if cand.shape[0] and cand.shape[1] < 2:
        raise ValueError("bodies.candidate rows need x, y")
    norm = cand.size == 0 or float(np.nanmax(np.abs(cand[:, :2]))) <= 1.5
    scale = np.array([width, height], dtype=np.float64) if norm else np.ones(2)
    faces = pose.get("faces") or []
    boxes = []
    for n, row in enumerate(subset):
        pts: dict[int, np.ndarray] = {}
        for k in (NOSE, NECK, 2, 5, R_EYE, L_EYE, R_EAR, L_EAR):
            if k < len(row) and row[k] >= 0 and int(row[k]) < len(cand):
                pts[k] = cand[int(row[k]), :2] * scale
        box = None
        if n < len(faces):
            lm = _rows(faces[n])
            if lm.shape[0] and lm.shape[1] >= 2:
                lm = lm[:, :2]
                ok = (lm[:, 0] > LANDMARK_EPS) & (lm[:, 1] > LANDMARK_EPS) if norm else np.all(lm > 0, axis=1)
                if ok.sum() >= 10:
                    p = lm[ok] * scale
                    x1, y1 = p.min(axis=0)
                    x2, y2 = p.max(axis=0)
                    gx, gy = 0.08 * (x2 - x1), 0.08 * (y2 - y1)
                    box = [x1 - gx, y1 - gy, x2 + gx, y2 + gy]
        if box is None:
            head = [pts[k] for k in (NOSE, R_EYE, L_EYE, R_EAR, L_EAR) if k in pts]
            if not head:
                continue
            cx, cy = np.mean(head, axis=0)
            sizes = []
            if R_EAR in pts and L_EAR in pts:
                sizes.append(1.0 * float(np.linalg.norm(pts[R_EAR] - pts[L_EAR])))
            if R_EYE in pts and L_EYE in pts:
                sizes.append(2.5 * float(np.linalg.norm(pts[R_EYE] - pts[L_EYE])))
            if NOSE in pts and NECK in pts:
                sizes.append(1.1 * float(np.linalg.norm(pts[NOSE] - pts[NECK])))
            if not sizes and 2 in pts and 5 in pts:
                sizes.append(0.45 * float(np.linalg.norm(pts[2] - pts[5])))
            side = max(sizes) if sizes else 0.0
            if side < 2:
                continue
            box = [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]
        x1, y1, x2, y2 = box
        x1, x2 = max(0.0, x1), min(float(width), x2)
        y1, y2 = max(0.0, y1), min(float(height), y2)
        if x2 - x1 >= 2 and y2 - y1 >= 2:
            boxes.append([round(float(v), 2) for v in (x1, y1, x2, y2)])
    return sorted(boxes, key=lambda b: (b[0] + b[2]) / 2)


def head_boxes_from_image(data: bytes, min_pixels: int = 40) -> list[list[float]]:
    """Head boxes from a pose *image* alone (no keypoints): DWPose draws face landmarks as white dots (no
    other part is white), so each cluster of white dots is a face; its box is grown 8 % a side, as in
    :func:`head_boxes`. Clusters of fewer than ``min_pixels`` white pixels, or under 6 px a side, are
    ignored. Left to right."""
    from PIL import Image
    from scipy import ndimage

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"))
    white = np.all(arr >= 245, axis=2)
    if not white.any():
        return []
    h, w = white.shape
    reach = max(3, int(round(0.012 * max(h, w))))
    groups, n = ndimage.label(ndimage.binary_dilation(white, iterations=reach))
    boxes = []
    for g in range(1, n + 1):
        ys, xs = np.nonzero(white & (groups == g))
        x1, x2, y1, y2 = float(xs.min()), float(xs.max() + 1), float(ys.min()), float(ys.max() + 1)
        if len(xs) < min_pixels or min(x2 - x1, y2 - y1) < 6:
            continue
        gx, gy = 0.08 * (x2 - x1), 0.08 * (y2 - y1)
        boxes.append([round(v, 2) for v in (max(0.0, x1 - gx), max(0.0, y1 - gy), min(float(w), x2 + gx),
                                            min(float(h), y2 + gy))])
    return sorted(boxes, key=lambda b: (b[0] + b[2]) / 2)


def boxes_for_people(boxes: list[list[float]], num_people: int) -> tuple[list[list[float]] | None, str | None]:
    """The pose's head boxes for ``num_people`` references (reference k → k-th box from the left): the
    largest ``num_people`` when the pose has more heads; None, with the reason, when it has fewer."""
    if len(boxes) < num_people:
        return None, f"pose has {len(boxes)} head(s) for {num_people} people: no regional prior"
    if len(boxes) > num_people:
        keep = sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))[:num_people]
        return sorted(keep, key=lambda b: (b[0] + b[2]) / 2), (f"pose has {len(boxes)} heads for {num_people} "
                                                                 "people: the largest kept")
    return boxes, None


class PoseImages:
    """Pose images by name from ``data/poses/`` (unzipped) or ``data/poses.zip`` (members matched by name)."""

    def __init__(self, repo: Path):
        self.folder = repo / "data" / "poses"
        self.zip_path = repo / POSES_ZIP
        self.problem: str | None = None
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, str] = {}
        if not self.folder.is_dir() and self.zip_path.is_file():
            if is_lfs_pointer(self.zip_path):
                self.problem = _lfs_hint(self.zip_path)
            else:
                try:
                    self._zip = zipfile.ZipFile(self.zip_path)
                except (OSError, zipfile.BadZipFile) as exc:
                    self.problem = f"{self.zip_path}: not a readable zip ({exc})"
                else:
                    self._members = {Path(n).name: n for n in self._zip.namelist() if not n.endswith("/")}
        elif not self.folder.is_dir():
            self.problem = f"no pose images: neither {self.folder} nor {self.zip_path} exists"

    def read(self, name: str) -> bytes | None:
        """The bytes of pose image ``name`` (``data/poses/12.png`` or ``12.png``), or None."""
        base = Path(name).name
        if self.folder.is_dir():
            p = self.folder / base
            return p.read_bytes() if p.is_file() else None
        if self._zip is not None and base in self._members:
            return self._zip.read(self._members[base])
        return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # an unreadable pose image: the sample keeps no pose
        return None


# ------------------------------------------------------------------------------------------------ convert


@dataclass
class ConvertReport:
    """What a conversion did: samples written / kept, faces and poses not found, head boxes missing."""

    samples: int = 0
    written: int = 0
    kept: int = 0
    missing_faces: list[tuple[int, str]] = field(default_factory=list)
    missing_poses: list[tuple[int, str]] = field(default_factory=list)
    no_prior: list[tuple[int, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def convert_multihuman(repo: str | Path, out: str | Path, faces: str | Path | None = None,
                       limit: int | None = None, keypoints: str | Path | None = None,
                       metadata: str | Path | None = None, progress: bool = True,
                       num_simple: int = NUM_SIMPLE) -> tuple[Benchmark, ConvertReport]:
    """Write a MultiHuman-Testbench checkout as our sample layout; resumable, missing faces listed.

    ``repo``: the checkout (``data/multihuman_metadata.json``, ``data/poses/`` or ``data/poses.zip``,
    optionally ``data/poses_metadata_final.json``); ``faces``: the folder ``download_faces.py`` filled
    (default ``<repo>/data/faces``), looked up by file name. Each entry becomes ``<out>/<index>/`` with
    ``ref_k.jpg`` (hard link or copy), ``pose.png`` and ``meta.json`` (written last); an existing sample
    whose inputs did not change is kept. ``num_simple``: how many leading entries are the simple prompts
    (1,500 in the published benchmark; smaller only for test benches).
    """
    from ..progress import track

    repo, out = Path(repo), Path(out)
    if not repo.is_dir():
        raise MultiHumanFormatError(repo, "MultiHuman-Testbench checkout not found (--repo)")
    faces_dir = Path(faces) if faces is not None else repo / "data" / "faces"
    if not faces_dir.is_dir():
        raise MultiHumanFormatError(faces_dir, "faces folder not found (run data_generation/download_faces.py in "
                                               "the checkout, or pass --faces)")
    entries = read_metadata(Path(metadata) if metadata else repo / METADATA)
    if limit is not None:
        entries = entries[:max(0, int(limit))]
    report = ConvertReport(samples=len(entries))
    kp_path = Path(keypoints) if keypoints else repo / POSE_KEYPOINTS
    kps: dict[str, dict[str, Any]] = {}
    if kp_path.is_file():
        kps = read_pose_keypoints(kp_path)
    else:
        report.notes.append(f"no pose keypoints ({kp_path} not found): regional-prior boxes come from the face "
                            "landmarks drawn in the pose images")
    poses = PoseImages(repo)
    if poses.problem:
        report.notes.append(poses.problem)
    out.mkdir(parents=True, exist_ok=True)
    for e in track(entries, total=len(entries), description="convert", enabled=progress):
        folder = out / str(e.index)
        refs = [faces_dir / Path(p).name for p in e.people]
        present = [r.is_file() for r in refs]
        stamps = [(r.stat().st_size, r.stat().st_mtime_ns) if ok else None for r, ok in zip(refs, present, strict=True)]
        pose_bytes = poses.read(e.pose_image) if e.pose_image else None
        fingerprint = hashlib.sha256(json.dumps(
            [e.people, e.prompt, e.pose_image, stamps, e.split(num_simple), hashlib.sha256(pose_bytes or b"").hexdigest(),
             kps.get(pose_key(e.pose_image)) if e.pose_image else None], sort_keys=True, default=str
        ).encode()).hexdigest()[:16]
        report.missing_faces += [(e.index, e.people[k]) for k, ok in enumerate(present) if not ok]
        if e.pose_image and pose_bytes is None:
            report.missing_poses.append((e.index, e.pose_image))
        meta_path = folder / "meta.json"
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and old.get("convert_fingerprint") == fingerprint:
            report.kept += 1
            if old.get("prior_note") and old.get("bboxes") is None:
                report.no_prior.append((e.index, old["prior_note"]))
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for k, (r, ok) in enumerate(zip(refs, present, strict=True)):
            dst = folder / REF_NAMES[k]
            if ok:
                _link_or_copy(r, dst)
            else:
                dst.unlink(missing_ok=True)
        for name in REF_NAMES[len(refs):]:  # an entry that lost people since an earlier conversion
            (folder / name).unlink(missing_ok=True)
        pose_size = None
        boxes, note = None, None
        if pose_bytes is not None:
            atomic_write_bytes(folder / "pose.png", pose_bytes)
            pose_size = _png_size(pose_bytes)
        kp = kps.get(pose_key(e.pose_image)) if e.pose_image else None
        if kp is not None:
            size = pose_size or (1024, 1024)  # parse_keypoints.py renders every pose at 1024 × 1024
            pose_size = size
            try:
                boxes, note = boxes_for_people(head_boxes(kp, size[0], size[1]), len(e.people))
            except (ValueError, TypeError, IndexError) as exc:
                raise MultiHumanFormatError(kp_path, f"pose {pose_key(e.pose_image)!r} (entry {e.index}): "
                                                     f"malformed keypoints ({exc})") from exc
        elif pose_bytes is not None:  # no keypoints for it: the face landmarks drawn in the pose image
            boxes, note = boxes_for_people(head_boxes_from_image(pose_bytes), len(e.people))
            note = "boxes from the pose image's face landmarks (no keypoints)" + (f"; {note}" if note else "")
        if note and boxes is None:
            report.no_prior.append((e.index, note))
        meta = {"prompt": e.prompt, "source": SOURCE, "index": e.index, "split": e.split(num_simple),
                "num_persons": len(e.people), "subset": subset_for(len(e.people)), "people": e.people,
                "missing_references": [e.people[k] for k, ok in enumerate(present) if not ok],
                "identifier": e.identifier, "vlm_questions": e.vlm_questions, "attributes": e.attributes,
                "pose_image": e.pose_image, "pose_size": list(pose_size) if pose_size else None,
                "bboxes": boxes, "prior_note": note, "convert_fingerprint": fingerprint,
                **{k: v for k, v in e.extra.items() if isinstance(v, (str, int, float, bool, type(None)))}}
        atomic_write_json(meta_path, meta)
        report.written += 1
    atomic_write_json(out / MARKER, {
        "source": SOURCE, "repo": str(repo.resolve()), "faces": str(faces_dir.resolve()),
        "samples": [e.index for e in entries], "num_simple": num_simple,
        "missing_faces": [{"index": i, "face": f} for i, f in report.missing_faces],
        "missing_poses": [{"index": i, "pose": p} for i, p in report.missing_poses], "notes": report.notes})
    return read_multihuman(out), report


def is_multihuman(root: str | Path) -> bool:
    """True for a folder written by :func:`convert_multihuman` (it holds ``multihuman.json``)."""
    return (Path(root) / MARKER).is_file()


def read_multihuman(root: str | Path, output_name: str | None = None, method: str | None = None):
    """A converted folder as a :class:`Benchmark` in the metadata's order (ids = entry indices); with
    ``output_name`` also ``(benchmark, outputs found in the sample folders or None)``."""
    root = Path(root)
    bench, own = read_folder_layout(root, output_name=output_name, ref_names=REF_NAMES, method=method,
                                    name=SOURCE)
    try:  # the entries of the last conversion (an earlier one with a larger --limit may have left more)
        chosen = {str(i) for i in json.loads((root / MARKER).read_text(encoding="utf-8")).get("samples", [])}
    except (OSError, ValueError, AttributeError, TypeError):
        chosen = set()
    if chosen:
        bench.samples = [s for s in bench.samples if s.id in chosen]
        if own is not None:
            own.outputs = {k: v for k, v in own.outputs.items() if k in chosen}
    bench.samples.sort(key=lambda s: (int(s.meta.get("index", 0)) if str(s.meta.get("index", "")).isdigit()
                                      else math.inf, s.id))
    return (bench, own) if output_name else bench


def is_multihuman_sample(sample: Sample) -> bool:
    """True for a sample converted from MultiHuman-Testbench."""
    return sample.meta.get("source") == SOURCE


def prior_size(sample: Sample) -> tuple[int, int] | None:
    """The pixel size the sample's prior boxes refer to (its pose image), or None."""
    size = sample.meta.get("pose_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, (int, float)) for v in size):
        return int(size[0]), int(size[1])
    return None


# ------------------------------------------------------------------------------------------- assignment


def release_assignment(sim: np.ndarray, max_iter: int | None = None) -> dict[int, int]:
    """Row → column as ``compute_scores.py``'s ``hungarian_algorithm`` assigns them (maximising ``sim``).

    Its steps, re-implemented: pad to a square with zeros; costs ``max − sim``; subtract each row's then
    each column's minimum; then repeatedly take zeros greedily (rows in order, each its first free zero
    column) and stop once rows + columns of those zeros are at least the size — that is, as soon as half
    the rows hold a zero — else shift by the smallest free cost and retry. Rows left over get the free
    columns in order. So it is optimal on many matrices but not all: ``[[.9, .85], [.8, .1]]`` gives
    (0→0, 1→1), sum 1.0, where the optimum is 1.65. Columns ≥ the input's width are padding (unmatched).
    """
    s = np.asarray(sim, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError("similarity matrix must be 2-D")
    n0, m0 = s.shape
    n = max(n0, m0)
    if n == 0:
        return {}
    c = np.zeros((n, n), dtype=np.float64)
    c[:n0, :m0] = s
    c = np.max(c) - c
    c = c - c.min(axis=1, keepdims=True)
    c = c - c.min(axis=0, keepdims=True)
    pairs: list[tuple[int, int]] = []
    for _ in range(max_iter or 50 * n * n):
        pairs, used_r, used_c = [], np.zeros(n, bool), np.zeros(n, bool)
        for r in range(n):
            zeros = np.flatnonzero((c[r] == 0) & ~used_c)
            if zeros.size:
                pairs.append((r, int(zeros[0])))
                used_r[r] = used_c[zeros[0]] = True
        if 2 * len(pairs) >= n:
            break
        free = c[np.ix_(~used_r, ~used_c)]
        low = float(free.min())
        c[~used_r, :] -= low
        c[:, used_c] += low
    taken_r = {r for r, _ in pairs}
    taken_c = {col for _, col in pairs}
    left_r = [r for r in range(n) if r not in taken_r]
    left_c = [col for col in range(n) if col not in taken_c][:len(left_r)]
    if len(left_c) == len(left_r):
        pairs += list(zip(left_r, left_c, strict=True))
    out: dict[int, int] = {}
    for r, col in pairs:
        out.setdefault(r, col)
    return out


def optimal_assignment(sim: np.ndarray) -> dict[int, int]:
    """Row → column of the maximum-sum assignment (scipy); rows without a column are left out."""
    from scipy.optimize import linear_sum_assignment

    s = np.asarray(sim, dtype=np.float64)
    if s.size == 0:
        return {}
    rows, cols = linear_sum_assignment(-s)
    return {int(r): int(c) for r, c in zip(rows, cols, strict=True)}


def hungarian_id(sim: np.ndarray, num_people: int, matching: str = "release") -> tuple[float, list[float]]:
    """``compute_scores.py``'s ID similarity of one image: ``sim`` is people × generated faces (cosines);
    each person scores the cosine of its assigned face (0 when assigned a padding column or none); the
    value is their sum / ``num_people``. ``matching``: ``release`` (:func:`release_assignment`) or
    ``optimal``. Returns the value and the per-person scores."""
    s = np.asarray(sim, dtype=np.float64).reshape(num_people, -1)
    if s.shape[1] == 0:
        return 0.0, [0.0] * num_people
    assign = release_assignment(s) if matching == "release" else optimal_assignment(s)
    per = [float(s[p, assign[p]]) if p in assign and assign[p] < s.shape[1] else 0.0 for p in range(num_people)]
    return float(sum(per) / num_people), per


# -------------------------------------------------------------------------------------------------- rows


def score_multihuman(sample: Sample, out: Any, refs: Sequence[Any], row: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
    """The MultiHuman-Testbench fields of one runner row (``out``/``refs``: the cached faces of the output
    and of each reference, one detection per image).

    ``mhtb_count_acc`` (1/0), ``mhtb_id`` (release assignment), ``mhtb_id_optimal``, ``mhtb_all_ids``
    (per person, as ``scores.jsonl``'s ``all_ids``), the split and index; None where the output is missing
    or unreadable (left out, as ``compute_scores.py`` skips absent images). ID similarity needs every
    reference's face: otherwise it is None and the row says why. For samples with pose head boxes, the
    identity confusion against them (reference k ↔ k-th head from the left, rescaled to the output): what
    ``--layout prior`` asked for; for outputs made without those boxes it only says how far they follow the pose.
    """
    n = int(sample.num_persons)
    issues = [i for i in (row or {}).get("issues", []) if i != "no GT image"]  # the benchmark has none
    row = {"issues": issues, "source": SOURCE, "mhtb_index": sample.meta.get("index"),
           "mhtb_split": sample.meta.get("split") or split_of(int(sample.meta.get("index", 0))),
           "mhtb_count_acc": None, "mhtb_id": None, "mhtb_id_optimal": None, "mhtb_all_ids": None, "mhtb_note": None}
    if getattr(out, "error", None):
        return row
    faces = list(out.faces or [])
    row["mhtb_count_acc"] = int(len(faces) == n)
    ref_ok = [r for r in refs if not r.error and r.faces]
    if len(ref_ok) < n or len(refs) < n:
        row["mhtb_note"] = (f"Hungarian ID not computed: {n - len(ref_ok)} of {n} references missing or "
                            "with no face (count accuracy kept)")
        issues.append(row["mhtb_note"])
        return row
    if not faces:
        row.update(mhtb_id=0.0, mhtb_id_optimal=0.0, mhtb_all_ids=[0.0] * n)
        return row
    from ..faces.identity import cosine_matrix

    ref_emb = np.stack([r.embeddings[0] for r in refs[:n]])
    sim = cosine_matrix(ref_emb, out.embeddings)
    value, per = hungarian_id(sim, n, "release")
    opt, _ = hungarian_id(sim, n, "optimal")
    row.update(mhtb_id=value, mhtb_id_optimal=opt, mhtb_all_ids=per)
    size = prior_size(sample)
    if sample.boxes and size and out.size and len(sample.boxes) == n:
        from .multi_metrics import identity_confusion, person_boxes_for

        people = person_boxes_for(sample.boxes, size, tuple(out.size))
        if people is not None:
            conf, per_face = identity_confusion(out.embeddings, out.boxes, people, ref_emb)
            row.update(identity_confusion=conf, confusion_faces=per_face, person_boxes=people)
    return row


# ---------------------------------------------------------------------------------- HPS and action score


class HPSScorer:
    """HPSv2.1 (open_clip ViT-H-14 + the HPS checkpoint) from a local weights file; never downloads.

    ``weights``: ``HPS_v2.1_compressed.pt`` (read with ``torch.load(weights_only=True)``, no pickle code
    runs) or a ``.safetensors`` of the same state dict. The ViT-H-14 architecture comes from ``open_clip``
    (``pip install open-clip-torch``) or ``hpsv2``'s bundled copy, built without pretrained weights.
    Score = cosine of the normalised image and prompt features, as ``compute_scores.py`` (``hps`` field).
    """

    name = "hps"

    def __init__(self, weights: str | Path | None, device: str | None = None):
        self.weights = Path(weights) if weights else None
        self.device = device
        self.model_name = f"HPSv2.1 ViT-H-14 ({self.weights.name})" if self.weights else None
        self.reason: str | None = None
        self._model: Any = None
        self._oc: Any = None
        if self.weights is None:
            self.reason = ("no HPSv2 weights given (--hps PATH of HPS_v2.1_compressed.pt or .safetensors); "
                           "nothing is downloaded")
        elif not self.weights.is_file():
            self.reason = f"HPSv2 weights {self.weights} not found"
        else:
            self._oc = _open_clip()
            if self._oc is None:
                self.reason = "open_clip is not installed (pip install open-clip-torch, or hpsv2)"

    @property
    def available(self) -> bool:
        """True when weights and open_clip are there."""
        return self.reason is None

    def _load(self) -> None:
        import torch

        oc = self._oc
        dev = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, _, preprocess = oc.create_model_and_transforms("ViT-H-14", pretrained=None, device=dev)
        if self.weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(self.weights))
        else:
            state = torch.load(self.weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        model.load_state_dict(state)
        model.eval()
        self._model, self._preprocess, self._tok, self._dev = model, preprocess, oc.get_tokenizer("ViT-H-14"), dev

    def score(self, sample: Sample, output: str | Path) -> dict[str, Any]:
        """``{"hps": value}`` of one output for its prompt."""
        import torch
        from PIL import Image

        if self._model is None:
            self._load()
        with Image.open(output) as im:
            image = self._preprocess(im.convert("RGB")).unsqueeze(0).to(self._dev)
        text = self._tok([sample.prompt]).to(self._dev)
        with torch.no_grad():
            fi = self._model.encode_image(image, normalize=True)
            ft = self._model.encode_text(text, normalize=True)
        return {"hps": float((fi @ ft.T).squeeze())}


def _open_clip() -> Any:
    try:
        import open_clip

        return open_clip
    except ImportError:
        pass
    try:
        from hpsv2.src import open_clip  # type: ignore[no-redef]

        return open_clip
    except ImportError:
        return None


def action_scores(answers: str, num_questions: int) -> list[int]:
    """``compute_scores.py``'s per-question action scores from an MLLM answer: newlines dropped, then for
    each question in order ``1 + int(answer[q])``, stopping at the first character that is not one (the
    scores before it count, as there)."""
    text = str(answers).replace("\n", "")
    out = []
    for q in range(num_questions):
        try:
            out.append(1 + int(text[q]))
        except (IndexError, ValueError):
            break
    return out


class ActionScorer:
    """The MLLM action score with a local model: ``module:callable`` answering ``f(questions, image)`` with
    one digit per question (the release asks Gemini 2.0 Flash; here nothing leaves the machine)."""

    name = "action"

    def __init__(self, spec: str | None):
        self.model_name = spec or None
        self.reason: str | None = None
        self._fn: Callable[..., Any] | None = None
        if not spec:
            self.reason = ("needs an MLLM (the release uses Gemini 2.0 Flash with an API key); give a local one "
                           "with --action-scorer module:callable")
        else:
            from .generate import GenerationError, load_callable

            try:
                self._fn = load_callable(spec)
            except GenerationError as exc:
                self.reason = str(exc).replace("--pipeline", "--action-scorer")

    @property
    def available(self) -> bool:
        """True when a callable was loaded."""
        return self.reason is None

    def score(self, sample: Sample, output: str | Path) -> dict[str, Any]:
        """``{"mhtb_action": [scores], "mhtb_action_answers": text}`` for a MultiHuman-Testbench sample."""
        from PIL import Image

        questions = sample.meta.get("vlm_questions")
        if not is_multihuman_sample(sample) or not questions:
            return {}
        with Image.open(output) as im:
            answers = str(self._fn(list(questions), im.convert("RGB")))
        return {"mhtb_action": action_scores(answers, len(questions)), "mhtb_action_answers": answers}


# ---------------------------------------------------------------------------------------------- summary


def _mean(vals: list[float]) -> float | None:
    return float(sum(vals) / len(vals)) if vals else None


def _block(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell group: compute_scores' means over the images that exist, plus ours."""
    scored = [r for r in rows if r.get("mhtb_count_acc") is not None]
    ids = [float(r["mhtb_id"]) for r in scored if r.get("mhtb_id") is not None]
    action = [s for r in scored for s in (r.get("mhtb_action") or [])]
    return {
        "images": len(scored), "missing": len(rows) - len(scored),
        "count_acc": _mean([float(r["mhtb_count_acc"]) for r in scored]),
        "id_sim": _mean(ids), "id_n": len(ids),
        "id_sim_optimal": _mean([float(r["mhtb_id_optimal"]) for r in scored if r.get("mhtb_id_optimal") is not None]),
        "hps": _mean([float(r["hps"]) for r in scored if isinstance(r.get("hps"), (int, float))]),
        "action": _mean([float(s) for s in action]), "action_n": len(action),
        "sim_ref": _mean([float(r["sim_ref"]) for r in scored if isinstance(r.get("sim_ref"), (int, float))]),
        "identity_confusion": _mean([float(r["identity_confusion"]) for r in scored
                                     if isinstance(r.get("identity_confusion"), (int, float))]),
    }


def summarize_multihuman(rows: list[dict[str, Any]], not_computed: dict[str, str] | None = None,
                         face_models: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Per face model × method: the split blocks (simple / complex / all) and per people count (1–5);
    None when no row comes from MultiHuman-Testbench."""
    mh = [r for r in rows if r.get("source") == SOURCE]
    if not mh:
        return None
    by: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in mh:
        by[r["face_model"]][r["method"]].append(r)
    order = [m for m in (face_models or []) if m in by] + sorted(set(by) - set(face_models or []))
    table: dict[str, Any] = {}
    for fm in order:
        table[fm] = {}
        for meth, rs in by[fm].items():
            splits = {"simple": _block([r for r in rs if r.get("mhtb_split") == "simple"]),
                      "complex": _block([r for r in rs if r.get("mhtb_split") == "complex"]),
                      "all": _block(rs)}
            people = {str(k): _block([r for r in rs if int(r.get("num_persons", 0)) == k])
                      for k in sorted({int(r.get("num_persons", 0)) for r in rs})}
            table[fm][meth] = {"splits": splits, "people": people,
                               "reference_problems": sum(1 for r in rs if r.get("mhtb_note"))}
    nc = dict(not_computed or {})
    if not any(isinstance(r.get("hps"), (int, float)) for r in mh):
        nc.setdefault("hps", "not computed: no HPSv2 weights given (bench run --hps PATH); nothing is downloaded")
    if not any(r.get("mhtb_action") for r in mh):
        nc.setdefault("action", "not computed: needs an MLLM (the release asks Gemini 2.0 Flash with an API key); "
                                "give a local one with bench run --action-scorer module:callable")
    return {"table": table, "not_computed": {k: v for k, v in nc.items() if k in ("hps", "action")},
            "num_simple": NUM_SIMPLE}


def _f(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


#: The main table's columns per split: (label, key).
TABLE_COLUMNS = (("Count Acc. ↑", "count_acc"), ("Hungarian ID ↑", "id_sim"), ("HPS ↑", "hps"),
                 ("Action ↑", "action"))


def markdown(mh: dict[str, Any] | None) -> list[str]:
    """The MultiHuman-Testbench section of report.md (empty when there is none)."""
    if not mh:
        return []
    lines = ["## MultiHuman-Testbench", "",
             "Layout of the paper's main table: per split (simple = prompts 0–1499, complex = 1500–1799, all) "
             "count accuracy, Hungarian ID similarity, HPS and the MLLM action score, computed as "
             "`benchmarking/compute_scores.py` does (means over the images that exist; an image without faces "
             "scores 0 ID; an unmatched person 0). Our face models, not the release's RetinaFace + antelopev2 "
             "on unaligned crops, so absolute values compare between methods here, not with the paper's.", ""]
    for k, v in mh["not_computed"].items():
        lines.append(f"- {'HPS' if k == 'hps' else 'Action'}: {v}")
    lines.append("")
    for fm, per in mh["table"].items():
        head = "| method | " + " | ".join(f"{lab} ({s[0].upper()})" for s in SPLITS for lab, _ in TABLE_COLUMNS) + " | n |"
        lines += [f"### face model {fm}", "", head, "|---|" + "---|" * (len(SPLITS) * len(TABLE_COLUMNS) + 1)]
        for meth, e in per.items():
            cells = [_f(e["splits"][s][key]) for s in SPLITS for _, key in TABLE_COLUMNS]
            lines.append(f"| {meth} | " + " | ".join(cells) + f" | {e['splits']['all']['images']} |")
        lines += ["", "Beside it, ours: Sim(Ref) (mean matched cosine over generated faces), identity confusion, "
                      "the ID similarity with an optimal assignment (the release's assignment is not always "
                      "optimal), missing outputs (left out, as the release does).", "",
                  "| method | split | Sim(Ref) | ID confusion | Hungarian ID (optimal) | missing | ref. problems |",
                  "|---|---|---|---|---|---|---|"]
        for meth, e in per.items():
            for s in SPLITS:
                b = e["splits"][s]
                if b["images"] or b["missing"]:
                    lines.append(f"| {meth} | {s} | {_f(b['sim_ref'])} | {_f(b['identity_confusion'])} | "
                                 f"{_f(b['id_sim_optimal'])} | {b['missing']} | "
                                 f"{e['reference_problems'] if s == 'all' else ''} |")
        lines += ["", "| method | people | n | Count Acc. | Hungarian ID | HPS | Sim(Ref) |", "|---|---|---|---|---|---|---|"]
        for meth, e in per.items():
            for k, b in e["people"].items():
                lines.append(f"| {meth} | {k} | {b['images']} | {_f(b['count_acc'])} | {_f(b['id_sim'])} | "
                             f"{_f(b['hps'])} | {_f(b['sim_ref'])} |")
        lines.append("")
    return lines


def html_section(mh: dict[str, Any] | None) -> str:
    """The MultiHuman-Testbench section of report.html (escaped; empty when there is none)."""
    import html as _h

    if not mh:
        return ""
    e = _h.escape
    parts = ["<h2 id='multihuman'>MultiHuman-Testbench</h2><p class='note'>Layout of the paper's main table, "
             "computed as <code>compute_scores.py</code> does (means over the images that exist; unmatched "
             "person = 0). simple = prompts 0–1499, complex = 1500–1799. Our face models, so values compare "
             "between methods here, not with the paper's.</p><ul class='note'>"]
    parts += [f"<li>{'HPS' if k == 'hps' else 'Action'}: {e(v)}</li>" for k, v in mh["not_computed"].items()]
    parts.append("</ul>")
    for fm, per in mh["table"].items():
        parts.append(f"<h3>face model {e(fm)}</h3><table class='multihuman'><thead><tr><th rowspan='2'>method</th>"
                     + "".join(f"<th colspan='{len(TABLE_COLUMNS)}'>{s}</th>" for s in SPLITS)
                     + "<th rowspan='2'>n</th></tr><tr>"
                     + "".join(f"<th>{e(lab)}</th>" for _ in SPLITS for lab, _k in TABLE_COLUMNS) + "</tr></thead><tbody>")
        for meth, ent in per.items():
            parts.append(f"<tr><td>{e(meth)}</td>" + "".join(
                f"<td class='num'>{_f(ent['splits'][s][key])}</td>" for s in SPLITS for _, key in TABLE_COLUMNS)
                + f"<td class='num'>{ent['splits']['all']['images']}</td></tr>")
        parts.append("</tbody></table><table><tr><th>method</th><th>people</th><th>n</th><th>Count Acc.</th>"
                     "<th>Hungarian ID</th><th>ID (optimal)</th><th>HPS</th><th>Sim(Ref)</th><th>ID confusion</th></tr>")
        for meth, ent in per.items():
            for k, b in ent["people"].items():
                parts.append(f"<tr><td>{e(meth)}</td><td>{k}</td><td class='num'>{b['images']}</td>"
                             + "".join(f"<td class='num'>{_f(b[key])}</td>" for key in
                                       ("count_acc", "id_sim", "id_sim_optimal", "hps", "sim_ref",
                                        "identity_confusion")) + "</tr>")
        parts.append("</table>")
    return "\n".join(parts)
