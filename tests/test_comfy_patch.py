"""The ComfyUI patch functions, model-free: ComfyUI's block-replacement protocol emulated on a tiny transformer.

``comfy_forward`` below runs a tiny diffusers FLUX transformer the way ComfyUI's ``Flux.forward`` /
``forward_orig`` run theirs: latents packed 2×2 into tokens, Kontext reference tokens appended after the
target's, a ``WrappersMP.DIFFUSION_MODEL`` wrapper chain, ``patches_replace["dit"]`` with
``(args, {"original_block": f})``, and single blocks fed text + image concatenated (text first). With the
same blocks, the adapter's own hooks (what ``WithAnyonePipeline`` adds) are the reference.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from withanyone.comfy import FaceBoxes, Person, WithAnyonePatch, apply_withanyone
from withanyone.comfy.patch import TRANSFORMER_OPTIONS_KEY, BlockPatch, latent_token_grid
from withanyone.model import WithAnyoneAdapter
from withanyone.model.masks import build_identity_mask
from withanyone.pipeline.tiny import TINY_SIGLIP_DIM, tiny_adapter, tiny_transformer

TXT = 7  # text tokens (odd on purpose: a wrong split point in single blocks cannot line up by chance)


class FakeExecutor:
    """ComfyUI's WrapperExecutor for one wrapper: ``class_obj`` is the diffusion model, calling runs the rest."""

    def __init__(self, fn, class_obj, wrappers):
        self.fn, self.class_obj, self.wrappers = fn, class_obj, wrappers

    def __call__(self, *args, **kwargs):
        if self.wrappers:
            return self.wrappers[0](FakeExecutor(self.fn, self.class_obj, self.wrappers[1:]), *args, **kwargs)
        return self.fn(*args, **kwargs)


class FakeDiffusion:
    patch_size = 2

    def __init__(self, transformer):
        self.t = transformer
        self.double_blocks = transformer.transformer_blocks
        self.single_blocks = transformer.single_transformer_blocks
        self.hidden_size = transformer.config.num_attention_heads * transformer.config.attention_head_dim


def pack(x):
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def grid_ids(h, w, index=0):
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def inputs(seed=0, h=8, w=12, refs=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, h, w, generator=g)
    ctx = torch.randn(1, TXT, 64, generator=g)
    pooled = torch.randn(1, 32, generator=g)
    ref_latents = [torch.randn(1, 16, rh, rw, generator=g) for rh, rw in refs] or None
    return x, ctx, pooled, ref_latents


def tokens_of(x, ref_latents):
    img, ids = pack(x), grid_ids(*x.shape[-2:])
    for ref in ref_latents or ():
        img = torch.cat([img, pack(ref)], 1)
        ids = torch.cat([ids, grid_ids(*ref.shape[-2:], index=1)])
    return img, ids


def comfy_forward(transformer, x, t, ctx, pooled, transformer_options, ref_latents=None, record=None):
    """ComfyUI's Flux.forward protocol on diffusers blocks; returns the image-stream output tokens."""
    tr = transformer
    diffusion = FakeDiffusion(tr)
    wrappers = list(transformer_options.get("wrappers", {}).get("diffusion_model", {}).values())
    wrappers = [w for ws in wrappers for w in ws]

    def _forward(x, timestep, context, y, guidance, ref_latents, control, to):
        img, img_ids = tokens_of(x, ref_latents)
        n_target = (x.shape[-2] // 2) * (x.shape[-1] // 2)
        hidden = tr.x_embedder(img)
        temb = tr.time_text_embed(timestep * 1000, guidance * 1000, y)
        txt = tr.context_embedder(context)
        pe = tr.pos_embed(torch.cat([torch.zeros(context.shape[1], 3), img_ids]))
        replace = to.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(tr.transformer_blocks):
            def double(args, block=block):
                e, h = block(hidden_states=args["img"], encoder_hidden_states=args["txt"], temb=args["vec"],
                             image_rotary_emb=args["pe"])
                return {"img": h, "txt": e}
            args = {"img": hidden, "txt": txt, "vec": temb, "pe": pe, "attn_mask": None, "transformer_options": to}
            out = replace[("double_block", i)](args, {"original_block": double}) if ("double_block", i) in replace \
                else double(args)
            hidden, txt = out["img"], out["txt"]
        cat = torch.cat([txt, hidden], 1)
        n_txt = txt.shape[1]
        for i, block in enumerate(tr.single_transformer_blocks):
            def single(args, block=block):
                e, h = block(hidden_states=args["img"][:, n_txt:], encoder_hidden_states=args["img"][:, :n_txt],
                             temb=args["vec"], image_rotary_emb=args["pe"])
                return {"img": torch.cat([e, h], 1)}
            args = {"img": cat, "vec": temb, "pe": pe, "attn_mask": None, "transformer_options": to}
            out = replace[("single_block", i)](args, {"original_block": single}) if ("single_block", i) in replace \
                else single(args)
            cat = out["img"]
            if record is not None:
                record.append(cat)
        return cat[:, n_txt:n_txt + n_target] if ref_latents else cat[:, n_txt:]

    ex = FakeExecutor(_forward, diffusion, wrappers)
    guidance = torch.full((x.shape[0],), 4.0)
    return ex(x, t, ctx, pooled, guidance, ref_latents, None, dict(transformer_options))


def hooks_forward(transformer, adapter, x, t, ctx, pooled, ref_latents=None, **identities):
    """The pipeline's path: the adapter's hooks on the same transformer, inside ``identities()``."""
    img, img_ids = tokens_of(x, ref_latents)
    n_target = (x.shape[-2] // 2) * (x.shape[-1] // 2)
    record = []
    handles = [blk.register_forward_hook(lambda m, a, o: record.append(o[1]))
               for blk in transformer.single_transformer_blocks]
    tr = transformer
    try:
        with adapter.identities(**identities):
            # run the transformer's own forward up to the blocks, as FluxTransformer2DModel.forward does
            out = tr(hidden_states=img, encoder_hidden_states=ctx, pooled_projections=pooled,
                     timestep=t, img_ids=img_ids, txt_ids=torch.zeros(ctx.shape[1], 3),
                     guidance=torch.full((x.shape[0],), 4.0), return_dict=False)[0]
    finally:
        for h in handles:
            h.remove()
    return record[-1][:, :n_target], out


class FakeSampling:
    def percent_to_sigma(self, p):
        return 1.0 - p  # FLUX: sigma runs 1 → 0 linearly in percent


class FakeModelPatcher:
    """The ModelPatcher methods apply_withanyone uses, with ComfyUI's clone semantics (model_options deep-copied)."""

    def __init__(self, transformer):
        self.diffusion = FakeDiffusion(transformer)
        self.model_options = {"transformer_options": {}}
        self.wrappers = {}

    def clone(self):
        n = FakeModelPatcher.__new__(FakeModelPatcher)
        n.diffusion = self.diffusion
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = {k: {k1: list(v1) for k1, v1 in v.items()} for k, v in self.wrappers.items()}
        return n

    def get_model_object(self, name):
        return {"diffusion_model": self.diffusion, "model_sampling": FakeSampling()}[name]

    def set_model_patch_replace(self, patch, name, block_name, number):
        to = self.model_options["transformer_options"]
        to.setdefault("patches_replace", {}).setdefault(name, {})[(block_name, number)] = patch

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def sampling_options(self):
        """What ComfyUI's sampler hands the diffusion model: transformer_options with the wrappers merged in."""
        to = dict(self.model_options["transformer_options"])
        to["wrappers"] = self.wrappers
        return to


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
    assert base.model_options == {"transformer_options": {}} and base.wrappers == {}
    assert torch.equal(comfy_forward(tr, x, t, ctx, pooled, base.sampling_options()), bare)
    # the adapter's weights are shared, not deep-copied, by a later clone
    patch = next(iter(m1.wrappers["diffusion_model"].values()))[0]
    again = m1.clone()
    assert next(iter(again.wrappers["diffusion_model"].values()))[0] is patch
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
    patch = next(iter(m.wrappers["diffusion_model"].values()))[0]
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
