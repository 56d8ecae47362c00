"""``withanyone train --tiny``: the whole training path on CPU in seconds, without weights or a dataset.

A tiny random FLUX (:mod:`withanyone.pipeline.tiny`), a tiny random arcface_torch IResNet and a fresh
adapter train for a few steps on a MultiID-2M-format shard built on the fly from the bundled photos
(``samples/faces``): dlib finds each face's box and landmarks, and the tiny ArcFace embeds the aligned face,
so the stored GT embeddings live in the space the ID loss measures. The checkpoint is that of a tiny random
model: it shows the path works, it is no use for generating pictures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["TINY_DEFAULTS", "TINY_NOTE", "tiny_arcface", "build_tiny_dataset", "tiny_train_components",
           "tiny_train_config"]

#: What every tiny run says about its output.
TINY_NOTE = "tiny random model (--tiny): a demonstration of the training path; the checkpoint is noise, not a model"

#: Config values a tiny run starts from (the user's file and key=value overrides still apply on top).
TINY_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/tiny", "max_steps": 4, "resolution": 64, "batch_size": 2, "mixed_precision": "no",
    "gradient_checkpointing": False, "max_sequence_length": 16, "shuffle_buffer": 0, "num_workers": 0,
    "num_negatives": 16, "learning_rate": 1e-3, "save_every": 2, "log_every": 1, "arcface_arch": None,
    "pretrained_model": "<tiny>", "arcface_weights": "<tiny>",
}

_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def tiny_arcface(seed: int = 0) -> torch.nn.Module:
    """A tiny IResNet (blocks [1, 1, 1, 1], widths 8/8/16/16, 512-d), eval mode, seeded random weights."""
    from .arcface import IResNet

    torch.manual_seed(seed)
    model = IResNet((1, 1, 1, 1), (8, 8, 16, 16), 512)
    with torch.no_grad():  # non-trivial BN statistics so eval-mode BN is not the identity
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval().requires_grad_(False)


def _photos(samples: Path, max_photos: int) -> list[tuple[Path, list[str | None], list[tuple[float, float]] | None]]:
    """(photo, names left to right, label centres or None) from a samples/faces-style folder."""
    labels_path = samples / "labels.json"
    labels = json.loads(labels_path.read_text(encoding="utf-8")) if labels_path.is_file() else {}
    out: list[tuple[Path, list[str | None], list[tuple[float, float]] | None]] = []
    for rel, entry in sorted(labels.items()):  # group photos: who is where
        people = entry.get("people") if isinstance(entry, dict) else None
        if people and all("cx" in p and "cy" in p for p in people) and (samples / rel).is_file():
            people = sorted(people, key=lambda p: p["cx"])
            out.append((samples / rel, [p.get("id") for p in people], [(p["cx"], p["cy"]) for p in people]))
    for person in sorted(p for p in samples.iterdir() if p.is_dir() and p.name != "group"):
        for photo in sorted(f for f in person.iterdir() if f.suffix.lower() in _EXTS)[:2]:
            out.append((photo, [person.name], None))
    return out[:max_photos]


def build_tiny_dataset(root: str | Path, samples: str | Path | None = None, seed: int = 0,
                       max_photos: int = 12) -> Path:
    """Write ``root/train/000000.tar`` and ``root/negatives.safetensors`` from labelled photos; returns
    the shard folder. Photos whose faces dlib cannot match to their labels are left out."""
    from ..data.shards import image_label, json_bytes, write_negative_pool, write_shard
    from ..demo import SAMPLES
    from ..faces import FaceAnalyzer
    from ..faces.align import align_face
    from ..faces.image import load_image

    root = Path(root)
    folder = Path(samples) if samples is not None else SAMPLES
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such photo folder (want <person>/<n>.jpg and labels.json)")
    analyzer = FaceAnalyzer("dlib")
    arcface = tiny_arcface(seed)
    rows, per_id = [], {}
    for photo, names, centres in _photos(folder, max_photos):
        image = load_image(photo)
        h, w = image.shape[:2]
        faces = analyzer.detect(image, embed=False)
        if centres is None:  # one person's photo: its largest face
            faces = sorted(faces, key=lambda f: -f.area)[:1]
        else:  # a group photo: the face whose box holds each labelled centre
            picked = []
            for cx, cy in centres:
                inside = [f for f in faces if f.bbox[0] <= cx * w <= f.bbox[2] and f.bbox[1] <= cy * h <= f.bbox[3]]
                picked.append(inside[0] if inside else None)
            if any(f is None for f in picked):
                continue
            faces = picked
        if len(faces) != len(names):
            continue
        crops = np.stack([align_face(image, np.asarray(f.landmarks)) for f in faces])
        with torch.no_grad():
            emb = arcface(torch.from_numpy(crops).permute(0, 3, 1, 2).float()).numpy()
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        label = image_label(str(photo), [f.bbox for f in faces], names, list(emb),
                            caption=f"a photo of {' and '.join(n or 'a stranger' for n in names)}",
                            aesthetics_score=6.0, landmarks=[np.asarray(f.landmarks).tolist() for f in faces])
        rows.append({"__key__": f"{len(rows):08d}", photo.suffix.lower().lstrip(".").replace("jpeg", "jpg"):
                     photo.read_bytes(), "json": json_bytes(label)})
        for n, e in zip(names, emb, strict=True):
            if n is not None:
                per_id.setdefault(n, []).append(e.astype(np.float32))
    if not rows:
        raise FileNotFoundError(f"{folder}: dlib found no usable labelled face; want <person>/<n>.jpg photos")
    write_shard(root / "train" / "000000.tar", rows)
    ids = sorted(per_id)
    write_negative_pool(root / "negatives.safetensors", ids, [np.stack(per_id[i]) for i in ids], backend="tiny")
    return root / "train"


def tiny_train_components(config: Any) -> Any:
    """TrainComponents: the tiny random FLUX, :func:`tiny_arcface` and a fresh ArcFace-branch adapter."""
    from diffusers import FluxPipeline

    from ..data import read_negative_pool
    from ..model import WithAnyoneAdapter
    from ..pipeline.tiny import TINY_HEADS, TINY_WIDTH, get_dummy_components
    from .loop import TrainComponents

    seed = int(config.seed)
    pipe = FluxPipeline(**get_dummy_components(seed))
    torch.manual_seed(seed)
    adapter = WithAnyoneAdapter(num_double_blocks=2, num_single_blocks=2, hidden_size=TINY_WIDTH,
                                num_heads=TINY_HEADS, head_dim=TINY_WIDTH // TINY_HEADS, arcface_dim=512,
                                use_siglip=False)
    pool = read_negative_pool(config.negative_pool) if config.negative_pool else None
    return TrainComponents(pipe, tiny_arcface(seed), adapter, pool)


def tiny_train_config(config_path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """The resolved config of a tiny run: :data:`TINY_DEFAULTS`, then the file, then the overrides; the
    dataset (built once into ``output_dir/tiny-data``) unless ``train_shards`` is given."""
    from .config import ConfigError, _parse_overrides, _read_file, apply_overrides, load_config

    user = {**(_read_file(config_path) if config_path is not None else {}), **_parse_overrides(overrides)}
    if user.get("branch", "arc") != "arc":
        raise ConfigError("--tiny trains the ArcFace branch only (branch=arc)")
    phase = user.get("phase", 1)
    cfg = load_config(None, [f"phase={phase}"])
    cfg = apply_overrides(cfg, {**TINY_DEFAULTS, "train_shards": "<tiny>", "reference_shards": None,
                                "min_aesthetics": None})
    cfg = apply_overrides(cfg, user)
    if cfg.train_shards == "<tiny>":
        data = Path(cfg.output_dir) / "tiny-data"
        if not (data / "train" / "000000.tar").is_file():
            build_tiny_dataset(data, seed=cfg.seed)
        cfg = apply_overrides(cfg, {"train_shards": str(data / "train"),
                                    "negative_pool": cfg.negative_pool or str(data / "negatives.safetensors")})
    return cfg.validate()
