"""Training samples from MultiID-2M shards: face-preserving square crops, reference embeddings, prompts.

:class:`MultiIDTrainDataset` is a torch ``IterableDataset`` over ``withanyone.data.iter_samples`` (our
shards or the published ones). A sample that cannot be used (undecodable image, no/too many faces,
missing landmarks or embeddings of the wrong width, below the curated-subset score) is skipped and
counted in ``.skipped`` by reason, never raised.

Distribution: shards are split by rank with webdataset's ``split_by_node`` and by DataLoader worker with
``split_by_worker`` (each worker is one *slot*). :class:`BatchStream` collates padded batches inside the
worker (1–4 people per image, ``people`` mask), tags each with its slot and stream position, and
:func:`batch_loader` hands them to the training process in a fixed round-robin slot order, so a run is
reproducible for a given worker count and resumes by *skipping* each slot's consumed raw entries without
decoding them.

Aspect-ratio buckets (``buckets``, off by default: the release trains square crops): each sample is cropped
to the bucket nearest its photo's aspect ratio (:func:`aspect_buckets`, :func:`bucket_crop`), and
:class:`BatchStream` keeps one pending queue per bucket in each worker, emitting a batch when a queue
holds ``batch_size`` samples, so every batch holds one bucket only. Each such batch also records the
stream positions of the samples still pending in the worker's other queues; a resume re-reads (and
re-decodes) exactly those entries, so the queues are rebuilt as they were, and skips the rest undecoded.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset

logger = logging.getLogger(__name__)

#: Aspect ratios (width:height) of the buckets: square, 4:3, 3:2, 16:9 and their portrait twins.
ASPECT_RATIOS: tuple[tuple[int, int], ...] = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16))

#: Paired references (facts §3): try up to 20 random references, stop early above 0.8, reject below 0.6.
PAIR_TRIES, PAIR_EARLY_STOP, PAIR_MIN = 20, 0.8, 0.6

__all__ = ["TrainSample", "TrainBatch", "MultiIDTrainDataset", "BatchStream", "batch_loader", "square_crop",
           "ASPECT_RATIOS", "aspect_buckets", "nearest_bucket", "bucket_crop", "count_prompt", "load_reference_bank", "iter_batches", "collate"]


@dataclass
class TrainSample:
    """One training image at the training resolution with its faces (pixels of the crop)."""

    key: str
    pixels: torch.Tensor  # [3, R, R] float in [-1, 1] ([3, H, W]: the sample's bucket, with buckets on)
    boxes: np.ndarray  # [N, 4] x1, y1, x2, y2
    landmarks: np.ndarray  # [N, 5, 2] ArcFace order
    references: np.ndarray  # [N, D] embeddings fed to the adapter, at their stored (raw insightface) norm
    names: list[str | None]
    prompt: str
    paired: bool
    gt_embeddings: np.ndarray | None = None  # [N, D] the label's stored GT embeddings (InfoNCE positives)
    face_crops: list[np.ndarray] | None = None  # per face, the square RGB crop SigLIP sees (``siglip_crop``)


@dataclass
class TrainBatch:
    """A batch of samples padded to the largest number of people N; ``people[b, j]`` marks real faces."""

    keys: list[str]
    pixels: torch.Tensor  # [B, 3, R, R]
    boxes: np.ndarray  # [B, N, 4] (padded people: zeros)
    landmarks: np.ndarray  # [B, N, 5, 2]
    references: torch.Tensor  # [B, N, D]
    names: list[list[str | None]]  # per image, its real people only
    prompts: list[str]
    people: torch.Tensor | None = None  # [B, N] bool; None: every slot is a real person
    gt_embeddings: torch.Tensor | None = None  # [B, N, D] stored GT embeddings
    #: where this batch ends in its worker's stream: (slot, epoch, raw entries read this epoch)
    position: tuple[int, int, int] | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # the worker's cumulative skip counts
    #: buckets on: (epoch, raw position) of the samples still pending in the worker's other bucket queues
    pending: list[list[int]] | None = None
    face_crops: list[list[np.ndarray]] | None = None  # per image, per real face: SigLIP's input crop

    @property
    def num_people(self) -> int:
        """N, people per image (after padding)."""
        return int(self.boxes.shape[1])

    @property
    def mask(self) -> torch.Tensor:
        """[B, N] bool: real (not padded) people."""
        if self.people is None:
            return torch.ones(self.boxes.shape[:2], dtype=torch.bool)
        return self.people


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


def aspect_buckets(resolution: int, ratios: Sequence[tuple[int, int]] = ASPECT_RATIOS) -> list[tuple[int, int]]:
    """(height, width) of each bucket: about ``resolution``² pixels at each ratio, sides multiples of 16 (deduplicated)."""
    out: list[tuple[int, int]] = []
    for rw, rh in ratios:
        r = math.sqrt(rw / rh)
        hw = (max(16, round(resolution / r / 16) * 16), max(16, round(resolution * r / 16) * 16))
        if hw not in out:
            out.append(hw)
    return out


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) bucket whose aspect ratio is nearest (in log ratio) to a ``(w, h)`` photo's."""
    w, h = size
    a = math.log(w / h)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - a))


def bucket_crop(size: tuple[int, int], boxes: np.ndarray, aspect: float) -> tuple[float, float, float, float]:
    """(x0, y0, width, height) of a window of aspect ``aspect`` (w/h) keeping every face box inside.

    The window is the largest of that aspect inside the image, centred on the faces' union and shifted
    to stay inside; if the union does not fit, the window grows (same aspect) just enough to hold it and
    reaches outside the image (padded with black), so no face is cut.
    """
    w, h = size
    ux1, uy1 = float(boxes[:, 0].min()), float(boxes[:, 1].min())
    ux2, uy2 = float(boxes[:, 2].max()), float(boxes[:, 3].max())
    cw = min(float(w), h * aspect)
    ch = cw / aspect
    grow = max(1.0, (ux2 - ux1) / cw, (uy2 - uy1) / ch)
    cw, ch = cw * grow, ch * grow

    def place(lo: float, hi: float, extent: float, side: float) -> float:
        start = (lo + hi) / 2 - side / 2
        if side <= extent:
            return min(max(start, 0.0), extent - side)
        return min(max(start, extent - side), 0.0)  # window larger than this axis: keep the faces, cover the image

    return place(ux1, ux2, w, cw), place(uy1, uy2, h, ch), cw, ch


def _crop_resize(image: np.ndarray, x0: float, y0: float, side: float, res: int,
                 out: tuple[int, int] | None = None) -> np.ndarray:
    s = res / side
    coeffs = (1 / s, 0.0, x0, 0.0, 1 / s, y0)  # output pixel → input pixel
    im = Image.fromarray(image).transform(out or (res, res), Image.AFFINE, coeffs, resample=Image.BICUBIC,
                                          fillcolor=(0, 0, 0))
    return np.asarray(im)


def load_reference_bank(source: str | Path | Sequence[str | Path] | None, max_per_identity: int = 64,
                        seed: int = 0) -> dict[str, np.ndarray]:
    """identity id → (K, D) reference embeddings (as stored: raw norm) from ``ref/tars`` shards (None → empty).

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
    return {k: np.stack(v).astype(np.float32) for k, v in bank.items()}


def _unit(e: np.ndarray) -> np.ndarray:
    return (e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


class MultiIDTrainDataset(IterableDataset):
    """Endless, seeded stream of :class:`TrainSample` from MultiID-2M shards (skips bad samples, counts why)."""

    def __init__(self, shards: str | Path | Sequence[str | Path], resolution: int = 512, *, max_faces: int = 4,
                 embedding_dim: int = 512, prompt_mode: str = "count", text_dropout: float = 0.0,
                 paired_ratio: float = 0.0, references: dict[str, np.ndarray] | None = None,
                 min_aesthetics: float | None = None, landmark_detector: Any = None, seed: int = 0,
                 shuffle_buffer: int = 0, rank: int | None = None, world_size: int | None = None,
                 epochs: int | None = None, start: dict[int, tuple[int, int]] | None = None,
                 siglip_crop: int | None = None, buckets: Sequence[tuple[int, int]] | None = None,
                 pending: dict[int, Sequence[Sequence[int]]] | None = None):
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
        #: None: webdataset's ``split_by_node`` reads the rank from torch.distributed / RANK, WORLD_SIZE
        self.rank, self.world_size = rank, world_size
        self.epochs = epochs
        #: when set, each sample carries its faces' square crops at this size (the SigLIP branch's input)
        self.siglip_crop = siglip_crop
        #: slot → (epoch, raw entries already consumed in it): resume skips them without decoding
        self.start = dict(start or {})
        #: (height, width) aspect-ratio buckets (None: square ``resolution`` crops, the release's)
        self.buckets = [tuple(int(v) for v in b) for b in buckets] if buckets else None
        #: slot → (epoch, raw position) of entries before ``start`` that resume re-reads (pending in a bucket)
        self.pending = {int(k): {(int(e), int(p)) for e, p in v} for k, v in (pending or {}).items()}
        #: reason → number of samples skipped (this process / worker)
        self.skipped: Counter[str] = Counter()
        #: slot → that worker's latest skip counts, as seen by :func:`batch_loader` in the training process
        self.slot_skipped: dict[int, dict[str, int]] = {}
        self.used = 0

    def skip_counts(self) -> dict[str, int]:
        """Skips so far over every worker (this process's own count when loading in-process)."""
        total: Counter[str] = Counter()
        for counts in self.slot_skipped.values():
            total.update(counts)
        return dict(total) if self.slot_skipped else dict(self.skipped)

    # ------------------------------------------------------------------ stream
    def _split(self, urls: list[str]) -> list[str]:
        """This rank's and this DataLoader worker's shards (webdataset's splitters)."""
        import webdataset as wds

        if self.rank is None or self.world_size is None:
            mine = list(wds.split_by_node(urls))
        else:  # an explicit rank (replaying another rank's stream in one process): split_by_node's rule
            mine = list(itertools.islice(urls, self.rank, None, self.world_size))
        return list(wds.split_by_worker(mine))

    def __iter__(self) -> Iterator[TrainSample]:
        for sample, _ in self.stream():
            yield sample

    def stream(self) -> Iterator[tuple[TrainSample, tuple[int, int, int]]]:
        """(sample, (slot, epoch, raw entries read this epoch)) for this rank and worker."""
        from withanyone.data.reader import _urls, parse_sample

        info = torch.utils.data.get_worker_info()
        slot = info.id if info is not None else 0
        rank = self.rank if self.rank is not None else _node_rank()
        urls = _urls(self.shards)
        resume_epoch, skip = self.start.get(slot, (0, 0))
        replay = self.pending.get(slot, set())
        epoch = min([resume_epoch, *(e for e, _ in replay)])  # a pending entry may lie in an earlier epoch
        while self.epochs is None or epoch < self.epochs:
            done = skip if epoch == resume_epoch else (0 if epoch > resume_epoch else math.inf)
            order = list(urls)
            if self.shuffle_buffer > 1:
                random.Random(f"{self.seed}:{epoch}").shuffle(order)  # same order on every rank, then split
            rng = random.Random(f"{self.seed}:{epoch}:{rank}:{slot}")
            produced = raw = 0
            for pos, d in enumerate(self._raw(self._split(order), rng), start=1):
                raw = pos
                if pos <= done and (epoch, pos) not in replay:
                    continue  # consumed before the checkpoint: read past, never decoded
                sample = self._build(d, parse_sample, random.Random(f"{self.seed}:{epoch}:{rank}:{slot}:{pos}"))
                if sample is not None:
                    if pos > done:
                        produced += 1
                    self.used += 1
                    yield sample, (slot, epoch, pos)
            if epoch >= resume_epoch and produced == 0 and (done == 0 or raw < done):
                return  # nothing usable (or no shard for this worker): stop instead of spinning forever
            epoch += 1

    def _entries(self, urls: list[str]) -> Iterator[dict]:
        """Raw webdataset dicts shard by shard; a torn or unreadable shard loses only its remainder.

        ``urls`` are already this rank's and worker's (:meth:`_split`), so each one-shard reader splits
        nothing further (webdataset's default ``single_node_only`` would raise under several processes).
        """
        import webdataset as wds

        for url in urls:
            it = iter(wds.WebDataset(url, shardshuffle=False, empty_check=False, nodesplitter=None,
                                     workersplitter=None))
            while True:
                try:
                    d = next(it)
                except StopIteration:
                    break
                except Exception as exc:  # truncated tar, unreadable file: count it, go on with the next shard
                    logger.warning("%s: unreadable shard (%s); its remaining samples are skipped", url, exc)
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
        if self.buckets:
            out_h, out_w = nearest_bucket((w, h), self.buckets)
            x0, y0, side, _ = bucket_crop((w, h), s.bboxes, out_w / out_h)
            scale = out_w / side
            pixels = _crop_resize(image, x0, y0, side, out_w, (out_w, out_h))
        else:
            x0, y0, side = square_crop((w, h), s.bboxes)
            out_h = out_w = self.resolution
            scale = self.resolution / side
            pixels = _crop_resize(image, x0, y0, side, self.resolution)
        shift = np.array([x0, y0], np.float32)
        boxes = ((s.bboxes.reshape(n, 2, 2) - shift) * scale).reshape(n, 4).astype(np.float32)
        lms = ((landmarks - shift) * scale).astype(np.float32)
        boxes = np.clip(boxes, 0, [out_w, out_h, out_w, out_h])
        if np.any(boxes[:, 2] - boxes[:, 0] < 1) or np.any(boxes[:, 3] - boxes[:, 1] < 1):
            return self._skip("face_outside_crop")
        stored = np.asarray(s.embeddings, np.float32)
        refs, paired = self._references(s, stored, rng)
        prompt = count_prompt(n) if self.prompt_mode == "count" or not s.caption else s.caption
        if self.text_dropout and rng.random() < self.text_dropout:
            prompt = ""
        t = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 127.5 - 1.0
        crops = None
        if self.siglip_crop:  # cut from the original photo with generation's crop (pipeline.references)
            from withanyone.pipeline.references import square_crop as face_square

            try:
                crops = [face_square(image, box, self.siglip_crop) for box in s.bboxes]
            except ValueError:
                return self._skip("face_outside_crop")
        return TrainSample(s.key, t, boxes, lms, refs, list(s.names), prompt, paired, stored, crops)

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

    def _references(self, s: Any, stored: np.ndarray, rng: random.Random) -> tuple[np.ndarray, bool]:
        """Own embeddings, or (paired) per identified face the release's pick: of up to 20 random other
        references the most similar to this face, stopping early above 0.8, none if all are below 0.6.

        Embeddings keep their stored norm (insightface's raw ``embedding``, norm ≈ 20–30): generation feeds
        the adapter that scale (``pipeline.references.face_arcface``), and its input MLP is not scale-invariant.
        """
        own = _unit(stored)
        if not self.paired_ratio or rng.random() >= self.paired_ratio:
            return stored.copy(), False
        refs, paired = stored.copy(), False
        for i, name in enumerate(s.names):
            bank = self.references.get(name) if name is not None else None
            if bank is None:
                continue
            sims = _unit(bank) @ own[i]
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


def collate(samples: Sequence[TrainSample], max_people: int | None = None) -> TrainBatch:
    """Stack samples, padding people to the largest count (zero boxes/embeddings, ``people`` mask False)."""
    n = max(max(len(x.boxes) for x in samples), max_people or 0)
    b = len(samples)
    d = samples[0].references.shape[-1]
    boxes = np.zeros((b, n, 4), np.float32)
    lms = np.zeros((b, n, 5, 2), np.float32)
    refs = np.zeros((b, n, d), np.float32)
    gts = np.zeros((b, n, d), np.float32)
    people = np.zeros((b, n), bool)
    for i, x in enumerate(samples):
        k = len(x.boxes)
        boxes[i, :k], lms[i, :k], refs[i, :k], people[i, :k] = x.boxes, x.landmarks, x.references, True
        gts[i, :k] = x.gt_embeddings if x.gt_embeddings is not None else x.references
    return TrainBatch(
        keys=[x.key for x in samples],
        pixels=torch.stack([x.pixels for x in samples]),
        boxes=boxes,
        landmarks=lms,
        references=torch.from_numpy(refs),
        names=[list(x.names) for x in samples],
        prompts=[x.prompt for x in samples],
        people=torch.from_numpy(people),
        gt_embeddings=torch.from_numpy(gts),
        face_crops=[x.face_crops for x in samples] if all(x.face_crops is not None for x in samples) else None,
    )


def iter_batches(samples: Iterable[TrainSample], batch_size: int) -> Iterator[TrainBatch]:
    """Consecutive ``batch_size`` samples, padded to the largest number of people (a short tail is dropped)."""
    buf: list[TrainSample] = []
    for s in samples:
        buf.append(s)
        if len(buf) == batch_size:
            yield collate(buf)
            buf = []


@dataclass
class _SlotEnd:
    """A worker's last item: its slot is exhausted (epochs reached or no usable data)."""

    slot: int
    skipped: dict[str, int]


class BatchStream(IterableDataset):
    """Padded batches collated inside each DataLoader worker, tagged with slot, stream position and skips
    (with buckets: one queue per bucket, single-bucket batches, and the other queues' pending positions)."""

    def __init__(self, dataset: MultiIDTrainDataset, batch_size: int):
        self.dataset, self.batch_size = dataset, int(batch_size)

    def __iter__(self) -> Iterator[TrainBatch | _SlotEnd]:
        info = torch.utils.data.get_worker_info()
        slot = info.id if info is not None else 0
        if self.dataset.buckets:
            yield from self._bucketed(slot)
            return
        buf: list[TrainSample] = []
        for sample, pos in self.dataset.stream():
            buf.append(sample)
            if len(buf) == self.batch_size:
                batch = collate(buf)
                batch.position, batch.skipped = pos, dict(self.dataset.skipped)
                buf = []
                yield batch
        yield _SlotEnd(slot, dict(self.dataset.skipped))

    def _bucketed(self, slot: int) -> Iterator[TrainBatch | _SlotEnd]:
        queues: dict[tuple[int, ...], list[tuple[TrainSample, list[int]]]] = {}
        for sample, pos in self.dataset.stream():
            queue = queues.setdefault(tuple(sample.pixels.shape[-2:]), [])
            queue.append((sample, [pos[1], pos[2]]))
            if len(queue) == self.batch_size:
                batch = collate([x for x, _ in queue])
                queue.clear()
                batch.position, batch.skipped = pos, dict(self.dataset.skipped)
                batch.pending = sorted(p for q in queues.values() for _, p in q)
                yield batch
        yield _SlotEnd(slot, dict(self.dataset.skipped))


def _keep(item: Any) -> Any:
    return item


def batch_loader(dataset: MultiIDTrainDataset, batch_size: int, num_workers: int = 0,
                 first_slot: int = 0) -> Iterator[TrainBatch]:
    """Batches from ``num_workers`` DataLoader workers (0: in this process) in round-robin slot order from
    ``first_slot``, so the sequence does not depend on worker timing and a resume continues it exactly."""
    from torch.utils.data import DataLoader

    stream = BatchStream(dataset, batch_size)
    slots = max(int(num_workers), 1)
    if num_workers > 0:
        items: Iterable[Any] = DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=_keep)
    else:
        items = iter(stream)
    pending: dict[int, deque] = {s: deque() for s in range(slots)}
    ended: set[int] = set()
    nxt = first_slot % slots
    for item in items:
        if isinstance(item, _SlotEnd):
            ended.add(item.slot)
            dataset.slot_skipped[item.slot] = item.skipped
        else:
            pending[item.position[0]].append(item)
            dataset.slot_skipped[item.position[0]] = item.skipped
        while True:
            if pending[nxt]:
                yield pending[nxt].popleft()
                nxt = (nxt + 1) % slots
            elif nxt in ended:
                if len(ended) == slots and not any(pending.values()):
                    return
                nxt = (nxt + 1) % slots
            else:
                break


def _node_rank() -> int:
    from webdataset.utils import pytorch_worker_info

    return int(pytorch_worker_info()[0])
