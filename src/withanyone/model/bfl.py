"""Black Forest Labs single-file FLUX checkpoints → diffusers ``FluxTransformer2DModel``, at any width.

diffusers' own converter hard-codes width 3072 and MLP ratio 4 (facts sheet §1); this one reads both
from the tensors, so tiny test models and the authors' single file (base + adapter keys) load alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from withanyone.model.checkpoint import CheckpointError, load_safetensors, split_authors_state_dict

if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel

    from withanyone.model.adapter import WithAnyoneAdapter

__all__ = ["bfl_to_diffusers", "infer_flux_config", "load_bfl_transformer", "load_bfl_single_file"]

_BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in _BFL_PREFIXES:
            if k.startswith(p):
                k = k[len(p) :]
                break
        out[k] = v
    return out


def _count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    idx = {int(k.split(".", 2)[1]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def infer_flux_config(
    bfl_sd: dict[str, torch.Tensor], axes_dims_rope: tuple[int, int, int] | None = None
) -> dict[str, Any]:
    """``FluxTransformer2DModel`` config from BFL tensor shapes (RoPE axes: FLUX's split of the head dim)."""
    sd = _strip(bfl_sd)
    try:
        width, in_channels = sd["img_in.weight"].shape
        head_dim = int(sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0])
        joint = int(sd["txt_in.weight"].shape[1])
        pooled = int(sd["vector_in.in_layer.weight"].shape[1])
        out_channels = int(sd["final_layer.linear.weight"].shape[0])
    except KeyError as exc:
        raise CheckpointError("<BFL state dict>", f"not a BFL FLUX checkpoint: missing {exc.args[0]}") from None
    if axes_dims_rope is None:
        if head_dim % 16:
            raise CheckpointError("<BFL state dict>", f"head dim {head_dim}: pass axes_dims_rope= explicitly")
        axes_dims_rope = (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16)  # (16, 56, 56) at 128
    return {
        "patch_size": 1,
        "in_channels": int(in_channels),
        "out_channels": out_channels if out_channels != in_channels else None,
        "num_layers": _count(sd, "double_blocks."),
        "num_single_layers": _count(sd, "single_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": int(width) // head_dim,
        "joint_attention_dim": joint,
        "pooled_projection_dim": pooled,
        "guidance_embeds": any(k.startswith("guidance_in.") for k in sd),
        "axes_dims_rope": tuple(axes_dims_rope),
    }


def bfl_to_diffusers(bfl_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename / split BFL FLUX keys into diffusers' layout (fused qkv and linear1 split by their real widths)."""
    sd = dict(_strip(bfl_sd))
    out: dict[str, torch.Tensor] = {}

    def move(src: str, dst: str) -> None:
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in sd:
                out[f"{dst}.{suffix}"] = sd.pop(f"{src}.{suffix}")

    for src, dst in (
        ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        ("txt_in", "context_embedder"),
        ("img_in", "x_embedder"),
        ("final_layer.linear", "proj_out"),
    ):
        move(src, dst)
    for suffix in ("weight", "bias"):  # BFL's final modulation is (shift, scale); diffusers' is (scale, shift)
        t = sd.pop(f"final_layer.adaLN_modulation.1.{suffix}")
        shift, scale = t.chunk(2, dim=0)
        out[f"norm_out.linear.{suffix}"] = torch.cat([scale, shift], dim=0)

    for i in range(_count(sd, "double_blocks.")):
        s, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        move(s + "img_mod.lin", d + "norm1.linear")
        move(s + "txt_mod.lin", d + "norm1_context.linear")
        for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for suffix in ("weight", "bias"):
                parts = sd.pop(f"{s}{stream}_attn.qkv.{suffix}").chunk(3, dim=0)
                for name, part in zip(names, parts, strict=True):
                    out[f"{d}attn.{name}.{suffix}"] = part.clone()
        out[d + "attn.norm_q.weight"] = sd.pop(s + "img_attn.norm.query_norm.scale")
        out[d + "attn.norm_k.weight"] = sd.pop(s + "img_attn.norm.key_norm.scale")
        out[d + "attn.norm_added_q.weight"] = sd.pop(s + "txt_attn.norm.query_norm.scale")
        out[d + "attn.norm_added_k.weight"] = sd.pop(s + "txt_attn.norm.key_norm.scale")
        move(s + "img_mlp.0", d + "ff.net.0.proj")
        move(s + "img_mlp.2", d + "ff.net.2")
        move(s + "txt_mlp.0", d + "ff_context.net.0.proj")
        move(s + "txt_mlp.2", d + "ff_context.net.2")
        move(s + "img_attn.proj", d + "attn.to_out.0")
        move(s + "txt_attn.proj", d + "attn.to_add_out")

    for i in range(_count(sd, "single_blocks.")):
        s, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        move(s + "modulation.lin", d + "norm.linear")
        width = sd[s + "linear2.weight"].shape[0]
        for suffix in ("weight", "bias"):
            t = sd.pop(f"{s}linear1.{suffix}")
            mlp = t.shape[0] - 3 * width
            parts = torch.split(t, (width, width, width, mlp), dim=0)
            for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), parts, strict=True):
                out[f"{d}{name}.{suffix}"] = part.clone()
        out[d + "attn.norm_q.weight"] = sd.pop(s + "norm.query_norm.scale")
        out[d + "attn.norm_k.weight"] = sd.pop(s + "norm.key_norm.scale")
        move(s + "linear2", d + "proj_out")
    if sd:
        raise CheckpointError("<BFL state dict>", f"{len(sd)} keys left unconverted: {sorted(sd)[:5]}")
    return out


def load_bfl_transformer(
    source: str | Path | dict[str, torch.Tensor],
    *,
    torch_dtype: torch.dtype | None = None,
    axes_dims_rope: tuple[int, int, int] | None = None,
) -> FluxTransformer2DModel:
    """A ``FluxTransformer2DModel`` from BFL-layout weights (a file or a state dict without adapter keys)."""
    from diffusers import FluxTransformer2DModel

    name = "<state dict>" if isinstance(source, dict) else str(source)
    sd = source if isinstance(source, dict) else load_safetensors(source)
    config = infer_flux_config(sd, axes_dims_rope)
    converted = bfl_to_diffusers(sd)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    result = model.load_state_dict(converted, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            name, f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]} after conversion"
        )
    if torch_dtype is not None and any(p.dtype != torch_dtype for p in model.parameters()):
        model.to(torch_dtype)
    return model.eval()


def load_bfl_single_file(
    path: str | Path | dict[str, torch.Tensor],
    *,
    torch_dtype: torch.dtype | None = None,
    axes_dims_rope: tuple[int, int, int] | None = None,
) -> tuple[FluxTransformer2DModel, WithAnyoneAdapter]:
    """Both halves of a single file holding base FLUX and WithAnyone adapter keys: (transformer, adapter)."""
    from withanyone.model.adapter import WithAnyoneAdapter

    sd = path if isinstance(path, dict) else load_safetensors(path)
    adapter_sd, base_sd = split_authors_state_dict(sd)
    if not base_sd:
        raise CheckpointError(str(path) if not isinstance(path, dict) else "<state dict>", "holds no base FLUX keys")
    transformer = load_bfl_transformer(base_sd, torch_dtype=torch_dtype, axes_dims_rope=axes_dims_rope)
    adapter = WithAnyoneAdapter.from_authors_checkpoint(
        sd, num_double_blocks=len(transformer.transformer_blocks), torch_dtype=torch_dtype
    )
    if not isinstance(path, dict):
        adapter.load_report.source = str(path)
    return transformer, adapter
