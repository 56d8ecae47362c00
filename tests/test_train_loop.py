"""The training step and loop on tiny FLUX parts: gradients reach only the adapter, ID terms vanish for
t > 0.6, a repeated batch is fitted, resume is exact, and the CLI writes a checkpoint the adapter loads."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

pytest.importorskip("kornia")
pytest.importorskip("webdataset")

from test_train_fixtures import tiny_components, tiny_config, tiny_multiid  # noqa: E402

from withanyone.train.data import MultiIDTrainDataset, iter_batches  # noqa: E402
from withanyone.train.loop import compute_losses, load_checkpoint, train, trainable_parameters  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state (mixed precision, accumulation); each run here starts clean,
    as a fresh ``withanyone train`` process would."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    yield


def _f(x: torch.Tensor) -> float:
    return float(x.detach())


def _two_person_batch():
    ds = MultiIDTrainDataset(tiny_multiid() / "train", 64, epochs=1)
    return next(iter_batches(ds, 2))  # group/1 and group/3: 2 people each


def _frozen_modules(parts):
    p = parts.pipe
    return [p.transformer, p.vae, p.text_encoder, p.text_encoder_2, parts.arcface]


def _prepare(parts):
    for m in _frozen_modules(parts):
        m.requires_grad_(False)
    parts.pipe.transformer.enable_gradient_checkpointing()
    parts.adapter.requires_grad_(False)
    params = trainable_parameters(parts.adapter)
    for p in params:
        p.requires_grad_(True)
    parts.adapter.train().attach(parts.pipe.transformer)
    return params


def test_gradients_reach_only_the_adapter_arcface_branch(tmp_path):
    parts = tiny_components()
    params = _prepare(parts)
    cfg = tiny_config(tmp_path)
    losses = compute_losses(_two_person_batch(), parts, cfg, torch.Generator().manual_seed(0),
                            t=torch.tensor([0.2, 0.3]))
    assert float(losses["id"].detach()) > 0 and float(losses["cl"].detach()) > 0
    assert _f(losses["id_weight"]) == 1.0
    total = losses["flow"] + cfg.lambda_id * losses["id"] + cfg.lambda_cl * losses["cl"]
    assert float(losses["loss"].detach()) == pytest.approx(float(total.detach()), rel=1e-6)
    losses["loss"].backward()
    for m in _frozen_modules(parts):
        assert all(p.grad is None for p in m.parameters())
    with_grad = [p for p in params if p.grad is not None and float(p.grad.abs().sum()) > 0]
    assert len(with_grad) >= 0.9 * len(params)
    names = {n for n, p in parts.adapter.named_parameters() if p.grad is not None}
    assert names and all(n.startswith(("arcface_in_arc.", "ipa_arc.")) for n in names)
    # the ID terms alone also reach the adapter (through the VAE decode of x̂₀ = x_t − t·v)
    parts.adapter.zero_grad(set_to_none=True)
    idl = compute_losses(_two_person_batch(), parts, cfg, torch.Generator().manual_seed(0), t=torch.tensor([0.2, 0.3]))
    (idl["id"] + idl["cl"]).backward()
    assert sum(float(p.grad.abs().sum()) for p in params if p.grad is not None) > 0


def test_id_terms_vanish_for_noisy_steps(tmp_path):
    parts = tiny_components()
    _prepare(parts)
    cfg = tiny_config(tmp_path)
    decodes = []
    parts.pipe.vae.decoder.register_forward_hook(lambda *a: decodes.append(1))
    batch = _two_person_batch()
    high = compute_losses(batch, parts, cfg, torch.Generator().manual_seed(0), t=torch.tensor([0.65, 0.9]))
    assert _f(high["id"]) == 0.0 and _f(high["cl"]) == 0.0 and not decodes
    assert _f(high["loss"]) == _f(high["flow"])
    # the release's gate is a hard cut: on at t = 0.6, off just above (image 1), no ramp in between
    cut = compute_losses(batch, parts, cfg, torch.Generator().manual_seed(0), t=torch.tensor([0.6, 0.61]))
    low = compute_losses(batch, parts, cfg, torch.Generator().manual_seed(0), t=torch.tensor([0.6, 0.3]))
    assert len(decodes) == 2
    assert _f(cut["id_weight"]) == 0.5 and _f(low["id_weight"]) == 1.0
    assert 0 < _f(cut["id"]) < _f(low["id"])
    # id_gate="ramp" (our former default): weight 0.5 at t = 0.5, full at 0.4
    ramp = tiny_config(tmp_path, id_gate="ramp")
    half = compute_losses(batch, parts, ramp, torch.Generator().manual_seed(0), t=torch.tensor([0.5, 0.4]))
    assert _f(half["id_weight"]) == pytest.approx(0.75)


def test_a_few_steps_on_one_repeated_batch_lower_the_loss(tmp_path):
    parts = tiny_components()
    params = _prepare(parts)
    cfg = tiny_config(tmp_path)
    batch = _two_person_batch()
    t = torch.tensor([0.3, 0.5])
    opt = torch.optim.AdamW(params, lr=1e-3)

    def loss_now():
        return compute_losses(batch, parts, cfg, torch.Generator().manual_seed(7), t=t)

    with torch.no_grad():
        before = {k: float(v) for k, v in loss_now().items()}
    for _ in range(12):
        loss = loss_now()["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    with torch.no_grad():
        after = {k: float(v) for k, v in loss_now().items()}
    assert after["loss"] < 0.95 * before["loss"], (before, after)
    assert after["flow"] < before["flow"]


def test_resume_is_exact(tmp_path, caplog):
    straight = train(tiny_config(tmp_path / "a", max_steps=4), tiny_components())
    first = train(tiny_config(tmp_path / "b", max_steps=2), tiny_components())
    assert first.step == 2 and (tmp_path / "b" / "checkpoints" / "step-0000002" / "withanyone.safetensors").is_file()
    resumed = train(tiny_config(tmp_path / "b", max_steps=4), tiny_components())
    assert straight.step == resumed.step == 4
    a = tiny_components().adapter
    b = tiny_components().adapter
    load_checkpoint(straight.checkpoint, a)
    load_checkpoint(resumed.checkpoint, b)
    init = tiny_components().adapter.state_dict()
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], init[k]) for k in sa)  # training changed the weights
    assert [h["loss"] for h in straight.history[2:]] == [h["loss"] for h in resumed.history]
    log = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all({"flow", "id", "cl", "loss", "lr"} <= set(r) for r in log)
    assert json.loads((tmp_path / "b" / "checkpoints" / "latest.json").read_text()) == {"dir": "step-0000004", "step": 4}
    assert not list((tmp_path / "b" / "checkpoints").glob(".*tmp"))
    assert "not an exact continuation" not in caplog.text
    # already at max_steps: resuming does no step; a changed batch size is reported as inexact
    again = train(tiny_config(tmp_path / "b", max_steps=4, batch_size=1), tiny_components())
    assert again.step == 4 and again.history == []
    assert "changed batch_size: not an exact continuation" in caplog.text


def test_cli_trains_two_steps_and_the_adapter_loads_the_checkpoint(tmp_path):
    from diffusers import FluxPipeline
    from safetensors.torch import save_file
    from test_train_fixtures import tiny_arcface
    from tiny_models.pipeline import get_dummy_components
    from typer.testing import CliRunner

    from withanyone.cli import app
    from withanyone.model import WithAnyoneAdapter

    FluxPipeline(**get_dummy_components()).save_pretrained(tmp_path / "flux")
    save_file({k: v.contiguous() for k, v in tiny_arcface().state_dict().items()}, str(tmp_path / "arc.safetensors"))
    root = tiny_multiid()
    (tmp_path / "cfg.toml").write_text(
        "[train]\n"
        f'pretrained_model = "{tmp_path / "flux"}"\nlocal_files_only = true\n'
        f'arcface_weights = "{tmp_path / "arc.safetensors"}"\narcface_arch = "none"\n'
        f'train_shards = "{root / "train"}"\nnegative_pool = "{root / "negatives.safetensors"}"\n'
        'resolution = 64\nbatch_size = 2\nmixed_precision = "no"\nmax_sequence_length = 16\nshuffle_buffer = 0\n'
        't_sampling = "uniform"\nnum_negatives = 8\nnum_workers = 0\n'
    )
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "cfg.toml"), "--no-progress",
                                   "max_steps=2", f"output_dir={out}", "phase=2"])
    assert res.exit_code == 0, res.output
    ckpt = out / "checkpoints" / "step-0000002" / "withanyone.safetensors"
    adapter = WithAnyoneAdapter.from_authors_checkpoint(ckpt, num_double_blocks=2)
    assert adapter.config.hidden_size == 192 and not adapter.config.use_siglip
    assert adapter.load_report.ok
    saved = json.loads((out / "config.json").read_text())
    assert saved["phase"] == 2 and saved["text_dropout"] == 0.1 and saved["max_steps"] == 2
    bad = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "cfg.toml"), "no_such_key=1"])
    assert bad.exit_code == 2 and "no_such_key" in bad.output
    empty = tmp_path / "empty.tar"
    from withanyone.data.shards import write_shard

    write_shard(empty, [{"__key__": "x", "jpg": b"broken"}])
    failed = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "cfg.toml"), "--no-progress",
                                      f"train_shards={empty}", f"output_dir={tmp_path / 'r2'}"])
    assert failed.exit_code == 1 and "no usable training samples" in " ".join(failed.output.split())
    missing = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "cfg.toml"), "--no-progress",
                                       f"arcface_weights={tmp_path / 'nope.safetensors'}", f"output_dir={tmp_path / 'r3'}"])
    assert missing.exit_code == 1 and "nope.safetensors" in "".join(missing.output.split())


def test_config_file_presets_and_overrides(tmp_path):
    from withanyone.train.config import PHASES, ConfigError, load_config

    (tmp_path / "c.json").write_text(json.dumps({"phase": 3, "batch_size": 8, "paired_ratio": 0.25}))
    cfg = load_config(tmp_path / "c.json", ["learning_rate=5e-5", "min_aesthetics=none", "resume=false"])
    assert (cfg.phase, cfg.batch_size, cfg.paired_ratio, cfg.learning_rate, cfg.resume) == (3, 8, 0.25, 5e-5, False)
    assert cfg.prompt_mode == "caption" and cfg.text_dropout == 0.1 and cfg.lambda_id == cfg.lambda_cl == 0.1
    assert load_config(overrides=["phase=4"]).min_aesthetics == PHASES[4]["min_aesthetics"]
    d = load_config()
    assert (d.learning_rate, d.warmup_steps, d.max_grad_norm, d.temperature, d.num_negatives) == (1e-4, 0, 1.0, 0.1, 4096)
    # the release's optimiser and objective defaults (issue 12's table)
    assert (d.weight_decay, d.batch_size, d.t_sampling, d.id_gate, d.nce_positive, d.clamp_x0) == (
        0.0, 1, "release", "release", "stored", False)
    for bad in (["batch_size=two"], ["phase=7"], ["resolution=100"], ["lambda_id"], ["resume=maybe"]):
        with pytest.raises(ConfigError):
            load_config(overrides=bad)
    (tmp_path / "bad.toml").write_text("phase = [")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(tmp_path / "bad.toml")
    assert np.isclose(load_config(overrides={"id_t_zero": 0.7}).id_t_zero, 0.7)


def test_gradient_accumulation_steps_once_per_group_and_resumes_exactly(tmp_path):
    straight = train(tiny_config(tmp_path / "a", max_steps=2, batch_size=1, gradient_accumulation_steps=2),
                     tiny_components())
    train(tiny_config(tmp_path / "b", max_steps=1, batch_size=1, gradient_accumulation_steps=2), tiny_components())
    resumed = train(tiny_config(tmp_path / "b", max_steps=2, batch_size=1, gradient_accumulation_steps=2),
                    tiny_components())
    assert [h["step"] for h in straight.history] == [1, 2]
    assert [h["lr"] for h in straight.history] == pytest.approx([5e-4, 1e-3])  # linear warm-up over 2 steps
    a, b = tiny_components().adapter, tiny_components().adapter
    load_checkpoint(straight.checkpoint, a)
    meta = load_checkpoint(resumed.checkpoint, b)
    assert meta["step"] == 2
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    # AdamW took exactly 2 steps (not 4): its step counter is saved in the state file
    from safetensors.torch import load_file

    st = load_file(str(straight.checkpoint / "trainer_state.safetensors"))
    assert {float(v) for k, v in st.items() if k.endswith(".step")} == {2.0}


def test_train_detects_gt_landmarks_when_the_shard_has_none(tmp_path):
    from withanyone.data.reader import iter_samples
    from withanyone.data.shards import json_bytes, write_shard

    items = []
    for s in list(itertools.islice(iter_samples(tiny_multiid() / "train"), 4))[2:]:  # two one-person photos, labels without landmarks
        labels = {k: v for k, v in s.labels.items() if k != "landmarks"}
        items.append({"__key__": s.key, "jpg": s.image_bytes, "json": json_bytes(labels)})
    write_shard(tmp_path / "published-like.tar", items)
    cfg = tiny_config(tmp_path / "run", train_shards=str(tmp_path / "published-like.tar"), max_steps=1)
    from withanyone.train.loop import TrainingError

    with pytest.raises(TrainingError, match="no_landmarks"):
        train(cfg, tiny_components())
    res = train(tiny_config(tmp_path / "run2", train_shards=str(tmp_path / "published-like.tar"), max_steps=1,
                            landmark_backend="dlib"), tiny_components())
    assert res.step == 1 and res.skipped == {}


def test_text_embeddings_are_cached_per_prompt_with_a_bounded_lru(tmp_path):
    from withanyone.train.loop import _encode_prompts

    parts = tiny_components(with_pool=False)
    calls = []
    original = parts.pipe.encode_prompt

    def counting(**kw):
        calls.append(list(kw["prompt"]))
        return original(**kw)

    parts.pipe.encode_prompt = counting
    cfg = tiny_config(tmp_path, text_cache_size=2)
    e1, p1 = _encode_prompts(parts, ["1 person", "2 people", "1 person"], cfg, torch.device("cpu"))
    assert calls == [["1 person"], ["2 people"]] and e1.shape[0] == 3  # one prompt per call: batch-independent
    torch.testing.assert_close(e1[0], e1[2], rtol=0, atol=0)
    e2, _ = _encode_prompts(parts, ["2 people", "1 person"], cfg, torch.device("cpu"))
    assert len(calls) == 2  # both cached
    torch.testing.assert_close(e2[0], e1[1], rtol=0, atol=0)
    _encode_prompts(parts, ["a man smiling"], cfg, torch.device("cpu"))
    assert list(parts.text_cache) == ["1 person", "a man smiling"]  # "2 people" was least recently used
    uncached = tiny_config(tmp_path, cache_text_embeddings=False)
    e3, p3 = _encode_prompts(parts, ["1 person", "2 people", "1 person"], uncached, torch.device("cpu"))
    torch.testing.assert_close(e3, e1, rtol=0, atol=0)
    torch.testing.assert_close(p3, p1, rtol=0, atol=0)


def test_bf16_mixed_precision_step_keeps_fp32_adapter_weights(tmp_path):
    parts = tiny_components()
    for m in (parts.pipe.transformer, parts.pipe.vae, parts.pipe.text_encoder, parts.pipe.text_encoder_2):
        m.to(torch.bfloat16)
    before = {k: v.clone() for k, v in parts.adapter.state_dict().items()}
    res = train(tiny_config(tmp_path, max_steps=2, mixed_precision="bf16"), parts)
    assert res.step == 2 and all(np.isfinite(h["loss"]) for h in res.history)
    assert all(p.dtype == torch.float32 for p in parts.adapter.parameters())
    assert any(not torch.equal(v, before[k]) for k, v in parts.adapter.state_dict().items())


def test_a_batch_the_adapter_rejects_is_skipped_and_resume_stays_exact(tmp_path, monkeypatch):
    import withanyone.train.loop as loop

    real = loop._usable
    seen = []

    def flaky(batch, adapter):
        seen.append(tuple(batch.keys))
        if len(seen) == 2:  # the second batch drawn (step 1) is rejected, as the adapter would a bad box
            return False
        return real(batch, adapter)

    monkeypatch.setattr(loop, "_usable", flaky)
    straight = train(tiny_config(tmp_path / "a", max_steps=3), tiny_components())
    assert straight.step == 3 and straight.skipped["rejected_batch"] == 2
    seen.clear()
    train(tiny_config(tmp_path / "b", max_steps=2), tiny_components())
    resumed = train(tiny_config(tmp_path / "b", max_steps=3), tiny_components())
    a, b = tiny_components().adapter, tiny_components().adapter
    load_checkpoint(straight.checkpoint, a)
    meta = load_checkpoint(resumed.checkpoint, b)
    assert meta["extra"]["ranks"][0]["batches"] == 4  # 3 steps + 1 rejected batch
    assert meta["extra"]["skipped"]["rejected_batch"] == 2
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_precomputed_text_embeddings_replace_the_text_encoders(tmp_path):
    from diffusers import FluxPipeline
    from safetensors.torch import save_file
    from test_train_fixtures import tiny_arcface
    from tiny_models.pipeline import get_dummy_components

    from withanyone.train.loop import TrainingError, load_components
    from withanyone.train.text import TextEmbeddingError, load_text_embeddings, precompute_text_embeddings

    parts = tiny_components()
    _prepare(parts)
    cfg = tiny_config(tmp_path)
    batch = _two_person_batch()
    t = torch.tensor([0.2, 0.3])
    with torch.no_grad():
        live = compute_losses(batch, parts, cfg, torch.Generator().manual_seed(0), t=t)
    path = precompute_text_embeddings(parts.pipe, ["2 people", "1 person", "2 people", ""], tmp_path / "text.safetensors",
                                      max_sequence_length=cfg.max_sequence_length)
    table = load_text_embeddings(path)
    assert list(table) == ["2 people", "1 person", ""] and table["1 person"][0].shape == (1, 16, 64)
    parts.pipe.text_encoder = parts.pipe.text_encoder_2 = None  # no encoder left: the table must serve
    parts.text_table = table
    with torch.no_grad():
        pre = compute_losses(batch, parts, cfg, torch.Generator().manual_seed(0), t=t)
    assert all(torch.equal(live[k], pre[k]) for k in ("flow", "id", "cl", "loss"))
    parts.text_table = {"1 person": table["1 person"]}
    with pytest.raises(TrainingError, match="2 people"):
        compute_losses(batch, parts, cfg, torch.Generator().manual_seed(0), t=t)
    with pytest.raises(TextEmbeddingError, match="nope"):
        load_text_embeddings(tmp_path / "nope.safetensors")
    # a run with text_embeddings loads FLUX without T5 and CLIP
    FluxPipeline(**get_dummy_components()).save_pretrained(tmp_path / "flux")
    save_file({k: v.contiguous() for k, v in tiny_arcface().state_dict().items()}, str(tmp_path / "arc.safetensors"))
    loaded = load_components(tiny_config(tmp_path, pretrained_model=str(tmp_path / "flux"), local_files_only=True,
                                         arcface_weights=str(tmp_path / "arc.safetensors"), arcface_arch=None,
                                         text_embeddings=str(path), negative_pool=None))
    assert loaded.pipe.text_encoder is None and loaded.pipe.text_encoder_2 is None and "" in loaded.text_table
