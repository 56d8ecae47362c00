"""WithAnyone on ComfyUI's own FLUX model: ``dit`` block replacements plus a diffusion-model wrapper.

ComfyUI's FLUX (BFL layout, ``comfy/ldm/flux/model.py``) runs each block through
``patches_replace["dit"][("double_block" | "single_block", i)](args, {"original_block": f})`` when one is set,
with ``args`` = ``img, txt, vec, pe, attn_mask, transformer_options`` (single blocks: ``img`` is text and image
tokens concatenated, text first, and there is no ``txt``). Every block patch here calls ``original_block`` first
— so ComfyUI's fp8 / GGUF ops and LoRA-patched weights run unchanged — then adds the adapter's identity
residual to the image tokens, exactly as :class:`~withanyone.model.WithAnyoneAdapter`'s hooks do on diffusers'
transformer (same modules, same sparse gather → attend → scatter, same masks).

The ``WrappersMP.DIFFUSION_MODEL`` wrapper is the one place that sees the latent ``x`` ``[B, C, h, w]`` and
Kontext's ``ref_latents``: it builds the token plan for this call (the latent's token grid, the boxes rescaled to
it, the target tokens first and reference tokens after them, untouched) and hands it to the block patches
through a copy of ``transformer_options``. Outside ``[start, end]`` percent, or with both weights 0, it hands
nothing and every block runs bare: the output is bit-identical to the unpatched model.

Nothing here imports ComfyUI at module level; :func:`apply_withanyone` works on any object with ComfyUI's
``ModelPatcher`` methods (``clone``, ``set_model_patch_replace``, ``add_wrapper_with_key``, ``get_model_object``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..model.adapter import IdentityInputError, WithAnyoneAdapter, _IdentityState, _Prepared
from .types import FaceBoxes, Person

__all__ = [
    "TRANSFORMER_OPTIONS_KEY",
    "AdapterModule",
    "WithAnyonePatch",
    "BlockPatch",
    "apply_withanyone",
    "resolve_adapter",
    "latent_token_grid",
]

#: Where the wrapper leaves each forward's plan for the block patches: ``transformer_options[KEY][patch.key]``.
TRANSFORMER_OPTIONS_KEY = "withanyone"
#: ComfyUI's ``WrappersMP.DIFFUSION_MODEL`` (the string, so this module needs no ComfyUI import).
DIFFUSION_MODEL_WRAPPER = "diffusion_model"
#: Pixels per latent cell (FLUX's VAE downsamples by 8).
VAE_SCALE = 8
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
             if hasattr(torch, n))
_counter = itertools.count()


class AdapterModule(nn.Module):
    """The adapter inside a plain ``nn.Module`` for ComfyUI's ``ModelPatcher`` (which assigns ``.device``, a
    read-only property on diffusers models); its parameters are the adapter's under ``adapter.``."""

    def __init__(self, adapter: WithAnyoneAdapter):
        super().__init__()
        self.adapter = adapter
        self.device = next(adapter.parameters()).device

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - never called as a module
        raise RuntimeError("AdapterModule holds weights for ComfyUI's model management; it is not called")


def resolve_adapter(obj: Any) -> tuple[WithAnyoneAdapter, Any]:
    """``(adapter, model patcher or None)`` from an adapter, an :class:`AdapterModule` or a ModelPatcher of one."""
    if isinstance(obj, WithAnyoneAdapter):
        return obj, None
    if isinstance(obj, AdapterModule):
        return obj.adapter, None
    inner = getattr(obj, "model", None)
    if isinstance(inner, AdapterModule):
        return inner.adapter, obj
    if isinstance(inner, WithAnyoneAdapter):
        return inner, obj
    raise TypeError(f"expected a WithAnyone adapter (from Load WithAnyone), got {type(obj).__name__}")


def latent_token_grid(h: int, w: int, patch_size: int = 2) -> tuple[int, int]:
    """Token rows and columns ComfyUI's FLUX makes of an ``h × w`` latent (padded up to the patch size)."""
    return (h + patch_size // 2) // patch_size, (w + patch_size // 2) // patch_size


def compute_dtype(adapter: WithAnyoneAdapter, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the residual is computed in: the adapter's own (as the pipeline does), or the diffusion model's
    when the adapter is stored in fp8 (its weights are then cast per call by ComfyUI's manual-cast ops)."""
    dtype = adapter.dtype
    return model_dtype if dtype in _FP8 else dtype


@dataclass
class _Forward:
    """One diffusion-model call's plan, shared by the block patches through ``transformer_options``."""

    prepared: _Prepared
    image_tokens: int  # target + reference tokens (the image stream's length)
    txt_len: int | None  # taken from the double blocks' text stream; single blocks split their input there
    dtype: torch.dtype


def block_residual(adapter: WithAnyoneAdapter, index: int, img: torch.Tensor, prepared: _Prepared,
                   dtype: torch.dtype) -> torch.Tensor:
    """``img + id_weight·CA_arc[index] + siglip_weight·CA_sig[index]`` on the covered tokens — the adapter's own
    residual (``WithAnyoneAdapter._residual``) with the compute dtype given, so fp8-stored adapters work."""
    return adapter._residual(index, img, prepared, dtype=dtype)


class WithAnyonePatch:
    """The people, boxes and weights of one Apply WithAnyone, and the diffusion-model wrapper that plans each
    call (``__call__``). Block patches (:class:`BlockPatch`) read the plan and add the residual."""

    def __init__(self, adapter: Any, people: Sequence[Person], boxes: FaceBoxes, id_weight: float = 1.0,
                 siglip_weight: float = 0.0, sigma_start: float = math.inf, sigma_end: float = 0.0):
        self.adapter, self.patcher = resolve_adapter(adapter)
        cfg = self.adapter.config
        if not people:
            raise IdentityInputError("Apply WithAnyone needs at least one person")
        if len(boxes.boxes) != len(people):
            raise IdentityInputError(f"{len(people)} people but {len(boxes.boxes)} face boxes: give one box per "
                                     "person, in the people's order (set the Boxes node's people count)")
        for name, w in (("id_weight", id_weight), ("siglip_weight", siglip_weight)):
            if not math.isfinite(float(w)):
                raise IdentityInputError(f"{name} must be finite, got {w}")
        self.people = list(people)
        self.boxes = boxes
        self.id_weight, self.siglip_weight = float(id_weight), float(siglip_weight)
        self.sigma_start, self.sigma_end = float(sigma_start), float(sigma_end)
        arc = np.stack([p.arcface for p in self.people])
        if arc.shape[1] != cfg.arcface_dim:
            raise IdentityInputError(f"the people's face vectors are {arc.shape[1]}-d; the adapter needs "
                                     f"{cfg.arcface_dim}-d ArcFace (use an insightface Face Analyzer, not dlib)")
        self.arcface = torch.from_numpy(arc)  # [N, 512] float32, raw norm
        self.siglip: torch.Tensor | None = None
        if self.siglip_weight != 0.0:
            if not cfg.use_siglip:
                raise IdentityInputError("siglip_weight > 0 but this adapter has no SigLIP branch")
            missing = [i + 1 for i, p in enumerate(self.people) if p.siglip is None]
            if missing:
                raise IdentityInputError(f"siglip_weight > 0 needs SigLIP features: connect a WithAnyone SigLIP "
                                         f"loader to WithAnyone Person for person {missing}")
            self.siglip = torch.stack([torch.as_tensor(p.siglip).float().reshape(-1, cfg.siglip_dim)
                                       for p in self.people])
        self.key = f"withanyone-{next(_counter)}"
        self._states: dict[tuple, _IdentityState] = {}

    # ------------------------------------------------------------------ ComfyUI model management
    def to(self, device_or_dtype: Any) -> WithAnyonePatch:
        """Called by ComfyUI when the model loads or offloads: drop per-device caches (ID tokens, K/V)."""
        if isinstance(device_or_dtype, (torch.device, str)):
            self._states.clear()
        return self

    def models(self) -> list[Any]:
        """The adapter's ModelPatcher, so ComfyUI loads and offloads it together with the diffusion model."""
        return [self.patcher] if self.patcher is not None else []

    def __deepcopy__(self, memo: dict) -> WithAnyonePatch:
        return self  # ModelPatcher.clone deep-copies model_options: share the weights, the patch is immutable

    # ------------------------------------------------------------------ planning
    def active(self, sigma: torch.Tensor | float | None) -> bool:
        """Whether this call's sigma lies in ``[sigma_end, sigma_start]`` and some weight is non-zero."""
        if self.id_weight == 0.0 and (self.siglip_weight == 0.0 or self.siglip is None):
            return False
        if sigma is None:
            return True
        s = float(torch.as_tensor(sigma).max()) if not isinstance(sigma, float) else sigma
        return self.sigma_end <= s <= self.sigma_start

    def plan(self, x: torch.Tensor, ref_latents: Sequence[torch.Tensor] | None = None, patch_size: int = 2,
             txt_len: int | None = None) -> _Forward:
        """The token plan for a latent ``x`` [B, C, h, w] (and Kontext references, whose tokens follow the
        target's and get no residual)."""
        adapter = self.adapter
        b, _, h, w = x.shape
        rows, cols = latent_token_grid(h, w, patch_size)
        grid_h, grid_w = rows * 16, cols * 16  # the padded token grid in pixels (token = 16 px)
        image_tokens = rows * cols
        for ref in ref_latents or ():
            rr, rc = latent_token_grid(int(ref.shape[-2]), int(ref.shape[-1]), patch_size)
            image_tokens += rr * rc
        dtype = compute_dtype(adapter, x.dtype)
        key = (h, w, str(x.device), dtype)
        state = self._states.get(key)
        if state is None:
            boxes = self.boxes.scaled(w * VAE_SCALE, h * VAE_SCALE)
            state = adapter._validate(self.arcface.unsqueeze(0), None if self.siglip is None else
                                      self.siglip.unsqueeze(0), [boxes], grid_h, grid_w, self.id_weight,
                                      self.siglip_weight, rows * cols)
            self._states[key] = state
        if self.patcher is None and adapter.device != x.device:  # outside ComfyUI's model management
            adapter.to(x.device)
        dense = adapter.attention_mode == "dense"
        plan = adapter._plan(state, int(b), image_tokens, x.device, dense)
        arc, sig = adapter._tokens(state, int(b), x.device, dtype)
        prepared = _Prepared(plan=plan, arc_tokens=arc, sig_tokens=sig, id_weight=state.id_weight,
                             siglip_weight=state.siglip_weight, dense=dense,
                             kv_cache=state.kv_cache if adapter.cache_kv else None, batch=int(b))
        return _Forward(prepared, image_tokens, txt_len, dtype)

    # ------------------------------------------------------------------ the DIFFUSION_MODEL wrapper
    def __call__(self, executor: Callable, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                 y: Any = None, guidance: Any = None, ref_latents: Any = None, control: Any = None,
                 transformer_options: dict | None = None, **kwargs: Any) -> Any:
        """ComfyUI's ``WrappersMP.DIFFUSION_MODEL`` wrapper around ``Flux._forward``."""
        to = transformer_options if transformer_options is not None else {}
        sigma = to.get("sigmas", timestep)
        if self.active(sigma):
            patch_size = int(getattr(getattr(executor, "class_obj", None), "patch_size", 2) or 2)
            fwd = self.plan(x, ref_latents, patch_size, txt_len=int(context.shape[1]))
            to = dict(to)
            to[TRANSFORMER_OPTIONS_KEY] = {**to.get(TRANSFORMER_OPTIONS_KEY, {}), self.key: fwd}
        return executor(x, timestep, context, y, guidance, ref_latents, control, to, **kwargs)


class BlockPatch:
    """``patches_replace["dit"][(kind + "_block", i)]``: the original block (or a patch set before this one),
    then the identity residual on the image tokens."""

    def __init__(self, owner: WithAnyonePatch, kind: str, block: int, index: int, previous: Any = None):
        if kind not in ("double", "single"):
            raise ValueError(f"kind must be 'double' or 'single', got {kind!r}")
        self.owner, self.kind, self.block, self.index, self.previous = owner, kind, block, index, previous

    def to(self, device_or_dtype: Any) -> BlockPatch:
        """ComfyUI model management: forwarded to the patch (and a patch chained before this one)."""
        self.owner.to(device_or_dtype)
        if self.previous is not None and hasattr(self.previous, "to"):
            self.previous = self.previous.to(device_or_dtype)
        return self

    def models(self) -> list[Any]:
        """The adapter's ModelPatcher (and a chained patch's models)."""
        prev = self.previous.models() if self.previous is not None and hasattr(self.previous, "models") else []
        return self.owner.models() + list(prev)

    def __deepcopy__(self, memo: dict) -> BlockPatch:
        return self

    def __call__(self, args: dict, extra: dict) -> dict:
        original = extra["original_block"]
        out = self.previous(args, extra) if self.previous is not None else original(args)
        opts = args.get("transformer_options") or {}
        fwd = (opts.get(TRANSFORMER_OPTIONS_KEY) or {}).get(self.owner.key)
        if fwd is None:
            return out
        adapter = self.owner.adapter
        img = out["img"]
        if self.kind == "double":
            fwd.txt_len = int(out["txt"].shape[1]) if "txt" in out else fwd.txt_len
            if img.shape[1] != fwd.image_tokens:
                raise IdentityInputError(f"double block {self.block}: {img.shape[1]} image tokens, the plan has "
                                         f"{fwd.image_tokens} (another patch changed the image stream?)")
            out = dict(out)
            out["img"] = block_residual(adapter, self.index, img, fwd.prepared, fwd.dtype)
            return out
        t = fwd.txt_len if fwd.txt_len is not None else int(img.shape[1]) - fwd.image_tokens
        if int(img.shape[1]) - t != fwd.image_tokens:
            raise IdentityInputError(f"single block {self.block}: {img.shape[1]} tokens = {t} text + "
                                     f"{int(img.shape[1]) - t} image, the plan has {fwd.image_tokens} image tokens")
        part = img[:, t:]
        new = block_residual(adapter, self.index, part, fwd.prepared, fwd.dtype)
        if new is part:
            return out
        out = dict(out)
        out["img"] = torch.cat([img[:, :t], new], dim=1)
        return out


def _flux_blocks(model: Any) -> tuple[int, int, int]:
    diffusion = model.get_model_object("diffusion_model")
    doubles = getattr(diffusion, "double_blocks", None)
    singles = getattr(diffusion, "single_blocks", None)
    if doubles is None or singles is None:
        raise IdentityInputError(f"Apply WithAnyone needs a FLUX model (double_blocks + single_blocks), got "
                                 f"{type(diffusion).__name__}")
    return len(doubles), len(singles), int(getattr(diffusion, "hidden_size", 0) or 0)


def apply_withanyone(model: Any, adapter: Any, people: Sequence[Person], boxes: FaceBoxes, id_weight: float = 1.0,
                     siglip_weight: float = 0.0, start_percent: float = 0.0, end_percent: float = 1.0) -> Any:
    """``model.clone()`` with WithAnyone's block patches and diffusion-model wrapper (the input is untouched)."""
    patch_adapter, _ = resolve_adapter(adapter)
    cfg = patch_adapter.config
    nd, ns, width = _flux_blocks(model)
    if (nd, ns) != (cfg.num_double_blocks, cfg.num_single_blocks):
        raise IdentityInputError(f"the adapter is for {cfg.num_double_blocks} double + {cfg.num_single_blocks} "
                                 f"single blocks, this FLUX model has {nd} + {ns}")
    if width and width != cfg.hidden_size:
        raise IdentityInputError(f"the adapter's width {cfg.hidden_size} != this FLUX model's {width}")
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise IdentityInputError(f"need 0 ≤ start_percent ≤ end_percent ≤ 1, got {start_percent}, {end_percent}")
    sampling = model.get_model_object("model_sampling")
    sigma_start = float(sampling.percent_to_sigma(start_percent)) if start_percent > 0 else math.inf
    sigma_end = float(sampling.percent_to_sigma(end_percent)) if end_percent < 1 else 0.0
    patch = WithAnyonePatch(adapter, people, boxes, id_weight, siglip_weight, sigma_start, sigma_end)
    m = model.clone()
    existing = dict(m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {}))
    for i in range(nd):
        prev = existing.get(("double_block", i))
        m.set_model_patch_replace(BlockPatch(patch, "double", i, i, prev),
                                  "dit", "double_block", i)
    for i in range(ns):
        prev = existing.get(("single_block", i))
        m.set_model_patch_replace(BlockPatch(patch, "single", i, nd + i, prev),
                                  "dit", "single_block", i)
    # on ModelPatcher.wrappers, as core's wrapper-based patches do: the sampler merges them into the
    # transformer_options the diffusion model gets (comfy.sampler_helpers.prepare_model_patcher); a direct
    # diffusion-model call must merge them itself (patcher_extension.merge_nested_dicts(to["wrappers"], m.wrappers))
    m.add_wrapper_with_key(DIFFUSION_MODEL_WRAPPER, patch.key, patch)
    return m
