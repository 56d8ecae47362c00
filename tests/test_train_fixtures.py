"""Shared builders for the training tests (no tests here): a tiny MultiID-2M shard made with the
``withanyone.data`` writers from real photos (dlib boxes/landmarks, random 512-d identity embeddings),
a reference shard, a negative pool, a tiny ArcFace and the tiny FLUX parts."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "faces"
# (photo, identity per face left to right or None, caption)
PHOTOS = [
    ("group/1.jpg", ["obama", "biden"], "two men in suits"),
    ("group/3.jpg", ["rose_leslie", "kit_harington"], "a couple smiling"),
    ("obama/1.jpg", ["obama"], "a man at a podium"),
    ("biden/1.jpg", ["biden"], "a man smiling"),
    ("kit_harington/1.jpg", ["kit_harington"], "a man with curly hair"),
    ("rose_leslie/1.jpg", ["rose_leslie"], "a woman with red hair"),
]
IDS = ["obama", "biden", "rose_leslie", "kit_harington", "stranger_a", "stranger_b"]
DIM = 512


def identity_vectors(seed: int = 0) -> dict[str, np.ndarray]:
    """One random unit 512-d vector per identity (stands in for ArcFace antelopev2 centres)."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((len(IDS), DIM)).astype(np.float32)
    return {k: x / np.linalg.norm(x) for k, x in zip(IDS, v, strict=True)}


def _noisy(v: np.ndarray, rng: np.random.Generator, s: float = 0.3) -> np.ndarray:
    x = v + s * rng.standard_normal(v.shape).astype(np.float32) / np.sqrt(DIM)
    return (x / np.linalg.norm(x)).astype(np.float32)


@functools.lru_cache(maxsize=1)
def tiny_multiid() -> Path:
    """Folder with ``train/000000.tar`` (6 good + 2 bad samples), ``ref/refs.tar``, ``negatives.safetensors``."""
    from withanyone.data.shards import image_label, json_bytes, npy_bytes, write_negative_pool, write_shard
    from withanyone.faces import FaceAnalyzer

    root = Path(tempfile.mkdtemp(prefix="withanyone-train-"))
    analyzer = FaceAnalyzer("dlib")
    vec = identity_vectors()
    rng = np.random.default_rng(1)
    samples = []
    for i, (rel, names, caption) in enumerate(PHOTOS):
        path = SAMPLES / rel
        faces = sorted(analyzer.detect(path, embed=False)[: len(names)], key=lambda f: f.bbox[0])
        assert len(faces) == len(names), f"{rel}: dlib found {len(faces)} faces"
        label = image_label(str(path), [f.bbox for f in faces], names, [_noisy(vec[n], rng) for n in names],
                            caption=caption, aesthetics_score=6.0 if i % 2 == 0 else 4.0,
                            landmarks=[np.asarray(f.landmarks).tolist() for f in faces])
        samples.append({"__key__": f"{i:08d}", "jpg": path.read_bytes(), "json": json_bytes(label)})
    bad_image = image_label("broken", [[0, 0, 10, 10]], ["obama"], [vec["obama"]], landmarks=[[[1, 1]] * 5])
    samples.append({"__key__": "00000100", "jpg": b"not a jpeg at all", "json": json_bytes(bad_image)})
    samples.append({"__key__": "00000101", "jpg": (SAMPLES / PHOTOS[2][0]).read_bytes()})  # no labels
    write_shard(root / "train" / "000000.tar", samples)
    refs = []
    for n in IDS[:4]:
        for k in range(3):
            refs.append({"__key__": f"{n}__ref{k}", "jpg": b"",
                         "npy": npy_bytes({"embeddings": _noisy(vec[n], rng)[None], "name": n})})
    write_shard(root / "ref" / "refs.tar", refs)
    write_negative_pool(root / "negatives.safetensors", IDS,
                        [np.stack([_noisy(vec[n], rng) for _ in range(4)]) for n in IDS], backend="test")
    return root


def tiny_arcface(seed: int = 0):
    """A tiny IResNet (blocks [1, 1, 1, 1], widths 8/8/16/16, 512-d), eval mode, random weights."""
    from withanyone.train.arcface import IResNet

    torch.manual_seed(seed)
    model = IResNet((1, 1, 1, 1), (8, 8, 16, 16), 512)
    with torch.no_grad():  # non-trivial BN statistics so eval-mode BN is not the identity
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def tiny_components(seed: int = 0, with_pool: bool = True):
    """TrainComponents on the tiny FLUX pipeline, the tiny ArcFace and a fresh ArcFace-branch adapter."""
    from diffusers import FluxPipeline
    from tiny_models.pipeline import get_dummy_components

    from withanyone.data import read_negative_pool
    from withanyone.model import WithAnyoneAdapter
    from withanyone.train.loop import TrainComponents

    pipe = FluxPipeline(**get_dummy_components(seed))
    torch.manual_seed(seed)
    adapter = WithAnyoneAdapter(num_double_blocks=2, num_single_blocks=2, hidden_size=192, num_heads=3, head_dim=64,
                                arcface_dim=512, use_siglip=False)
    pool = read_negative_pool(tiny_multiid() / "negatives.safetensors") if with_pool else None
    return TrainComponents(pipe, tiny_arcface(seed), adapter, pool)


def tiny_config(out: Path, **kw):
    """A CPU fp32 config for the tiny parts: 64×64 crops, batch 2, t uniform, short T5 sequence."""
    from withanyone.train.config import TrainConfig

    base = dict(output_dir=str(out), train_shards=str(tiny_multiid() / "train"), resolution=64, batch_size=2,
                max_steps=2, mixed_precision="no", gradient_checkpointing=True, max_sequence_length=16,
                shuffle_buffer=0, warmup_steps=2, save_every=1000, log_every=1, t_sampling="uniform", num_workers=0,
                num_negatives=16, learning_rate=1e-3)
    base.update(kw)
    return TrainConfig(**base).validate()
