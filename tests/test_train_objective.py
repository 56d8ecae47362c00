"""The release's training objective is the default (issue 12's table), each difference a named option:
t over FLUX's shifted 1000-point schedule, a hard ID gate at t = 0.6, the stored GT embedding as InfoNCE
positive, no clamp of x̂₀, the raw-norm reference embedding (as generation feeds it), no negative-pool copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("kornia")
pytest.importorskip("webdataset")

from test_train_fixtures import tiny_components, tiny_config, tiny_multiid  # noqa: E402

import withanyone.train.loop as loop  # noqa: E402
from withanyone.train.data import MultiIDTrainDataset, iter_batches  # noqa: E402
from withanyone.train.losses import flux_mu, id_gate, sample_t, shifted_schedule  # noqa: E402


def test_release_t_sampling_is_uniform_over_the_shifted_schedule_with_mu_from_the_token_count():
    sched = shifted_schedule(1024)  # 512² → 32 × 32 image tokens
    assert len(sched) == 1000 and float(sched[0]) == 1.0 and float(sched.min()) > 0
    assert float(sched.mean()) == pytest.approx(0.60, abs=0.01)  # the measurement of the release
    assert float((sched > 0.6).float().mean()) == pytest.approx(0.56, abs=0.01)
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    assert float(shifted_schedule(4096).mean()) > float(sched.mean()) > float(shifted_schedule(256).mean())
    t = sample_t("release", 20_000, 1024, torch.Generator().manual_seed(0))
    assert torch.isin(t, sched).all()  # only schedule points …
    assert float(t.mean()) == pytest.approx(float(sched.mean()), abs=0.01)  # … drawn uniformly
    ln = sample_t("logit_normal", 20_000, 1024, torch.Generator().manual_seed(0))
    assert float(ln.mean()) == pytest.approx(0.5, abs=0.01) and not torch.isin(ln, sched).all()


def test_the_step_draws_t_with_the_true_image_token_count(tmp_path, monkeypatch):
    seen = []
    real = loop.sample_t
    monkeypatch.setattr(loop, "sample_t", lambda mode, b, tokens, g: seen.append((mode, b, tokens)) or real(mode, b, tokens, g))
    parts = tiny_components()
    parts.adapter.attach(parts.pipe.transformer)
    batch = next(iter_batches(MultiIDTrainDataset(tiny_multiid() / "train", 64, epochs=1), 2))
    with torch.no_grad():
        loop.compute_losses(batch, parts, tiny_config(tmp_path, t_sampling="release"), torch.Generator().manual_seed(0))
    assert seen == [("release", 2, 16)]  # 64 px → 8 × 8 latents → 4 × 4 packed tokens


def test_release_id_gate_is_a_hard_cut_above_06_and_ramp_is_the_option():
    t = torch.tensor([0.0, 0.4, 0.5, 0.6, 0.6001, 0.9])
    assert id_gate(t, "release").tolist() == [1, 1, 1, 1, 0, 0]
    assert id_gate(t, "ramp").tolist() == pytest.approx([1, 1, 0.5, 0, 0, 0], abs=1e-3)


def _capture(monkeypatch):
    got = {}
    real_nce, real_id = loop.info_nce, loop.id_loss

    def nce(q, p, *a, **kw):
        got["positive"] = p.detach().clone()
        return real_nce(q, p, *a, **kw)

    def idl(pred, gt, *a, **kw):
        got["pred_px"] = pred.detach().clone()
        out = real_id(pred, gt, *a, **kw)
        got["gt_emb"] = out[2].detach().clone()
        return out

    monkeypatch.setattr(loop, "info_nce", nce)
    monkeypatch.setattr(loop, "id_loss", idl)
    return got


def test_nce_positive_stored_by_default_recomputed_as_option_and_x0_not_clamped(tmp_path, monkeypatch):
    got = _capture(monkeypatch)
    parts = tiny_components()
    parts.adapter.attach(parts.pipe.transformer)
    samples = list(MultiIDTrainDataset(tiny_multiid() / "train", 64, epochs=1))
    batch = next(iter_batches(iter(samples[1:3]), 2))  # 2 + 1 people: three real faces, one padded slot
    t = torch.tensor([0.2, 0.3])
    with torch.no_grad():
        loop.compute_losses(batch, parts, tiny_config(tmp_path), torch.Generator().manual_seed(0), t=t)
    stored = torch.cat([torch.from_numpy(s.gt_embeddings) for s in samples[1:3]])
    torch.testing.assert_close(got["positive"], stored)  # the labels' embeddings, not our ArcFace
    unclamped = got["pred_px"]
    assert float(unclamped.min()) < 0 or float(unclamped.max()) > 255  # the tiny VAE's decode leaves [-1, 1]
    with torch.no_grad():
        loop.compute_losses(batch, parts, tiny_config(tmp_path, nce_positive="recomputed", clamp_x0=True),
                            torch.Generator().manual_seed(0), t=t)
    torch.testing.assert_close(got["positive"], got["gt_emb"])  # our ArcFace of the GT crops
    assert not torch.allclose(got["positive"], torch.nn.functional.normalize(stored, dim=-1), atol=1e-2)
    torch.testing.assert_close(got["pred_px"], unclamped.clamp(0, 255))


def test_the_adapter_gets_the_raw_embedding_scale_in_training_as_in_generation(tmp_path, monkeypatch):
    from withanyone.data.reader import iter_samples
    from withanyone.data.shards import json_bytes, write_shard
    from withanyone.faces.types import Face
    from withanyone.pipeline.references import face_arcface

    src = next(iter(iter_samples(tiny_multiid() / "train")))
    raw = np.asarray(src.labels["embeddings"], np.float32) * 23.5  # insightface's raw norm (published labels)
    write_shard(tmp_path / "raw.tar", [{"__key__": "r", "jpg": src.image_bytes,
                                        "json": json_bytes({**src.labels, "embeddings": raw.tolist()})}])
    fed = []
    parts = tiny_components()
    real = parts.adapter.identities

    def spy(**kw):
        fed.append(kw["arcface"].detach().clone())
        return real(**kw)

    monkeypatch.setattr(parts.adapter, "identities", spy)
    parts.adapter.attach(parts.pipe.transformer)
    batch = next(iter_batches(MultiIDTrainDataset(tmp_path / "raw.tar", 64, epochs=1), 1))
    with torch.no_grad():
        loop.compute_losses(batch, parts, tiny_config(tmp_path), torch.Generator().manual_seed(0))
    train_norms = fed[0][0].norm(dim=-1).numpy()
    np.testing.assert_allclose(train_norms, 23.5, rtol=1e-5)  # not unit-normalised any more
    # generation: an insightface face (unit embedding, its raw norm recorded) is fed at its raw norm
    face = Face(bbox=(0, 0, 10, 10), score=1.0, landmarks=np.zeros((5, 2)), embedding=raw[0] / 23.5,
                extra={"embedding_norm": 23.5})
    np.testing.assert_allclose(np.linalg.norm(face_arcface(face)), train_norms[0], rtol=1e-5)


def test_pool_negatives_exclude_batch_identities_without_copying_the_pool():
    from withanyone.data import read_negative_pool

    pool = read_negative_pool(tiny_multiid() / "negatives.safetensors")

    class Guard(np.ndarray):  # fails if the whole pool is indexed with a boolean mask (a full copy)
        def __getitem__(self, idx):
            assert not (isinstance(idx, np.ndarray) and idx.dtype == bool), "the pool was copied"
            return super().__getitem__(idx)

    pool.embeddings = pool.embeddings.view(Guard)
    got = loop.sample_pool_negatives(pool, ["obama", "biden"], 5, torch.Generator().manual_seed(0))
    assert got.shape == (5, 512)
    banned = np.concatenate([pool.of("obama"), pool.of("biden")])
    assert not any(np.allclose(g, b) for g in got for b in banned)
    again = loop.sample_pool_negatives(pool, ["obama", "biden"], 5, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(got, again)
    assert len(loop.sample_pool_negatives(pool, [], 100, torch.Generator().manual_seed(1))) == len(pool.identity)


def test_a_padded_person_changes_nothing_even_where_its_box_overlaps_a_real_one():
    from withanyone.pipeline.tiny import tiny_adapter, tiny_transformer

    transformer = tiny_transformer()
    adapter = tiny_adapter(use_siglip=False).attach(transformer)
    torch.manual_seed(1)
    h = w = 64
    tokens = (h // 16) * (w // 16)
    kw = dict(hidden_states=torch.randn(1, tokens, 64), encoder_hidden_states=torch.randn(1, 4, 64),
              pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]),
              img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(4, 3), return_dict=False)
    real = torch.randn(1, 1, 512) * 20
    with torch.no_grad():
        with adapter.identities(arcface=real, boxes=[[[0, 0, 40, 40]]], height=h, width=w):
            one = transformer(**kw)[0]
        padded = torch.cat([real, torch.randn(1, 1, 512) * 20], 1)
        with adapter.identities(arcface=padded, boxes=[[[0, 0, 40, 40], [16, 16, 64, 64]]], height=h, width=w,
                                people=torch.tensor([[True, False]])):
            masked = transformer(**kw)[0]
        with adapter.identities(arcface=padded, boxes=[[[0, 0, 40, 40], [16, 16, 64, 64]]], height=h, width=w):
            both = transformer(**kw)[0]
    torch.testing.assert_close(masked, one, rtol=1e-5, atol=1e-5)  # masked keys add only rounding
    assert float((both - one).abs().max()) > 1e-3  # unmasked, the second person would act
