"""BFL single-file FLUX → diffusers at any width, and single files holding base + adapter keys."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from tiny_models.flux import random_identities, tiny_adapter, tiny_flux_inputs, tiny_flux_transformer
from tiny_models.numerics import assert_close_fp32

from withanyone.model import CheckpointError
from withanyone.model.bfl import bfl_to_diffusers, infer_flux_config, load_bfl_single_file, load_bfl_transformer


def to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hand-written diffusers → BFL layout (the inverse mapping, written independently for the test)."""
    out = {}
    n_double = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    for p in ("weight", "bias"):
        out[f"img_in.{p}"] = sd[f"x_embedder.{p}"]
        out[f"txt_in.{p}"] = sd[f"context_embedder.{p}"]
        out[f"time_in.in_layer.{p}"] = sd[f"time_text_embed.timestep_embedder.linear_1.{p}"]
        out[f"time_in.out_layer.{p}"] = sd[f"time_text_embed.timestep_embedder.linear_2.{p}"]
        out[f"vector_in.in_layer.{p}"] = sd[f"time_text_embed.text_embedder.linear_1.{p}"]
        out[f"vector_in.out_layer.{p}"] = sd[f"time_text_embed.text_embedder.linear_2.{p}"]
        out[f"guidance_in.in_layer.{p}"] = sd[f"time_text_embed.guidance_embedder.linear_1.{p}"]
        out[f"guidance_in.out_layer.{p}"] = sd[f"time_text_embed.guidance_embedder.linear_2.{p}"]
        out[f"final_layer.linear.{p}"] = sd[f"proj_out.{p}"]
        scale, shift = sd[f"norm_out.linear.{p}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
        for i in range(n_double):
            d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
            out[f"{b}img_mod.lin.{p}"] = sd[f"{d}norm1.linear.{p}"]
            out[f"{b}txt_mod.lin.{p}"] = sd[f"{d}norm1_context.linear.{p}"]
            out[f"{b}img_attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.to_{x}.{p}"] for x in "qkv"])
            out[f"{b}txt_attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.add_{x}_proj.{p}"] for x in "qkv"])
            out[f"{b}img_attn.proj.{p}"] = sd[f"{d}attn.to_out.0.{p}"]
            out[f"{b}txt_attn.proj.{p}"] = sd[f"{d}attn.to_add_out.{p}"]
            out[f"{b}img_mlp.0.{p}"] = sd[f"{d}ff.net.0.proj.{p}"]
            out[f"{b}img_mlp.2.{p}"] = sd[f"{d}ff.net.2.{p}"]
            out[f"{b}txt_mlp.0.{p}"] = sd[f"{d}ff_context.net.0.proj.{p}"]
            out[f"{b}txt_mlp.2.{p}"] = sd[f"{d}ff_context.net.2.{p}"]
        for i in range(n_single):
            d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
            out[f"{b}modulation.lin.{p}"] = sd[f"{d}norm.linear.{p}"]
            out[f"{b}linear1.{p}"] = torch.cat([sd[f"{d}attn.to_{x}.{p}"] for x in "qkv"] + [sd[f"{d}proj_mlp.{p}"]])
            out[f"{b}linear2.{p}"] = sd[f"{d}proj_out.{p}"]
    for i in range(n_double):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        out[f"{b}img_attn.norm.query_norm.scale"] = sd[f"{d}attn.norm_q.weight"]
        out[f"{b}img_attn.norm.key_norm.scale"] = sd[f"{d}attn.norm_k.weight"]
        out[f"{b}txt_attn.norm.query_norm.scale"] = sd[f"{d}attn.norm_added_q.weight"]
        out[f"{b}txt_attn.norm.key_norm.scale"] = sd[f"{d}attn.norm_added_k.weight"]
    for i in range(n_single):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        out[f"{b}norm.query_norm.scale"] = sd[f"{d}attn.norm_q.weight"]
        out[f"{b}norm.key_norm.scale"] = sd[f"{d}attn.norm_k.weight"]
    return out


def test_tiny_width_bfl_round_trip_gives_the_same_model():
    a = tiny_flux_transformer(seed=0)
    with torch.no_grad():  # non-trivial RMSNorm scales so a swapped q/k norm would show
        for n, p in a.named_parameters():
            if "norm_" in n:
                p.add_(0.2 * torch.randn_like(p))
    bfl = {f"model.diffusion_model.{k}": v for k, v in to_bfl(a.state_dict()).items()}
    assert infer_flux_config(bfl)["num_attention_heads"] == 3 and infer_flux_config(bfl)["axes_dims_rope"] == (
        8,
        28,
        28,
    )
    b = load_bfl_transformer(bfl)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    inputs = tiny_flux_inputs()
    with torch.no_grad():  # same weights; kernels may round differently on differently aligned buffers
        out_a = a(**inputs)[0]
        assert_close_fp32(b(**inputs)[0], out_a)


def test_flux_dev_width_matches_diffusers_own_converter_on_meta():
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    bfl = to_bfl(model.state_dict())
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = bfl_to_diffusers(bfl)
    assert ours.keys() == theirs.keys() == model.state_dict().keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    cfg = infer_flux_config(bfl)
    assert (cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["axes_dims_rope"]) == (24, 128, (16, 56, 56))


def test_single_file_with_base_and_adapter(tmp_path):
    transformer = tiny_flux_transformer(seed=0)
    adapter = tiny_adapter(seed=3)
    base = {f"model.diffusion_model.{k}": v for k, v in to_bfl(transformer.state_dict()).items()}
    path = adapter.save_authors_checkpoint(tmp_path / "flux1-withanyone.safetensors", base_state_dict=base)
    t2, a2 = load_bfl_single_file(path)
    assert a2.load_report.ok and len(a2.load_report.base_keys) == len(base)
    assert a2.load_report.source == str(path)
    inputs = tiny_flux_inputs()
    arc, sig = random_identities(1, 2)
    kwargs = dict(
        arcface=arc,
        siglip=sig,
        boxes=[[(0, 0, 120, 120), (130, 100, 250, 250)]],
        height=256,
        width=256,
        siglip_weight=0.5,
    )
    outs = []
    for t, a in ((transformer, adapter), (t2, a2)):
        a.attach(t)
        with torch.no_grad(), a.identities(**kwargs):
            outs.append(t(**inputs)[0])
        a.detach()
    with torch.no_grad():
        assert (outs[0] - transformer(**inputs)[0]).abs().max() > 1e-2
    assert_close_fp32(outs[1], outs[0])


def test_not_a_bfl_file_names_the_missing_key(tmp_path):
    save_file({"img_in.weight": torch.zeros(2, 2)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match="query_norm"):
        load_bfl_transformer(tmp_path / "partial.safetensors")
