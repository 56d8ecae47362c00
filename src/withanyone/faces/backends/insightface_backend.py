"""insightface model packs (antelopev2, buffalo_l) on onnxruntime, without importing ``insightface``.

Detection is SCRFD: the image is letterboxed into ``det_size`` (resized keeping its aspect ratio, placed
top-left on black), normalised as ``(x − 127.5) / 128`` in RGB, and each stride's outputs are decoded around
anchor centres ``(x·s, y·s)`` (``num_anchors`` per location, inferred from the output sizes): boxes are
``centre ∓ distance·s``, keypoints ``centre + offset·s``; scores ≥ ``det_thresh`` survive, then NMS, then
everything is divided by the letterbox scale back into image pixels. Recognition is ArcFace: each face is
warped to the 112×112 template by a 5-point similarity transform, normalised (mean 0 / std 1 when the graph
starts with ``Sub`` and ``Mul`` nodes, i.e. it normalises itself, else 127.5 / 127.5), and embedded in one
batched run; embeddings are unit-normed float32.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...errors import ModelNotFoundError
from ..align import align_face
from ..packs import SCRFD_LAYOUTS, ModelInfo, ModelPack, load_pack
from ..types import Face, l2_normalize
from .base import FaceBackend

#: SCRFD input normalisation: blob = (pixel − mean) / std, RGB.
DET_MEAN, DET_STD = 127.5, 128.0


class InsightFaceBackend(FaceBackend):
    """SCRFD detector + ArcFace recognizer from an insightface-format pack, run on onnxruntime.

    ``pack`` is a folder, a name under ``~/.insightface/models`` (``"antelopev2"``, ``"buffalo_l"``) or a
    hub repo id. ``det_size`` (w, h) is the detector's input (ignored when the model's input size is fixed);
    ``providers`` defaults to ``["CPUExecutionProvider"]``; ``intra_op_threads`` caps onnxruntime's threads
    per session (``None``: onnxruntime's default, all cores; use 1 when running several worker processes).
    """

    name = "insightface"
    # ArcFace cosine of unit embeddings: pairs of different people concentrate around 0 (|cos| rarely above
    # ~0.3 for glintr100 / w600k_r50), photos of the same person mostly fall at 0.5–0.8. 0.4 sits between the
    # two and is the value commonly used with antelopev2/buffalo_l (MultiID-2M assigns faces to identities at
    # 0.4–0.5). Not re-measured here: no real pack is available offline.
    same_person_threshold = 0.4

    def __init__(self, pack: str | os.PathLike = "antelopev2", det_size: Sequence[int] = (640, 640),
                 det_thresh: float = 0.5, nms_thresh: float = 0.4, providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None, detector: str | None = None, recognizer: str | None = None):
        det_size = _check_size(det_size)
        if not 0.0 <= float(det_thresh) <= 1.0:
            raise ValueError(f"det_thresh must lie in [0, 1], got {det_thresh}")
        if not 0.0 < float(nms_thresh) <= 1.0:
            raise ValueError(f"nms_thresh must lie in (0, 1], got {nms_thresh}")
        if intra_op_threads is not None and int(intra_op_threads) < 1:
            raise ValueError(f"intra_op_threads must be ≥ 1 or None, got {intra_op_threads}")
        self.pack: ModelPack = load_pack(pack, detector=detector, recognizer=recognizer)
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.intra_op_threads = None if intra_op_threads is None else int(intra_op_threads)
        self.detector = ScrfdDetector(self.pack.model(self.pack.detector), self._session(self.pack.detector),
                                      det_size=det_size, det_thresh=float(det_thresh), nms_thresh=float(nms_thresh))
        self.recognizer = ArcFaceRecognizer(self.pack.model(self.pack.recognizer),
                                            self._session(self.pack.recognizer))
        self.embedding_dim = self.recognizer.embedding_dim

    def _session(self, path: Path) -> Any:
        return make_session(path, self.providers, self.intra_op_threads)

    def spec(self) -> dict:
        """Rebuild arguments for worker processes: the resolved pack folder (no second hub look-up) and, when
        unset, one onnxruntime thread per worker (workers run side by side; more would oversubscribe cores)."""
        return {"backend": "insightface", "pack": str(self.pack.folder), "det_size": list(self.detector.det_size),
                "det_thresh": self.detector.det_thresh, "nms_thresh": self.detector.nms_thresh,
                "providers": list(self.providers), "intra_op_threads": self.intra_op_threads or 1,
                "detector": self.pack.detector.name, "recognizer": self.pack.recognizer.name}

    def detect(self, image: np.ndarray, *, embed: bool = True) -> list[Face]:
        image = _as_rgb(image)
        boxes, scores, kps = self.detector.detect(image)
        h, w = image.shape[:2]
        faces = []
        for raw, score, pts in zip(boxes, scores, kps, strict=True):
            box = np.clip(raw, 0, [w, h, w, h])
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                continue
            # the unclipped box (it may reach past the photo): the release squares it before clipping
            faces.append(Face(bbox=box, score=float(score), landmarks=pts, backend=self.name,
                              extra={"raw_bbox": np.asarray(raw, np.float32)}))
        faces.sort(key=lambda f: -f.area)
        if embed:
            self.embed(image, faces)
        return faces

    def embed(self, image: np.ndarray, faces: list[Face]) -> list[Face]:
        if not faces:
            return faces
        image = _as_rgb(image)
        size = self.recognizer.input_size
        crops = np.stack([align_face(image, f.landmarks, size) for f in faces])
        raw = self.recognizer.embed_crops(crops, normalize=False)
        # The release feeds insightface's raw (unnormalised) ``embedding`` to the adapter, whose first layer is
        # not scale-invariant: keep the norm so the pipeline can restore it.
        norms = np.linalg.norm(raw, axis=1)
        for f, v, n in zip(faces, l2_normalize(raw), norms, strict=True):
            f.embedding = v
            f.extra["embedding_norm"] = float(n)
        return faces


class ScrfdDetector:
    """One SCRFD ONNX model: letterbox → blob → run → decode every stride → NMS → image pixels."""

    def __init__(self, info: ModelInfo, session: Any, det_size: tuple[int, int] = (640, 640),
                 det_thresh: float = 0.5, nms_thresh: float = 0.4):
        n_out = len(session.get_outputs())
        if n_out not in SCRFD_LAYOUTS:
            raise ModelNotFoundError(f"{info.path} is not an SCRFD detector: {n_out} outputs (want 6, 9, 10 or 15)")
        self.path = info.path
        self.session = session
        self.strides, self.use_kps = SCRFD_LAYOUTS[n_out]
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        fixed = inp.shape[2:4]
        if all(isinstance(v, int) and v > 0 for v in fixed):
            det_size = (int(fixed[1]), int(fixed[0]))  # the model's own input size wins, as in insightface
        self.det_size = _check_size(det_size, multiple=max(self.strides))
        self.det_thresh = det_thresh
        self.nms_thresh = nms_thresh
        self.batched = len(session.get_outputs()[0].shape) == 3
        self._centres: dict[tuple[int, int, int, int], np.ndarray] = {}

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes (N, 4), scores (N,), keypoints (N, 5, 2) in ``image`` pixels, highest score first, after NMS."""
        canvas, scale = letterbox(image, self.det_size)
        boxes, scores, kps = self.forward(canvas)
        if len(scores) == 0:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32)
        order = np.argsort(-scores, kind="stable")
        boxes, scores, kps = boxes[order] / scale, scores[order], kps[order] / scale
        keep = nms(boxes, scores, self.nms_thresh)
        return boxes[keep].astype(np.float32), scores[keep].astype(np.float32), kps[keep].astype(np.float32)

    def forward(self, canvas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decoded candidates on a ``det_size`` canvas (RGB uint8), scores ≥ ``det_thresh``, before NMS."""
        blob = ((canvas.astype(np.float32) - DET_MEAN) / DET_STD).transpose(2, 0, 1)[None]
        outs = self.session.run(None, {self.input_name: np.ascontiguousarray(blob)})
        height, width = blob.shape[2:]
        fmc = len(self.strides)
        all_boxes, all_scores, all_kps = [], [], []
        for idx, stride in enumerate(self.strides):
            pick = (lambda a: a[0]) if self.batched else (lambda a: a)
            scores = pick(outs[idx]).reshape(-1)
            dist = pick(outs[idx + fmc]).reshape(-1, 4) * stride
            h, w = height // stride, width // stride
            if len(scores) % (h * w) or len(dist) != len(scores):
                raise ValueError(f"{self.path}: stride {stride} outputs hold {len(scores)} scores and {len(dist)} "
                                 f"boxes, not a multiple of its {h}×{w} grid")
            centres = self.anchor_centres(h, w, stride, len(scores) // (h * w))
            pos = np.flatnonzero(scores >= self.det_thresh)
            all_scores.append(scores[pos])
            all_boxes.append(distance2bbox(centres[pos], dist[pos]))
            if self.use_kps:
                off = pick(outs[idx + 2 * fmc]).reshape(len(scores), -1) * stride
                all_kps.append(distance2kps(centres[pos], off[pos]).reshape(len(pos), off.shape[1] // 2, 2))
        boxes = np.concatenate(all_boxes).astype(np.float64)
        scores = np.concatenate(all_scores).astype(np.float64)
        kps = np.concatenate(all_kps).astype(np.float64) if self.use_kps else np.zeros((len(scores), 5, 2))
        return boxes, scores, kps

    def anchor_centres(self, h: int, w: int, stride: int, num_anchors: int) -> np.ndarray:
        """Cached :func:`anchor_centres`."""
        key = (h, w, stride, num_anchors)
        if key not in self._centres:
            self._centres[key] = anchor_centres(h, w, stride, num_anchors)
        return self._centres[key]


class ArcFaceRecognizer:
    """One ArcFace ONNX model: aligned RGB crops (N, S, S, 3) uint8 → unit-norm embeddings (N, D) float32."""

    def __init__(self, info: ModelInfo, session: Any):
        self.path = info.path
        self.session = session
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self.input_size = int(inp.shape[2])
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        self.input_mean, self.input_std = arcface_normalisation(info.first_nodes)
        width = session.get_outputs()[0].shape[-1]
        if not isinstance(width, int):
            probe = np.zeros((self.batch or 1, 3, self.input_size, self.input_size), np.float32)
            width = int(session.run(None, {self.input_name: probe})[0].shape[-1])
        self.embedding_dim = int(width)

    def embed_crops(self, crops: np.ndarray, normalize: bool = True) -> np.ndarray:
        """Embed aligned crops in as few runs as the model's batch dimension allows (unit-norm unless told)."""
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(f"{self.path}: crops must be (N, {self.input_size}, {self.input_size}, 3), "
                             f"got {crops.shape}")
        blob = ((crops.astype(np.float32) - self.input_mean) / self.input_std).transpose(0, 3, 1, 2)
        step = self.batch or len(blob)
        outs = [self.session.run(None, {self.input_name: np.ascontiguousarray(blob[i:i + step])})[0]
                for i in range(0, len(blob), step)]
        out = np.concatenate(outs).reshape(len(blob), -1).astype(np.float32)
        return l2_normalize(out) if normalize else out


# ----------------------------------------------------------------------------- decoding building blocks


def make_session(path: str | os.PathLike, providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None) -> Any:
    """An onnxruntime session (CPU provider unless told otherwise); a broken file → ModelNotFoundError."""
    import onnxruntime as ort  # noqa: PLC0415 — heavy import kept inside

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if intra_op_threads:
        opts.intra_op_num_threads = int(intra_op_threads)
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=opts,
                                    providers=list(providers) if providers else ["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 — onnxruntime raises its own exception types
        raise ModelNotFoundError(f"cannot load ONNX model {path}: {exc}") from exc


def letterbox(image: np.ndarray, det_size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Resize keeping the aspect ratio to fit ``det_size`` = (w, h), pad bottom/right with black.

    Returns the canvas and the scale (new height / image height) that maps image pixels onto it.
    """
    h, w = image.shape[:2]
    dw, dh = det_size
    if h / w > dh / dw:
        new_h = dh
        new_w = max(1, int(new_h / (h / w)))
    else:
        new_w = dw
        new_h = max(1, int(new_w * (h / w)))
    scale = new_h / h
    resized = image if (new_w, new_h) == (w, h) else np.asarray(
        Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), Image.BILINEAR))
    canvas = np.zeros((dh, dw, 3), np.uint8)
    canvas[:new_h, :new_w] = resized
    return canvas, scale


def anchor_centres(h: int, w: int, stride: int, num_anchors: int = 2) -> np.ndarray:
    """Anchor centres (x·stride, y·stride) row-major over an h×w grid, each repeated ``num_anchors`` times."""
    ys, xs = np.mgrid[:h, :w]
    centres = (np.stack([xs, ys], axis=-1).reshape(-1, 2) * stride).astype(np.float32)
    return np.repeat(centres, num_anchors, axis=0) if num_anchors > 1 else centres


def distance2bbox(centres: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Boxes (x1, y1, x2, y2) from centres and (left, top, right, bottom) distances."""
    return np.stack([centres[:, 0] - dist[:, 0], centres[:, 1] - dist[:, 1],
                     centres[:, 0] + dist[:, 2], centres[:, 1] + dist[:, 3]], axis=-1)


def distance2kps(centres: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Keypoints (x0, y0, x1, y1, …) from centres and per-point (dx, dy) offsets."""
    out = offsets.astype(np.float64).copy()
    out[:, 0::2] += centres[:, :1]
    out[:, 1::2] += centres[:, 1:2]
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> np.ndarray:
    """Greedy non-maximum suppression (insightface's pixel-inclusive areas); indices kept, best first."""
    x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) for i in range(4))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep: list[int] = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = iw * ih
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= thresh]
    return np.asarray(keep, dtype=np.int64)


def arcface_normalisation(first_nodes: Sequence[str]) -> tuple[float, float]:
    """(mean, std) to feed an ArcFace graph: (0, 1) when it starts with Sub and Mul nodes, else (127.5, 127.5)."""
    has_sub = any(n.startswith(("Sub", "_minus")) for n in first_nodes)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in first_nodes)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


def _check_size(size: Sequence[int], multiple: int = 32) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"det_size must be (width, height), got {size!r}") from None
    if w <= 0 or h <= 0 or w % multiple or h % multiple:
        raise ValueError(f"det_size must be positive multiples of {multiple}, got {(w, h)}")
    return w, h


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}; "
                         "use withanyone.faces.load_image")
    return np.ascontiguousarray(image)
