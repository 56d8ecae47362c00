"""The mini world's stand-in face stack: an ArcFace-style embedder, a box detector and a ``FaceBackend``.

* :class:`MiniFaceNet` has ``train.arcface``'s interface: aligned faces [N, 3, 112, 112] RGB in [0, 255] →
  embeddings [N, D] (not normalised), differentiable, with ``embedding_dim``; it is what the ID loss and
  InfoNCE embed with. It is trained with an additive angular margin (ArcFace) loss on identity labels.
* :class:`MiniDetector` is a CenterNet-style heat-map detector (stride 8) of the renderer's square head
  boxes.
* :class:`MiniFaceBackend` is a :class:`~withanyone.faces.backends.base.FaceBackend` over both, so a
  ``FaceAnalyzer`` — and through it the pipeline's reference path and ``withanyone.bench`` — uses them as
  they use dlib or insightface. Landmarks are the box's template points (:func:`~withanyone.mini.world.box_landmarks`),
  so aligning a face is resizing its box to 112².

Both networks live in one safetensors file (``embed.*``, ``det.*``) with their sizes and the verification
threshold in its metadata.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from withanyone.faces.align import align_face
from withanyone.faces.backends.base import FaceBackend
from withanyone.faces.types import Face

from .world import CANVAS, box_landmarks, make_people, random_layout, render_canvas, render_portrait

__all__ = ["MiniFaceNet", "MiniDetector", "MiniFaceBackend", "train_face_model", "save_face_model",
           "load_face_model", "verification", "face_crops"]

EMBED_DIM = 64


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout))


class MiniFaceNet(nn.Module):
    """A small CNN: aligned faces [N, 3, 112, 112] in [0, 255] → ``dim``-d embeddings (train.arcface's interface)."""

    input_size = 112

    def __init__(self, dim: int = EMBED_DIM, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(_block(3, w, 2), _block(w, 2 * w, 1), _block(2 * w, 2 * w, 2),
                                      _block(2 * w, 4 * w, 1), _block(4 * w, 4 * w, 2))
        self.fc = nn.Linear(4 * w * 7 * 7, dim)
        self.bn = nn.BatchNorm1d(dim)

    @property
    def embedding_dim(self) -> int:
        """Width of the output embedding."""
        return self.fc.out_features

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embeddings [N, D] of aligned faces [N, 3, 112, 112], RGB in [0, 255]."""
        if pixels.shape[-2:] != (112, 112):
            raise ValueError(f"MiniFaceNet expects 112×112 faces, got {tuple(pixels.shape)}")
        x = F.avg_pool2d(pixels.float() / 127.5 - 1.0, 2)  # 56²: the sprites hold no finer detail
        x = self.features(x)
        return self.bn(self.fc(torch.flatten(x, 1)))


class MiniDetector(nn.Module):
    """Heat map of head centres (stride 8), log box side and sub-cell offset; fully convolutional."""

    stride = 8

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.body = nn.Sequential(_block(3, w, 2), _block(w, 2 * w, 2), _block(2 * w, 2 * w, 2),
                                  _block(2 * w, 2 * w, 1), _block(2 * w, 2 * w, 1))
        self.head = nn.Conv2d(2 * w, 4, 1)
        nn.init.constant_(self.head.bias, 0.0)
        with torch.no_grad():
            self.head.bias[0] = -2.2

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 4, H/8, W/8]: heat logit, log(side/32), offset x, offset y (cells)."""
        return self.head(self.body(image.float() / 127.5 - 1.0))

    @torch.no_grad()
    def detect(self, image: np.ndarray, threshold: float = 0.3) -> list[tuple[np.ndarray, float]]:
        """(box, score) of every head in an RGB uint8 image, best first."""
        h, w = image.shape[:2]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        out = self(x)[0]
        heat = torch.sigmoid(out[0])
        peak = (heat == F.max_pool2d(heat[None, None], 3, 1, 1)[0, 0]) & (heat >= threshold)
        found = []
        for r, c in torch.nonzero(peak).tolist():
            side = 32.0 * math.exp(float(out[1, r, c]))
            cx = (c + 0.5 + float(out[2, r, c])) * self.stride
            cy = (r + 0.5 + float(out[3, r, c])) * self.stride
            box = np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], np.float32)
            found.append((box, float(heat[r, c])))
        found.sort(key=lambda t: -t[1])
        return found


def face_crops(image: np.ndarray, boxes: list[Any]) -> np.ndarray:
    """Aligned 112² crops (uint8 [N, 112, 112, 3]) of the square ``boxes`` of ``image``."""
    if not len(boxes):
        return np.zeros((0, 112, 112, 3), np.uint8)
    return np.stack([align_face(image, box_landmarks(b)) for b in boxes])


def _to_tensor(crops: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float()


class MiniFaceBackend(FaceBackend):
    """``FaceBackend`` over the mini detector and embedder (one weights file)."""

    name = "mini"

    def __init__(self, weights: str | Path | None = None, det_thresh: float = 0.3,
                 models: tuple[MiniFaceNet, MiniDetector, float] | None = None):
        if models is None:
            if weights is None:
                raise ValueError("MiniFaceBackend needs weights= (a file from save_face_model) or models=")
            models = load_face_model(weights)
        self.net, self.detector, self.same_person_threshold = models
        self.embedding_dim = self.net.embedding_dim
        self.weights = str(weights) if weights is not None else None
        self.det_thresh = float(det_thresh)

    def detect(self, image: np.ndarray, *, embed: bool = True) -> list[Face]:
        """Heads in an RGB uint8 image, best first, with unit-norm embeddings."""
        faces = [Face(box, score, box_landmarks(box), backend=self.name)
                 for box, score in self.detector.detect(image, self.det_thresh)]
        faces.sort(key=lambda f: -f.area)
        return self.embed(image, faces) if embed else faces

    @torch.no_grad()
    def embed(self, image: np.ndarray, faces: list[Face]) -> list[Face]:
        """Fill in the unit-norm embeddings of ``faces``."""
        if not faces:
            return faces
        crops = np.stack([align_face(image, f.landmarks) for f in faces])
        emb = F.normalize(self.net(_to_tensor(crops)), dim=-1).numpy()
        for f, e in zip(faces, emb, strict=True):
            f.embedding = e.astype(np.float32)
        return faces

    def spec(self) -> dict:
        """Constructor arguments (a weights file) that rebuild this backend in another process."""
        return {"backend": self.name, "weights": self.weights, "det_thresh": self.det_thresh}


# ----------------------------------------------------------------------------- training
def _arc_logits(emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, s: float = 30.0,
                m: float = 0.3) -> torch.Tensor:
    """ArcFace logits: s·cos(θ + m) for the true class, s·cos θ for the others."""
    cos = F.normalize(emb, dim=-1) @ F.normalize(weight, dim=-1).T
    theta = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
    target = torch.cos(theta + m)
    onehot = F.one_hot(labels, weight.shape[0]).bool()
    return s * torch.where(onehot, target, cos)


def _portrait_crops(people: list, photos: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    crops, labels = [], []
    for k, p in enumerate(people):
        for j in range(photos):
            c = render_portrait(p, seed * 1_000_003 + p.pid * 101 + j)
            crops.append(face_crops(c.image, c.boxes)[0])
            labels.append(k)
    return np.stack(crops), np.asarray(labels)


def _det_sample(rng: np.random.Generator, people: list) -> tuple[np.ndarray, list]:
    """A group canvas, or a portrait padded onto black as the bench pads references."""
    u = rng.random()
    if u < 0.55:
        n = int(rng.integers(1, 4))
        who = [people[i] for i in rng.choice(len(people), n, replace=False)]
        c = render_canvas(who, random_layout(n, rng), int(rng.integers(1 << 30)))
        return c.image, c.boxes
    c = render_portrait(people[int(rng.integers(len(people)))], int(rng.integers(1 << 30)))
    if u < 0.75:
        return c.image, c.boxes
    img = np.zeros((96, 96, 3), np.uint8)
    img[16:80, 16:80] = c.image
    return img, [(b[0] + 16, b[1] + 16, b[2] + 16, b[3] + 16) for b in c.boxes]


def _det_loss(out: torch.Tensor, boxes: list[list], stride: int = 8) -> torch.Tensor:
    b, _, gh, gw = out.shape
    heat = torch.zeros(b, gh, gw)
    loss_box = out.new_zeros(())
    count = 0
    yy, xx = torch.meshgrid(torch.arange(gh) + 0.5, torch.arange(gw) + 0.5, indexing="ij")
    for i, bx in enumerate(boxes):
        for x1, y1, x2, y2 in bx:
            cx, cy, side = (x1 + x2) / 2 / stride, (y1 + y2) / 2 / stride, x2 - x1
            heat[i] = torch.maximum(heat[i], torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 0.7 ** 2)))
            r, c = min(max(int(cy), 0), gh - 1), min(max(int(cx), 0), gw - 1)
            heat[i, r, c] = 1.0  # the centre's cell is the one positive
            tgt = torch.tensor([math.log(side / 32.0), cx - (c + 0.5), cy - (r + 0.5)])
            loss_box = loss_box + F.l1_loss(out[i, 1:, r, c], tgt, reduction="sum")
            count += 1
    p = torch.sigmoid(out[:, 0]).clamp(1e-4, 1 - 1e-4)
    pos = heat >= 1.0
    focal = torch.where(pos, -(1 - p) ** 2 * torch.log(p), -((1 - heat) ** 4) * p ** 2 * torch.log(1 - p))
    return focal.sum() / max(count, 1) + loss_box / max(count, 1)


def train_face_model(train_ids: list[int], world_seed: int = 0, photos: int = 8, epochs: int = 6,
                     det_steps: int = 400, seed: int = 0, log: Any = print) -> tuple[MiniFaceNet, MiniDetector]:
    """Train the embedder (ArcFace margin loss over ``train_ids``) and the detector; both returned frozen."""
    torch.manual_seed(seed)
    people = make_people(train_ids, world_seed)
    crops, labels = _portrait_crops(people, photos, seed)
    x_all, y_all = _to_tensor(crops), torch.from_numpy(labels)
    net = MiniFaceNet()
    weight = nn.Parameter(torch.randn(len(people), net.embedding_dim) * 0.01)
    opt = torch.optim.AdamW([*net.parameters(), weight], lr=2e-3, weight_decay=5e-4)
    n = len(x_all)
    bs = 64
    steps = epochs * (n // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    net.train()
    step = 0
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for k in range(n // bs):
            idx = perm[k * bs:(k + 1) * bs]
            x = x_all[idx]
            if torch.rand((), generator=g) < 0.5:  # a little blur: generated faces are softer than renders
                x = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear"), size=112, mode="bilinear")
            loss = F.cross_entropy(_arc_logits(net(x), weight, y_all[idx]), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            tot += float(loss.detach())
        log(f"face model epoch {ep + 1}/{epochs}: ArcFace loss {tot / max(n // bs, 1):.3f}")
    net.eval().requires_grad_(False)

    det = MiniDetector()
    opt = torch.optim.AdamW(det.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed + 7)
    det.train()
    for k in range(det_steps):
        samples = [_det_sample(rng, people) for _ in range(8)]
        by_size: dict[int, list] = {}
        for img, bx in samples:
            by_size.setdefault(img.shape[0], []).append((img, bx))
        loss = 0.0
        for group in by_size.values():
            x = torch.from_numpy(np.stack([s[0] for s in group])).permute(0, 3, 1, 2).float()
            loss = loss + _det_loss(det(x), [s[1] for s in group]) * len(group) / len(samples)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (k + 1) % 100 == 0:
            log(f"detector step {k + 1}/{det_steps}: loss {float(loss.detach()):.3f}")
    det.eval().requires_grad_(False)
    return net, det


@torch.no_grad()
def embed_crops(net: MiniFaceNet, crops: np.ndarray) -> np.ndarray:
    """Unit-norm embeddings [N, D] of aligned uint8 crops [N, 112, 112, 3]."""
    out = [F.normalize(net(_to_tensor(crops[i:i + 256])), dim=-1) for i in range(0, len(crops), 256)]
    return torch.cat(out).numpy() if out else np.zeros((0, net.embedding_dim), np.float32)


def verification(net: MiniFaceNet, ids: list[int], world_seed: int = 0, photos: int = 6, seed: int = 99,
                 threshold: float | None = None) -> dict[str, float]:
    """Pair verification on ``ids``: all same-person pairs and as many different-person pairs.

    Returns accuracy at ``threshold`` (default: the best threshold on these pairs), the threshold, and
    the same-person / different-person cosine means.
    """
    people = make_people(ids, world_seed)
    crops, labels = _portrait_crops(people, photos, seed)
    emb = embed_crops(net, crops)
    sim = emb @ emb.T
    iu = np.triu_indices(len(labels), 1)
    same = labels[iu[0]] == labels[iu[1]]
    s_same, s_diff = sim[iu][same], sim[iu][~same]
    rng = np.random.default_rng(seed)
    s_diff = rng.choice(s_diff, min(len(s_diff), len(s_same)), replace=False)
    scores = np.concatenate([s_same, s_diff])
    truth = np.concatenate([np.ones(len(s_same), bool), np.zeros(len(s_diff), bool)])
    if threshold is None:
        cands = np.unique(scores)
        accs = [((scores >= t) == truth).mean() for t in cands]
        threshold = float(cands[int(np.argmax(accs))])
    acc = float(((scores >= threshold) == truth).mean())
    return {"accuracy": acc, "threshold": float(threshold), "same_mean": float(s_same.mean()),
            "same_max": float(s_same.max()), "diff_mean": float(s_diff.mean()), "pairs": int(len(scores))}


def detection_recall(det: MiniDetector, ids: list[int], world_seed: int = 0, n: int = 60, seed: int = 5) -> dict:
    """Count accuracy and centre recall of the detector on held-out group canvases."""
    people = make_people(ids, world_seed)
    rng = np.random.default_rng(seed)
    right = 0
    for _ in range(n):
        k = int(rng.integers(1, 4))
        who = [people[i] for i in rng.choice(len(people), k, replace=False)]
        c = render_canvas(who, random_layout(k, rng, CANVAS), int(rng.integers(1 << 30)))
        right += int(len(det.detect(c.image)) == k)
    return {"count_accuracy": right / n, "canvases": n}


def save_face_model(path: str | Path, net: MiniFaceNet, det: MiniDetector, threshold: float,
                    info: dict[str, Any] | None = None) -> Path:
    """Both networks (``embed.*``, ``det.*``) in one safetensors file; sizes and threshold in its metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"embed.{k}": v.contiguous() for k, v in net.state_dict().items()}
    tensors.update({f"det.{k}": v.contiguous() for k, v in det.state_dict().items()})
    meta = {"dim": net.embedding_dim, "threshold": threshold, **(info or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"withanyone-mini": json.dumps(meta)})
    tmp.replace(path)
    return path


def load_face_model(path: str | Path) -> tuple[MiniFaceNet, MiniDetector, float]:
    """(embedder, detector, same-person threshold), frozen, from :func:`save_face_model`'s file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mini face model not found (run benchmarks/mini.py first)")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["withanyone-mini"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    net, det = MiniFaceNet(int(meta["dim"])), MiniDetector()
    net.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("embed.")})
    det.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("det.")})
    return net.eval().requires_grad_(False), det.eval().requires_grad_(False), float(meta["threshold"])
