"""WithAnyoneAdapter on a tiny diffusers FLUX: bit-identity outside identities(), sparse == dense, skipping,
broadcasting, Kontext token restriction, LoRA, gradient checkpointing with gradients only in the adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models.flux import random_identities, tiny_adapter, tiny_flux_inputs, tiny_flux_transformer
from tiny_models.numerics import assert_close_fp32

from withanyone.model import IdentityInputError, InvalidBoxError, WithAnyoneAdapter

BOXES = [[(10.0, 12.0, 90.0, 100.0), (120.0, 130.0, 250.0, 240.0)]]


@pytest.fixture(scope="module")
def transformer():
    return tiny_flux_transformer(seed=0)


@pytest.fixture()
def adapter(transformer):
    a = tiny_adapter(seed=1)
    a.attach(transformer)
    yield a
    a.detach()


def run(t, inputs):
    with torch.no_grad():
        return t(**inputs)[0]


def test_outside_identities_output_is_bit_identical(transformer):
    inputs = tiny_flux_inputs(batch=2)
    bare = run(transformer, inputs)
    a = tiny_adapter(seed=1).attach(transformer)
    try:
        assert torch.equal(run(transformer, inputs), bare)  # attached, no identities
        arc, sig = random_identities(2, 2)
        with a.identities(arcface=arc, siglip=sig, boxes=BOXES * 2, height=256, width=256, siglip_weight=0.5):
            inside = run(transformer, inputs)
        assert (inside - bare).abs().max() > 1e-2  # the identities do change the output
        assert torch.equal(run(transformer, inputs), bare)  # after the block
        a.attach(transformer)  # idempotent: still one set of hooks
        with a.identities(arcface=arc, siglip=sig, boxes=BOXES * 2, height=256, width=256, siglip_weight=0.5):
            assert torch.equal(run(transformer, inputs), inside)
    finally:
        a.detach()
    assert torch.equal(run(transformer, inputs), bare)
    assert not a.attached


def test_zero_weights_give_the_bare_output(transformer, adapter):
    inputs = tiny_flux_inputs()
    bare_adapterless = run(transformer, inputs)
    arc, sig = random_identities(1, 2)
    with adapter.identities(
        arcface=arc, siglip=sig, boxes=BOXES, height=256, width=256, id_weight=0.0, siglip_weight=0.0
    ):
        assert torch.equal(run(transformer, inputs), bare_adapterless)


@pytest.mark.parametrize(("id_weight", "siglip_weight"), [(1.0, 0.0), (0.0, 1.0), (0.7, 0.3)])
def test_sparse_equals_dense(transformer, adapter, id_weight, siglip_weight):
    inputs = tiny_flux_inputs(batch=2, height=256, width=320, seed=3)
    arc, sig = random_identities(2, 3, seed=4)
    boxes = [
        [(0, 0, 100, 120), (80, 60, 200, 200), (250, 10, 320, 90)],  # overlap between 0 and 1
        [(30, 30, 50, 40), (-20, 200, 60, 300), (100, 100, 116, 116)],  # tiny and partly outside
    ]
    bare = run(transformer, inputs)
    outs = {}
    for mode in ("dense", "sparse"):
        adapter.attention_mode = mode
        with adapter.identities(
            arcface=arc,
            siglip=sig,
            boxes=boxes,
            height=256,
            width=320,
            id_weight=id_weight,
            siglip_weight=siglip_weight,
        ):
            outs[mode] = run(transformer, inputs)
    adapter.attention_mode = "sparse"
    assert (outs["dense"] - bare).abs().max() > 1e-2
    assert (outs["sparse"] - outs["dense"]).abs().max() <= 1e-6


def test_branch_with_zero_weight_is_skipped(transformer, adapter, monkeypatch):
    calls = {"arc": 0, "sig": 0}
    for name in ("arc", "sig"):
        for attn in getattr(adapter, f"ipa_{name}"):
            orig = attn.attend

            def counted(*args, _orig=orig, _name=name, **kwargs):
                calls[_name] += 1
                return _orig(*args, **kwargs)

            monkeypatch.setattr(attn, "attend", counted)
    sig_encoder_calls = []
    adapter.siglip_in_sig.register_forward_hook(lambda *a: sig_encoder_calls.append(1))
    inputs = tiny_flux_inputs()
    arc, sig = random_identities(1, 2)
    with adapter.identities(arcface=arc, siglip=sig, boxes=BOXES, height=256, width=256, siglip_weight=0.0):
        with_features = run(transformer, inputs)
    assert calls == {"arc": 4, "sig": 0} and not sig_encoder_calls
    with adapter.identities(arcface=arc, siglip=None, boxes=BOXES, height=256, width=256):
        assert torch.equal(run(transformer, inputs), with_features)
    assert calls == {"arc": 8, "sig": 0}
    with adapter.identities(arcface=arc, siglip=sig, boxes=BOXES, height=256, width=256, id_weight=0, siglip_weight=1):
        run(transformer, inputs)
    assert calls == {"arc": 8, "sig": 4} and sig_encoder_calls


def test_identity_batch_of_one_broadcasts(transformer, adapter):
    inputs = tiny_flux_inputs(batch=2, seed=5)
    arc, sig = random_identities(1, 2, seed=6)
    with adapter.identities(arcface=arc, siglip=sig, boxes=BOXES, height=256, width=256, siglip_weight=0.5):
        one = run(transformer, inputs)
    with adapter.identities(
        arcface=arc.expand(2, -1, -1),
        siglip=sig.expand(2, -1, -1, -1),
        boxes=BOXES * 2,
        height=256,
        width=256,
        siglip_weight=0.5,
    ):
        two = run(transformer, inputs)
    assert_close_fp32(two, one)  # batch 1 vs 2 may take different matmul kernels
    arc3, _ = random_identities(3, 2)
    with adapter.identities(arcface=arc3, boxes=BOXES * 3, height=256, width=256):
        with pytest.raises(IdentityInputError, match="3 batch items"):
            run(transformer, inputs)


def test_kv_cache_across_denoising_steps_changes_nothing(transformer, adapter):
    arc, sig = random_identities(1, 2)
    a_in, b_in = tiny_flux_inputs(seed=1), tiny_flux_inputs(seed=2)
    with adapter.identities(arcface=arc, siglip=sig, boxes=BOXES, height=256, width=256, siglip_weight=0.4):
        run(transformer, a_in)
        cached = run(transformer, b_in)  # second call reuses tokens and K/V
    with adapter.identities(arcface=arc, siglip=sig, boxes=BOXES, height=256, width=256, siglip_weight=0.4):
        fresh = run(transformer, b_in)
    assert torch.equal(cached, fresh)


def test_tokens_outside_every_box_get_exactly_zero_residual(transformer, adapter):
    residuals, handles = spy_residuals(transformer.transformer_blocks[0])
    arc, sig = random_identities(1, 2)
    try:
        with adapter.identities(arcface=arc, siglip=sig, boxes=BOXES, height=256, width=256, siglip_weight=0.5):
            run(transformer, tiny_flux_inputs())
    finally:
        for h in handles:
            h.remove()
    residual = residuals[0]
    cover = torch.zeros(16, 16, dtype=torch.bool)
    cover[0:7, 0:6] = True  # box 0: cols [0, 6), rows [0, 7)
    cover[8:15, 7:16] = True  # box 1: cols [7, 16), rows [8, 15)
    cover = cover.flatten()
    assert torch.equal(residual[0, ~cover], torch.zeros_like(residual[0, ~cover]))
    assert (residual[0, cover].abs().sum(-1) > 0).all()
    assert torch.isfinite(residual).all()


def spy_residuals(block):
    """Hooks that record, per call, the block's output after the adapter minus its bare output (same inputs)."""
    bare, residuals = [], []

    def before(module, args, kwargs):  # the bare block on the same inputs, hooks bypassed
        with torch.no_grad():
            bare.append(module.forward(*args, **kwargs)[1])

    def after(module, args, kwargs, output):  # registered after the adapter's hook: sees its result
        residuals.append(output[1] - bare[-1])

    handles = [
        block.register_forward_pre_hook(before, with_kwargs=True),
        block.register_forward_hook(after, with_kwargs=True),
    ]
    return residuals, handles


@pytest.mark.parametrize("target", [None, 256, slice(0, 256)])
def test_kontext_residual_touches_only_target_tokens(transformer, adapter, target):
    inputs = tiny_flux_inputs(extra_tokens=256)  # target 16×16 tokens, then 256 reference-image tokens
    arc, sig = random_identities(1, 2)
    full_box = [[(0, 0, 256, 256), (0, 0, 256, 256)]]  # covers the whole target image
    spies = [spy_residuals(transformer.transformer_blocks[0]), spy_residuals(transformer.single_transformer_blocks[-1])]
    try:
        with adapter.identities(
            arcface=arc, siglip=sig, boxes=full_box, height=256, width=256, siglip_weight=0.5, target_tokens=target
        ):
            out = run(transformer, inputs)
    finally:
        for _, handles in spies:
            for h in handles:
                h.remove()
    assert out.shape == (1, 512, 64)
    for residuals, _ in spies:
        diff = residuals[0].abs().sum(-1)[0]
        assert (diff[:256] > 0).all()
        assert torch.equal(diff[256:], torch.zeros(256))


def test_kontext_target_count_must_match_image(transformer, adapter):
    arc, _ = random_identities(1, 1)
    with adapter.identities(arcface=arc, boxes=[[(0, 0, 64, 64)]], height=256, width=256, target_tokens=100):
        with pytest.raises(IdentityInputError, match="256"):
            run(transformer, tiny_flux_inputs(extra_tokens=256))
    with adapter.identities(arcface=arc, boxes=[[(0, 0, 64, 64)]], height=512, width=512):
        with pytest.raises(IdentityInputError, match="fewer"):
            run(transformer, tiny_flux_inputs())


def test_kontext_pipeline_residual_only_on_target_tokens(transformer):
    """FluxKontextPipeline concatenates [target, reference] latents; the adapter must leave the second half."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16,) * 4,
        latent_channels=16,
        norm_num_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.0,
        shift_factor=0.0,
    ).eval()
    t = copy.deepcopy(transformer)
    pipe = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=t,
    )
    adapter = tiny_adapter(seed=1).attach(t)
    residuals, handles = spy_residuals(t.single_transformer_blocks[-1])
    arc, _ = random_identities(1, 1)
    ref_image = torch.rand(1, 3, 128, 128)
    try:
        with adapter.identities(arcface=arc, boxes=[[(0, 0, 128, 128)]], height=128, width=128):
            pipe(
                image=ref_image,
                prompt_embeds=torch.randn(1, 8, 64),
                pooled_prompt_embeds=torch.randn(1, 32),
                height=128,
                width=128,
                num_inference_steps=1,
                guidance_scale=3.5,
                output_type="latent",
                max_area=128 * 128,
                _auto_resize=False,
            )
    finally:
        for h in handles:
            h.remove()
        adapter.detach()
    r = residuals[0].abs().sum(-1)[0]
    assert r.shape[0] == 128  # 64 target + 64 reference tokens
    assert (r[:64] > 0).all() and torch.equal(r[64:], torch.zeros(64))


def test_input_validation(transformer, adapter):
    arc, sig = random_identities(1, 2)
    with pytest.raises(IdentityInputError, match="dlib"):
        with adapter.identities(arcface=torch.randn(1, 2, 128), boxes=BOXES, height=256, width=256):
            pass
    with pytest.raises(IdentityInputError, match="siglip features"):
        with adapter.identities(arcface=arc, boxes=BOXES, height=256, width=256, siglip_weight=0.5):
            pass
    with pytest.raises(InvalidBoxError, match="1 boxes per image for 2 people"):
        with adapter.identities(arcface=arc, boxes=[BOXES[0][:1]], height=256, width=256):
            pass
    with pytest.raises(InvalidBoxError, match="required"):
        with adapter.identities(arcface=arc, height=256, width=256):
            pass
    with pytest.raises(IdentityInputError, match="height and width"):
        with adapter.identities(arcface=arc, boxes=BOXES):
            pass
    no_sig = tiny_adapter(seed=0, use_siglip=False).attach(transformer)
    try:
        with pytest.raises(IdentityInputError, match="no SigLIP"):
            with no_sig.identities(arcface=arc, siglip=sig, boxes=BOXES, height=256, width=256, siglip_weight=1):
                pass
    finally:
        no_sig.detach()
    unattached = tiny_adapter(seed=0)
    with pytest.raises(RuntimeError, match="attach"):
        with unattached.identities(arcface=arc, boxes=BOXES, height=256, width=256):
            pass
    with pytest.raises(ValueError, match="3 double"):
        tiny_adapter(seed=0, num_double_blocks=3).attach(transformer)


def test_lora_on_the_transformer_keeps_working(transformer):
    from peft import LoraConfig

    t = copy.deepcopy(transformer)
    t.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    inputs = tiny_flux_inputs()
    bare_lora = run(t, inputs)
    assert (bare_lora - run(transformer, inputs)).abs().max() > 1e-3  # the LoRA is live
    adapter = tiny_adapter(seed=1).attach(t)
    arc, _ = random_identities(1, 2)
    assert torch.equal(run(t, inputs), bare_lora)
    with adapter.identities(arcface=arc, boxes=BOXES, height=256, width=256):
        with_ids = run(t, inputs)
    assert (with_ids - bare_lora).abs().max() > 1e-2
    adapter.detach()


def _loss_and_grads(transformer, adapter, inputs, arc, sig, checkpointing, backward_inside):
    adapter.zero_grad(set_to_none=True)
    transformer.gradient_checkpointing = checkpointing
    with adapter.identities(arcface=arc, siglip=sig, boxes=BOXES, height=256, width=256, siglip_weight=0.0):
        out = transformer(**inputs)[0]
        loss = (out**2).mean()
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gradients_reach_only_the_adapter(transformer):
    t = copy.deepcopy(transformer).train()
    t.requires_grad_(False)
    t.enable_gradient_checkpointing()
    adapter = tiny_adapter(seed=1).train().attach(t)
    inputs = tiny_flux_inputs(seed=7)
    arc, sig = random_identities(1, 2)
    try:
        loss_plain, grads_plain = _loss_and_grads(t, adapter, inputs, arc, sig, False, True)
        loss_ckpt, grads_ckpt = _loss_and_grads(t, adapter, inputs, arc, sig, True, True)
        loss_after, grads_after = _loss_and_grads(t, adapter, inputs, arc, sig, True, False)  # backward after exit
    finally:
        adapter.detach()
    assert all(p.grad is None for p in t.parameters())
    assert set(grads_plain) == set(grads_ckpt) == set(grads_after)
    assert any(n.startswith("ipa_arc.0.") for n in grads_plain) and any(n.startswith("ipa_arc.3.") for n in grads_plain)
    assert any(n.startswith("arcface_in_arc.") for n in grads_plain)
    assert not any(n.startswith(("ipa_sig", "siglip_in_sig", "arcface_in_sig")) for n in grads_plain)  # weight 0
    assert torch.allclose(loss_plain, loss_ckpt) and torch.allclose(loss_plain, loss_after)
    for name, g in grads_plain.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grads_after[name], g, rtol=1e-5, atol=1e-7)


def test_checkpoint_recompute_of_a_forward_without_identities_adds_nothing(transformer):
    t = copy.deepcopy(transformer).train()
    t.requires_grad_(False)
    t.enable_gradient_checkpointing()
    adapter = tiny_adapter(seed=1).train().attach(t)
    inputs = tiny_flux_inputs(seed=7)
    inputs["hidden_states"].requires_grad_(True)
    arc, _ = random_identities(1, 2)
    try:
        with adapter.identities(arcface=arc, boxes=BOXES, height=256, width=256):
            t(**inputs)[0].sum().backward()
        adapter.zero_grad(set_to_none=True)
        inputs["hidden_states"].grad = None
        out = t(**inputs)[0]  # no identities: a bare forward, recomputed during backward
        out.sum().backward()
    finally:
        adapter.detach()
    assert all(p.grad is None for p in adapter.parameters())
    g_bare = inputs["hidden_states"].grad.clone()
    inputs["hidden_states"].grad = None
    t(**inputs)[0].sum().backward()
    torch.testing.assert_close(inputs["hidden_states"].grad, g_bare)


def test_adapter_follows_transformer_dtype_choice(transformer):
    """A bf16 adapter on an fp32 transformer computes in bf16 and adds the residual in fp32."""
    a32 = tiny_adapter(seed=1)
    a16 = copy.deepcopy(a32).to(torch.bfloat16)
    inputs = tiny_flux_inputs()
    arc, _ = random_identities(1, 2)
    outs = []
    for a in (a32, a16):
        a.attach(transformer)
        with a.identities(arcface=arc, boxes=BOXES, height=256, width=256):
            outs.append(run(transformer, inputs))
        a.detach()
    assert outs[1].dtype == torch.float32
    rel = (outs[1] - outs[0]).norm() / (outs[0] - run(transformer, inputs)).norm()
    assert rel < 0.05


def test_save_and_from_pretrained_round_trip(tmp_path, transformer):
    a = tiny_adapter(seed=2)
    a.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "diffusion_pytorch_model.safetensors").is_file()
    b = WithAnyoneAdapter.from_pretrained(tmp_path / "adapter")
    assert b.config.hidden_size == 192 and b.config.num_double_blocks == 2
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_accelerate_offload_hooks_keep_working(transformer):
    """Under accelerate's offload hooks (weights on meta, loaded per call) the adapter gives the same output."""
    from accelerate import cpu_offload

    inputs = tiny_flux_inputs(seed=9)
    arc, sig = random_identities(1, 2, seed=9)
    kwargs = dict(arcface=arc, siglip=sig, boxes=BOXES, height=256, width=256, siglip_weight=0.5)
    adapter = tiny_adapter(seed=1).attach(transformer)
    with adapter.identities(**kwargs):
        expected = run(transformer, inputs)
    adapter.detach()
    t = cpu_offload(copy.deepcopy(transformer), execution_device=torch.device("cpu"))
    assert t.transformer_blocks[0].attn.to_q.weight.is_meta  # really offloaded
    adapter.attach(t)
    try:
        with adapter.identities(**kwargs):
            got = run(t, inputs)
        outside = run(t, inputs)
    finally:
        adapter.detach()
    assert_close_fp32(got, expected)
    assert torch.equal(outside, run(transformer, inputs))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_quantized_transformer_keeps_working(transformer):
    """Dynamically int8-quantised Linear layers inside the blocks: hooks still fire, outside stays bare."""
    from torch.ao.quantization import quantize_dynamic

    q = quantize_dynamic(copy.deepcopy(transformer), {torch.nn.Linear}, dtype=torch.qint8)
    assert "quantized" in type(q.transformer_blocks[0].attn.to_q).__module__
    inputs = tiny_flux_inputs(seed=10)
    bare_q = run(q, inputs)
    adapter = tiny_adapter(seed=1).attach(q)
    arc, _ = random_identities(1, 2)
    try:
        assert torch.equal(run(q, inputs), bare_q)
        with adapter.identities(arcface=arc, boxes=BOXES, height=256, width=256):
            with_ids = run(q, inputs)
    finally:
        adapter.detach()
    assert (with_ids - bare_q).abs().max() > 1e-2
