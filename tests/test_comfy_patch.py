"""The ComfyUI patch functions, model-free: ComfyUI's block-replacement protocol (``comfy_fakes``) on a tiny
transformer, with the adapter's own hooks on the same blocks (what ``WithAnyonePipeline`` adds) as the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comfy_fakes import TXT, FakeModelPatcher, comfy_forward, grid_ids, hooks_forward, inputs  # noqa: E402

from withanyone.comfy import FaceBoxes, Person, WithAnyonePatch, apply_withanyone
from withanyone.comfy.patch import TRANSFORMER_OPTIONS_KEY, BlockPatch, latent_token_grid
from withanyone.model import WithAnyoneAdapter
from withanyone.model.masks import build_identity_mask
from withanyone.pipeline.tiny import TINY_SIGLIP_DIM, tiny_adapter, tiny_transformer


@pytest.fixture(scope="module")
def models():
    tr = tiny_transformer(0)
    ad = tiny_adapter(1)
    with torch.no_grad():  # lift the tiny adapter's output so the residual is far above float noise
        for attn in list(ad.ipa_arc) + list(ad.ipa_sig):
            attn.to_out.weight.mul_(20)
    ad.attach(tr)
    return tr, ad


def people(n, seed=0, siglip=False):
    rng = np.random.default_rng(seed)
    return [Person(rng.normal(size=512).astype(np.float32) * 20,
                   siglip=torch.from_numpy(rng.normal(size=(256, TINY_SIGLIP_DIM)).astype(np.float32)) if siglip
                   else None) for _ in range(n)]


BOXES2 = FaceBoxes([(0, 0, 40, 32), (48, 16, 96, 64)], width=96, height=64)


@torch.no_grad()
@pytest.mark.parametrize("siglip_weight", [0.0, 0.6])
def test_patched_forward_equals_pipeline_hooks_two_people(models, siglip_weight):
    tr, ad = models
    x, ctx, pooled, _ = inputs(0)  # 8×12 latent = 64×96 px, 4×6 tokens
    t = torch.tensor([0.7])
    ps = people(2, siglip=siglip_weight > 0)
    base = FakeModelPatcher(tr)
    m = apply_withanyone(base, ad, ps, BOXES2, id_weight=1.0, siglip_weight=siglip_weight)
    rec = []
    got = comfy_forward(tr, x, t, ctx, pooled, m.sampling_options(), record=rec)
    arc = torch.from_numpy(np.stack([p.arcface for p in ps]))[None]
    sig = torch.stack([p.siglip for p in ps])[None] if siglip_weight else None
    want_last, _ = hooks_forward(tr, ad, x, t, ctx, pooled, arcface=arc, siglip=sig, boxes=[BOXES2.boxes],
                                 height=64, width=96, id_weight=1.0, siglip_weight=siglip_weight)
    bare = comfy_forward(tr, x, t, ctx, pooled, {})
    assert (got - bare).abs().max() > 1e-2  # the identity changes the output...
    torch.testing.assert_close(got, want_last, rtol=0, atol=1e-5)  # ...exactly as the pipeline's hooks do
    # single blocks: the text part of the concatenated stream is what the original block gave (no residual)
    assert rec[-1].shape[1] == TXT + 24


@torch.no_grad()
def test_weight_zero_is_bit_identical_and_base_model_untouched(models):
    tr, ad = models
    x, ctx, pooled, _ = inputs(1)
    t = torch.tensor([0.5])
    base = FakeModelPatcher(tr)
    bare = comfy_forward(tr, x, t, ctx, pooled, base.sampling_options())
    m0 = apply_withanyone(base, ad, people(2), BOXES2, id_weight=0.0, siglip_weight=0.0)
    assert torch.equal(comfy_forward(tr, x, t, ctx, pooled, m0.sampling_options()), bare)
    m1 = apply_withanyone(base, ad, people(2), BOXES2, id_weight=1.0)
    assert not torch.equal(comfy_forward(tr, x, t, ctx, pooled, m1.sampling_options()), bare)
    # clone semantics: the input model has no patches and still gives the bare output
    assert base.model_options == {"transformer_options": {}} and base.diffusion_wrappers() == []
    assert torch.equal(comfy_forward(tr, x, t, ctx, pooled, base.sampling_options()), bare)
    # the adapter's weights are shared, not deep-copied, by a later clone
    (patch,) = m1.diffusion_wrappers()
    again = m1.clone()
    assert again.diffusion_wrappers() == [patch] and again.diffusion_wrappers()[0] is patch
    assert again.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)].owner is patch


@torch.no_grad()
def test_outside_boxes_unchanged_and_percent_range(models):
    tr, ad = models
    x, ctx, pooled, _ = inputs(2)
    base = FakeModelPatcher(tr)
    boxes = FaceBoxes([(0, 0, 32, 32)], width=96, height=64)  # tokens rows 0-1, cols 0-1
    m = apply_withanyone(base, ad, people(1), boxes, id_weight=1.0)
    # one double block only: its residual reaches only the boxed tokens (later blocks mix tokens)
    to = m.sampling_options()
    to["patches_replace"] = {"dit": {("double_block", 0): to["patches_replace"]["dit"][("double_block", 0)]}}
    (patch,) = m.diffusion_wrappers()
    fwd = patch.plan(x, None, 2, txt_len=TXT)
    blk = tr.transformer_blocks[0]
    img = torch.randn(1, 24, 192)
    txt = torch.randn(1, TXT, 192)
    temb = torch.randn(1, 192)
    pe = tr.pos_embed(torch.cat([torch.zeros(TXT, 3), grid_ids(8, 12)]))

    def original(args):
        e, h = blk(hidden_states=args["img"], encoder_hidden_states=args["txt"], temb=args["vec"],
                   image_rotary_emb=args["pe"])
        return {"img": h, "txt": e}

    args = {"img": img, "txt": txt, "vec": temb, "pe": pe, "attn_mask": None,
            "transformer_options": {TRANSFORMER_OPTIONS_KEY: {patch.key: fwd}}}
    out = to["patches_replace"]["dit"][("double_block", 0)](args, {"original_block": original})
    ref = original(args)
    changed = (out["img"] - ref["img"]).abs().amax(-1)[0].reshape(4, 6) > 0
    inside = torch.zeros(4, 6, dtype=torch.bool)
    inside[:2, :2] = True
    assert torch.equal(changed, inside)
    assert torch.equal(out["txt"], ref["txt"])
    # start/end percent: outside [start, end] the call runs bare (sigma 0.9 is at 10 %)
    late = apply_withanyone(base, ad, people(1), boxes, id_weight=1.0, start_percent=0.5, end_percent=1.0)
    bare = comfy_forward(tr, x, torch.tensor([0.9]), ctx, pooled, {})
    assert torch.equal(comfy_forward(tr, x, torch.tensor([0.9]), ctx, pooled, late.sampling_options()), bare)
    assert not torch.equal(comfy_forward(tr, x, torch.tensor([0.3]), ctx, pooled, late.sampling_options()),
                           comfy_forward(tr, x, torch.tensor([0.3]), ctx, pooled, {}))


def dense_residual(ad, index, img, arcface, boxes, height, width, weight, offset_tokens=None):
    """Reference: the adapter's dense computation on every image token, written from the public modules."""
    tokens = ad.encode_arcface(arcface)
    n = img.shape[1] if offset_tokens is None else offset_tokens
    mask = build_identity_mask(boxes, height, width, ad.config.num_arc_tokens, n)
    res = weight * ad.ipa_arc[index](tokens, img[:, :n], mask)
    return torch.cat([img[:, :n] + res, img[:, n:]], 1)


@torch.no_grad()
def test_single_block_takes_text_length_from_double_blocks(models):
    tr, ad = models
    x, _, _, _ = inputs(3)
    ps = people(2)
    patch = WithAnyonePatch(ad, ps, BOXES2, id_weight=0.8)
    fwd = patch.plan(x, None, 2, txt_len=None)
    dbl = BlockPatch(patch, "double", 1, 1)
    sgl = BlockPatch(patch, "single", 0, 2)
    opts = {TRANSFORMER_OPTIONS_KEY: {patch.key: fwd}}
    img, txt = torch.randn(1, 24, 192), torch.randn(1, 11, 192)  # the double block sees 11 text tokens
    dbl({"img": img, "txt": txt, "transformer_options": opts}, {"original_block": lambda a: dict(a)})
    assert fwd.txt_len == 11
    cat = torch.randn(1, 11 + 24, 192)
    out = sgl({"img": cat, "transformer_options": opts}, {"original_block": lambda a: {"img": a["img"]}})["img"]
    assert torch.equal(out[:, :11], cat[:, :11])  # text tokens untouched
    arc = torch.from_numpy(np.stack([p.arcface for p in ps]))[None]
    want = dense_residual(ad, 2, cat[:, 11:], arc, [BOXES2.boxes], 64, 96, 0.8)
    torch.testing.assert_close(out[:, 11:], want, rtol=0, atol=1e-5)
    # a token count that does not add up is refused with the numbers, not silently mis-split
    with pytest.raises(ValueError, match="single block 0: 30 tokens"):
        sgl({"img": cat[:, :30], "transformer_options": opts}, {"original_block": lambda a: {"img": a["img"]}})


@torch.no_grad()
def test_kontext_reference_tokens_untouched_and_pipeline_parity(models):
    tr, ad = models
    x, ctx, pooled, refs = inputs(4, refs=[(8, 8)])  # target 4×6 = 24 tokens, reference 4×4 = 16 after them
    t = torch.tensor([0.6])
    ps = people(2)
    patch = WithAnyonePatch(ad, ps, BOXES2, id_weight=1.0)
    fwd = patch.plan(x, refs, 2, txt_len=TXT)
    assert fwd.image_tokens == 24 + 16
    sgl = BlockPatch(patch, "single", 1, 3)
    cat = torch.randn(1, TXT + 40, 192)
    out = sgl({"img": cat, "transformer_options": {TRANSFORMER_OPTIONS_KEY: {patch.key: fwd}}},
              {"original_block": lambda a: {"img": a["img"]}})["img"]
    assert torch.equal(out[:, :TXT], cat[:, :TXT]) and torch.equal(out[:, TXT + 24:], cat[:, TXT + 24:])
    assert not torch.equal(out[:, TXT:TXT + 24], cat[:, TXT:TXT + 24])
    arc = torch.from_numpy(np.stack([p.arcface for p in ps]))[None]
    want = dense_residual(ad, 3, cat[:, TXT:], arc, [BOXES2.boxes], 64, 96, 1.0, offset_tokens=24)
    torch.testing.assert_close(out[:, TXT:], want, rtol=0, atol=1e-5)
    # whole forward with the reference latent: equals the pipeline's hooks with target_tokens (Kontext)
    m = apply_withanyone(FakeModelPatcher(tr), ad, ps, BOXES2, id_weight=1.0)
    got = comfy_forward(tr, x, t, ctx, pooled, m.sampling_options(), ref_latents=refs)
    want_last, _ = hooks_forward(tr, ad, x, t, ctx, pooled, ref_latents=refs, arcface=arc, boxes=[BOXES2.boxes],
                                 height=64, width=96, id_weight=1.0, target_tokens=24)
    torch.testing.assert_close(got, want_last, rtol=0, atol=1e-5)


def test_boxes_rescaled_to_the_latent_and_grid_padding():
    assert latent_token_grid(125, 128) == (63, 64)  # ComfyUI pads odd latents up to the patch
    b = FaceBoxes([(100, 50, 300, 250)], width=1024, height=512)
    assert b.scaled(1024, 512) == [(100, 50, 300, 250)]
    assert b.scaled(512, 256) == [(50.0, 25.0, 150.0, 125.0)]
    with pytest.raises(ValueError, match="entirely outside"):
        FaceBoxes([(2000, 0, 2100, 50)], width=1024, height=512)


def test_refusals_name_the_problem(models):
    tr, ad = models
    base = FakeModelPatcher(tr)
    with pytest.raises(ValueError, match="2 people but 1 face boxes"):
        apply_withanyone(base, ad, people(2), FaceBoxes([(0, 0, 16, 16)], 96, 64))
    with pytest.raises(ValueError, match="needs SigLIP features"):
        apply_withanyone(base, ad, people(1), FaceBoxes([(0, 0, 16, 16)], 96, 64), siglip_weight=0.5)
    with pytest.raises(ValueError, match="128-d"):
        apply_withanyone(base, ad, [Person(np.ones(128, np.float32))], FaceBoxes([(0, 0, 16, 16)], 96, 64))
    other = WithAnyoneAdapter(num_double_blocks=2, num_single_blocks=3, hidden_size=192, num_heads=3, head_dim=64,
                              siglip_dim=TINY_SIGLIP_DIM)
    with pytest.raises(ValueError, match="2 double \\+ 3 single blocks"):
        apply_withanyone(base, other, people(1), FaceBoxes([(0, 0, 16, 16)], 96, 64))


@torch.no_grad()
def test_two_applies_stack_and_model_management_hooks(models):
    tr, ad = models
    x, ctx, pooled, _ = inputs(5)
    t = torch.tensor([0.5])
    base = FakeModelPatcher(tr)
    one = FaceBoxes([(0, 0, 32, 32)], 96, 64)
    other = FaceBoxes([(64, 32, 96, 64)], 96, 64)
    p1, p2 = people(2, seed=3)
    a = apply_withanyone(base, ad, [p1], one, id_weight=1.0)
    ab = apply_withanyone(a, ad, [p2], other, id_weight=1.0)  # a second Apply on top of the first
    both = apply_withanyone(base, ad, [p1, p2], FaceBoxes(one.boxes + other.boxes, 96, 64), id_weight=1.0)
    assert len(ab.diffusion_wrappers()) == 2
    got = comfy_forward(tr, x, t, ctx, pooled, ab.sampling_options())
    bare = comfy_forward(tr, x, t, ctx, pooled, {})
    only_a = comfy_forward(tr, x, t, ctx, pooled, a.sampling_options())
    assert not torch.equal(got, only_a) and not torch.equal(got, bare)  # the second patch adds, not replaces
    # disjoint boxes, separate masks: stacking one person twice ≈ one Apply with both (the residuals of a block
    # are added in sequence rather than together, so equal up to float rounding)
    torch.testing.assert_close(got, comfy_forward(tr, x, t, ctx, pooled, both.sampling_options()), rtol=0,
                               atol=1e-4)
    # ComfyUI's model management: .to(device) drops cached ID tokens; models() is empty without a ModelPatcher
    (patch,) = a.diffusion_wrappers()
    patch.plan(x, None)
    assert patch._states
    block = a.model_options["transformer_options"]["patches_replace"]["dit"][("single_block", 1)]
    assert block.to(torch.device("cpu")) is block and not patch._states and block.models() == []
    assert patch.to(torch.float16) is patch  # a dtype from model_patches_to(model_dtype) is ignored


@torch.no_grad()
def test_batch_of_two_latents_cond_and_uncond(models):
    """ComfyUI batches cond and uncond (cfg > 1) and several latents: the identities apply to every item."""
    tr, ad = models
    x, ctx, pooled, _ = inputs(6)
    x2 = torch.cat([x, torch.randn_like(x)])
    ctx2, pooled2 = torch.cat([ctx, torch.randn_like(ctx)]), torch.cat([pooled, torch.randn_like(pooled)])
    t = torch.tensor([0.4, 0.4])
    ps = people(2, seed=4)
    m = apply_withanyone(FakeModelPatcher(tr), ad, ps, BOXES2, id_weight=1.0)
    got = comfy_forward(tr, x2, t, ctx2, pooled2, m.sampling_options())
    arc = torch.from_numpy(np.stack([p.arcface for p in ps]))[None]
    want, _ = hooks_forward(tr, ad, x2, t, ctx2, pooled2, arcface=arc, boxes=[BOXES2.boxes], height=64, width=96,
                            id_weight=1.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.equal(got, comfy_forward(tr, x2, t, ctx2, pooled2, {}))
