"""Training samples from MultiID-2M shards: face-preserving square crops, reference embeddings, prompts.

:class:`MultiIDTrainDataset` is a torch ``IterableDataset`` over ``withanyone.data.iter_samples`` (our
shards or the published ones). A sample that cannot be used (undecodable image, no/too many faces,
missing landmarks or embeddings of the wrong width, below the curated-subset score) is skipped and
counted in ``.skipped`` by reason, never raised. :func:`iter_batches` groups samples with the same number
of people into batches (the adapter takes one [B, N, 512] tensor per call).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset

#: Paired references (facts §3): try up to 20 random references, stop early above 0.8, reject below 0.6.
PAIR_TRIES, PAIR_EARLY_STOP, PAIR_MIN = 20, 0.8, 0.6

__all__ = ["TrainSample", "TrainBatch", "MultiIDTrainDataset", "square_crop", "count_prompt",
           "load_reference_bank", "iter_batches", "collate"]


@dataclass
class TrainSample:
    """One training image at the training resolution with its faces (pixels of the crop)."""

    key: str
    pixels: torch.Tensor  # [3, R, R] float in [-1, 1]
    boxes: np.ndarray  # [N, 4] x1, y1, x2, y2
    landmarks: np.ndarray  # [N, 5, 2] ArcFace order
    references: np.ndarray  # [N, D] unit-norm embeddings fed to the adapter
    names: list[str | None]
    prompt: str
    paired: bool


@dataclass
class TrainBatch:
    """A batch of samples with the same number of people N."""

    keys: list[str]
    pixels: torch.Tensor  # [B, 3, R, R]
    boxes: np.ndarray  # [B, N, 4]
    landmarks: np.ndarray  # [B, N, 5, 2]
    references: torch.Tensor  # [B, N, D]
    names: list[list[str | None]]
    prompts: list[str]

    @property
    def num_people(self) -> int:
        """N, people per image."""
        return int(self.boxes.shape[1])


def count_prompt(n: int) -> str:
    """Phase 1's prompt: "1 person", "2 people", …"""
    return "1 person" if n == 1 else f"{n} people"


def square_crop(size: tuple[int, int], boxes: np.ndarray) -> tuple[float, float, float]:
    """(x0, y0, side) of a square window keeping every face box inside when possible.

    The side is the image's short side; the window is centred on the faces' union and shifted to stay
    inside the image. If the union is wider (taller) than the short side, the window is the long side
    and reaches outside the image (padded with black), so no face is cut.
    """
    w, h = size
    ux1, uy1 = float(boxes[:, 0].min()), float(boxes[:, 1].min())
    ux2, uy2 = float(boxes[:, 2].max()), float(boxes[:, 3].max())
    side = float(min(w, h))
    if ux2 - ux1 > side or uy2 - uy1 > side:
        side = float(max(w, h))
    def place(lo: float, hi: float, extent: float) -> float:
        start = (lo + hi) / 2 - side / 2
        if side <= extent:
            start = min(max(start, 0.0), extent - side)
        else:  # window larger than this axis: centre the image in it
            start = (extent - side) / 2
        return start
    return place(ux1, ux2, w), place(uy1, uy2, h), side


def _crop_resize(image: np.ndarray, x0: float, y0: float, side: float, res: int) -> np.ndarray:
    s = res / side
    coeffs = (1 / s, 0.0, x0, 0.0, 1 / s, y0)  # output pixel → input pixel
    im = Image.fromarray(image).transform((res, res), Image.AFFINE, coeffs, resample=Image.BICUBIC, fillcolor=(0, 0, 0))
    return np.asarray(im)


def load_reference_bank(source: str | Path | Sequence[str | Path] | None, max_per_identity: int = 64,
                        seed: int = 0) -> dict[str, np.ndarray]:
    """identity id → (K, D) unit-norm reference embeddings from ``ref/tars`` shards (None → empty).

    At most ``max_per_identity`` embeddings are kept per identity (a seeded reservoir sample), so the
    published bank (~400 references per identity) fits in memory.
    """
    if source is None:
        return {}
    from withanyone.data import iter_references

    rng = random.Random(seed)
    bank: dict[str, list[np.ndarray]] = {}
    seen: Counter[str] = Counter()
    for ref in iter_references(source):
        if ref.identity is None or ref.embeddings.size == 0:
            continue
        for e in np.asarray(ref.embeddings, np.float32).reshape(-1, ref.embeddings.shape[-1]):
            seen[ref.identity] += 1
            kept = bank.setdefault(ref.identity, [])
            if len(kept) < max_per_identity:
                kept.append(e)
            else:
                j = rng.randrange(seen[ref.identity])
                if j < max_per_identity:
                    kept[j] = e
    return {k: _unit(np.stack(v)) for k, v in bank.items()}


def _unit(e: np.ndarray) -> np.ndarray:
    return (e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


class MultiIDTrainDataset(IterableDataset):
    """Endless, seeded stream of :class:`TrainSample` from MultiID-2M shards (skips bad samples, counts why)."""

    def __init__(self, shards: str | Path | Sequence[str | Path], resolution: int = 512, *, max_faces: int = 4,
                 embedding_dim: int = 512, prompt_mode: str = "count", text_dropout: float = 0.0,
                 paired_ratio: float = 0.0, references: dict[str, np.ndarray] | None = None,
                 min_aesthetics: float | None = None, landmark_detector: Any = None, seed: int = 0,
                 shuffle_buffer: int = 0, rank: int = 0, world_size: int = 1, epochs: int | None = None):
        self.shards = shards
        self.resolution = int(resolution)
        self.max_faces = max_faces
        self.embedding_dim = embedding_dim
        self.prompt_mode = prompt_mode
        self.text_dropout = text_dropout
        self.paired_ratio = paired_ratio
        self.references = references or {}
        self.min_aesthetics = min_aesthetics
        self.landmark_detector = landmark_detector
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.epochs = epochs
        #: reason → number of samples skipped (this process)
        self.skipped: Counter[str] = Counter()
        self.used = 0

    # ------------------------------------------------------------------ stream
    def __iter__(self) -> Iterator[TrainSample]:
        from withanyone.data.reader import _urls, parse_sample

        urls = _urls(self.shards)
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            rng = random.Random(f"{self.seed}:{epoch}")
            order = list(urls)
            if self.shuffle_buffer > 1:
                rng.shuffle(order)
            produced = 0
            for index, d in enumerate(self._raw(order, rng)):
                if index % self.world_size != self.rank:
                    continue
                sample = self._build(d, parse_sample, random.Random(f"{self.seed}:{epoch}:{index}"))
                if sample is not None:
                    produced += 1
                    self.used += 1
                    yield sample
            if produced == 0:
                return  # nothing usable: stop instead of spinning forever
            epoch += 1

    def _entries(self, urls: list[str]) -> Iterator[dict]:
        """Raw webdataset dicts shard by shard; a torn or unreadable shard loses only its remainder."""
        from withanyone.data.reader import _dataset

        for url in urls:
            it = iter(_dataset(url))
            while True:
                try:
                    d = next(it)
                except StopIteration:
                    break
                except Exception:  # truncated tar, unreadable file: count it, go on with the next shard
                    self.skipped["unreadable_shard"] += 1
                    break
                yield d

    def _raw(self, urls: list[str], rng: random.Random) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            yield from self._entries(urls)
            return
        buf: list[dict] = []
        for d in self._entries(urls):
            buf.append(d)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    # ------------------------------------------------------------------ one sample
    def _skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def _build(self, d: dict, parse: Any, rng: random.Random) -> TrainSample | None:
        try:
            s = parse(d)
        except Exception:
            return self._skip("bad_labels")
        if self.min_aesthetics is not None and (s.aesthetics_score is None or s.aesthetics_score < self.min_aesthetics):
            return self._skip("below_min_aesthetics")
        n = s.num_faces
        if n == 0:
            return self._skip("no_face")
        if n > self.max_faces:
            return self._skip("too_many_faces")
        if s.embeddings is None or s.embeddings.shape != (n, self.embedding_dim):
            return self._skip("embedding_dim")
        try:
            image = s.image()
        except Exception:
            return self._skip("undecodable_image")
        landmarks = self._landmarks(s, image)
        if landmarks is None:
            return self._skip("no_landmarks")
        h, w = image.shape[:2]
        x0, y0, side = square_crop((w, h), s.bboxes)
        scale = self.resolution / side
        pixels = _crop_resize(image, x0, y0, side, self.resolution)
        shift = np.array([x0, y0], np.float32)
        boxes = ((s.bboxes.reshape(n, 2, 2) - shift) * scale).reshape(n, 4).astype(np.float32)
        lms = ((landmarks - shift) * scale).astype(np.float32)
        boxes = np.clip(boxes, 0, self.resolution)
        if np.any(boxes[:, 2] - boxes[:, 0] < 1) or np.any(boxes[:, 3] - boxes[:, 1] < 1):
            return self._skip("face_outside_crop")
        refs, paired = self._references(s, rng)
        prompt = count_prompt(n) if self.prompt_mode == "count" or not s.caption else s.caption
        if self.text_dropout and rng.random() < self.text_dropout:
            prompt = ""
        t = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 127.5 - 1.0
        return TrainSample(s.key, t, boxes, lms, refs, list(s.names), prompt, paired)

    def _landmarks(self, s: Any, image: np.ndarray) -> np.ndarray | None:
        raw = s.labels.get("landmarks")
        if raw is not None:
            try:
                return np.asarray(raw, np.float32).reshape(s.num_faces, 5, 2)
            except ValueError:
                return None
        if self.landmark_detector is None:
            return None
        faces = self.landmark_detector.detect(image, embed=False)  # GT landmarks by detection, matched to the label boxes
        out = []
        for box in s.bboxes:
            best, best_iou = None, 0.3
            for f in faces:
                iou = _iou(box, np.asarray(f.bbox))
                if iou > best_iou and f.landmarks is not None:
                    best, best_iou = f, iou
            if best is None:
                return None
            out.append(np.asarray(best.landmarks, np.float32))
        return np.stack(out)

    def _references(self, s: Any, rng: random.Random) -> tuple[np.ndarray, bool]:
        """Own embeddings, or (paired) per identified face the release's pick: of up to 20 random other
        references the most similar to this face, stopping early above 0.8, none if all are below 0.6."""
        own = _unit(np.asarray(s.embeddings, np.float32))
        if not self.paired_ratio or rng.random() >= self.paired_ratio:
            return own, False
        refs, paired = own.copy(), False
        for i, name in enumerate(s.names):
            bank = self.references.get(name) if name is not None else None
            if bank is None:
                continue
            sims = bank @ own[i]
            order = [k for k in rng.sample(range(len(bank)), len(bank)) if sims[k] < 0.999][:PAIR_TRIES]
            best = None  # sims ≥ 0.999: this very photo's face (identical embedding), not another photo
            for k in order:
                if sims[k] >= PAIR_MIN and (best is None or sims[k] > sims[best]):
                    best = k
                if sims[k] > PAIR_EARLY_STOP:
                    break
            if best is not None:
                refs[i] = bank[best]
                paired = True
        return refs, paired


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def collate(samples: Sequence[TrainSample]) -> TrainBatch:
    """Stack samples that share the number of people."""
    return TrainBatch(
        keys=[s.key for s in samples],
        pixels=torch.stack([s.pixels for s in samples]),
        boxes=np.stack([s.boxes for s in samples]),
        landmarks=np.stack([s.landmarks for s in samples]),
        references=torch.from_numpy(np.stack([s.references for s in samples])),
        names=[list(s.names) for s in samples],
        prompts=[s.prompt for s in samples],
    )


def iter_batches(samples: Iterator[TrainSample] | IterableDataset, batch_size: int) -> Iterator[TrainBatch]:
    """Batches of ``batch_size`` samples with equal face counts (one bucket per count, filled in order)."""
    buckets: dict[int, list[TrainSample]] = {}
    for s in samples:
        b = buckets.setdefault(len(s.boxes), [])
        b.append(s)
        if len(b) == batch_size:
            yield collate(b)
            buckets[len(s.boxes)] = []
