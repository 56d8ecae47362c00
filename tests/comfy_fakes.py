"""ComfyUI's FLUX calling protocol emulated on a tiny diffusers transformer, and a ModelPatcher stand-in.

``comfy_forward`` runs a tiny diffusers FLUX transformer the way ComfyUI's ``Flux.forward`` / ``forward_orig``
run theirs: latents packed 2×2 into tokens, Kontext reference tokens appended after the target's, the
``WrappersMP.DIFFUSION_MODEL`` wrapper chain, ``patches_replace["dit"]`` called as ``(args, {"original_block":
f})``, and single blocks fed text + image concatenated (text first). ``FakeModelPatcher`` has the ModelPatcher
methods the pack uses, with ComfyUI's clone semantics (``model_options`` deep-copied, wrapper lists copied).
"""

from __future__ import annotations

import copy

import torch

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
        """What ComfyUI's sampler hands the diffusion model: transformer_options with ModelPatcher.wrappers merged."""
        to = dict(self.model_options["transformer_options"])
        merged = {k: dict(v) for k, v in to.get("wrappers", {}).items()}
        for k, v in self.wrappers.items():
            for k1, v1 in v.items():
                merged.setdefault(k, {}).setdefault(k1, []).extend(v1)
        to["wrappers"] = merged
        return to

    def diffusion_wrappers(self):
        """Every DIFFUSION_MODEL wrapper the diffusion model would see."""
        return [w for ws in self.sampling_options()["wrappers"].get("diffusion_model", {}).values() for w in ws]
