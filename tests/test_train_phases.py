"""Every phase preset trains end to end on the tiny parts, both adapter branches (ArcFace and SigLIP), with
1-, 2- and 3-person samples in one padded batch, loading data in a DataLoader worker."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

pytest.importorskip("kornia")
pytest.importorskip("webdataset")

from test_train_fixtures import tiny_components, tiny_config, tiny_multiid  # noqa: E402

import withanyone.train.loop as loop  # noqa: E402
from withanyone.train.config import PHASES, load_config  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    yield


def _mixed_shard(path):
    """[3 people, 1 person, 2 people]: the 3-person photo is group/1 with a third face box (a shifted copy of
    the second face) — geometry only, the step needs no real third face."""
    from withanyone.data.reader import iter_samples
    from withanyone.data.shards import json_bytes, write_shard

    s = list(itertools.islice(iter_samples(tiny_multiid() / "train"), 3))
    two, one = s[0], s[2]
    lab = dict(two.labels)
    b = np.asarray(lab["bboxes"], np.float32)
    lm = np.asarray(lab["landmarks"], np.float32)
    h, w = two.image().shape[:2]
    dy = min(h - float(b[1, 3]) - 1, float(b[1, 3] - b[1, 1]) + 4)
    third_box, third_lm = b[1] + [0, dy, 0, dy], lm[1] + [0, dy]
    rng = np.random.default_rng(0)
    e3 = rng.standard_normal(512).astype(np.float32)
    three = {**lab, "bboxes": [*b.tolist(), third_box.tolist()], "landmarks": [*lm.tolist(), third_lm.tolist()],
             "name": [*lab["name"], None], "embeddings": [*lab["embeddings"], (e3 / np.linalg.norm(e3)).tolist()],
             "aesthetics_score": 6.0}
    items = [{"__key__": "three", "jpg": two.image_bytes, "json": json_bytes(three)},
             {"__key__": "one", "jpg": one.image_bytes, "json": json_bytes({**one.labels, "aesthetics_score": 6.0})},
             {"__key__": "two", "jpg": two.image_bytes, "json": json_bytes({**two.labels, "aesthetics_score": 6.0})}]
    write_shard(path, items)
    return path


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_phase_presets_train_with_one_two_and_three_people_in_one_batch(tmp_path, monkeypatch, phase):
    shard = _mixed_shard(tmp_path / "mixed.tar")
    preset = load_config(overrides={"phase": phase})
    keep = {k: getattr(preset, k) for k in PHASES[phase] if k not in ("train_shards", "reference_shards", "max_steps")}
    cfg = tiny_config(tmp_path / "run", **keep, phase=phase, train_shards=str(shard), batch_size=3, max_steps=1,
                      num_workers=1, reference_shards=str(tiny_multiid() / "ref"), t_sampling="release",
                      branch="both")
    seen = []
    real = loop.compute_losses

    def spy(batch, *a, **kw):
        seen.append((batch.keys, batch.mask.sum(1).tolist()))
        t = torch.tensor([0.3, 0.4, 0.5])  # ID terms on for every image
        return real(batch, *a, **{**kw, "t": t})

    monkeypatch.setattr(loop, "compute_losses", spy)
    from withanyone.model import WithAnyoneAdapter
    from withanyone.pipeline.tiny import TINY_SIGLIP_DIM, tiny_siglip

    parts = tiny_components()
    torch.manual_seed(0)
    parts.adapter = WithAnyoneAdapter(num_double_blocks=2, num_single_blocks=2, hidden_size=192, num_heads=3,
                                      head_dim=64, arcface_dim=512, siglip_dim=TINY_SIGLIP_DIM, use_siglip=True)
    parts.siglip = tiny_siglip()
    before = {k: v.clone() for k, v in parts.adapter.state_dict().items()}
    res = loop.train(cfg, parts)
    assert res.step == 1 and res.skipped == {}
    assert seen == [(["three", "one", "two"], [3, 1, 2])]
    h = res.history[0]
    assert all(np.isfinite(h[k]) for k in ("flow", "id", "cl", "loss")) and h["id"] > 0 and h["cl"] > 0
    changed = {k.split(".")[0] for k, v in parts.adapter.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"arcface_in_arc", "ipa_arc", "arcface_in_sig", "siglip_in_sig", "ipa_sig"}  # both branches
