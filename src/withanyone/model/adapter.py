"""WithAnyoneAdapter: the identity adapter as a diffusers model that hooks onto any FluxTransformer2DModel.

After every double-stream block (image stream) and every single-stream block (image part), block index
i in 0..D+S-1 (double blocks first)::

    img ← img + id_weight · CA_arc[i](arc_tokens, img) + siglip_weight · CA_sig[i](sig_tokens, img)

with box masks restricting each image token to its person's ID tokens. Forward hooks keep LoRA,
quantised weights, CPU offload and gradient checkpointing working; outside :meth:`identities` the hooks
return ``None`` and the transformer's output is bit-identical to the bare model's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from withanyone.errors import WithAnyoneError
from withanyone.model.attention import (
    IdentityCrossAttention,
    gather_mask_rows,
    gather_tokens,
    scatter_add_tokens,
    select_covered_tokens,
)
from withanyone.model.checkpoint import LoadReport, load_authors_checkpoint, save_state_dict
from withanyone.model.encoders import ArcFaceTokenEncoder, SiglipTokenEncoder, siglip_branch_tokens
from withanyone.model.masks import BoxesLike, InvalidBoxError, box_coverage, boxes_to_tensor, token_grid

__all__ = ["WithAnyoneAdapter", "IdentityInputError"]

logger = logging.getLogger(__name__)

_PREPARED_ATTR = "_withanyone_prepared"


class IdentityInputError(WithAnyoneError, ValueError):
    """Identity inputs (embeddings, weights, sizes, token ranges) do not fit the adapter or the transformer."""


def _in_backward() -> bool:
    """True while autograd runs a backward pass (gradient-checkpoint recomputation happens there).

    Always False while torch.compile traces: the query is opaque to Dynamo (one graph break per block), and a
    compiled graph's recomputation runs inside its compiled backward, not through these Python hooks.
    """
    if torch.compiler.is_compiling():
        return False
    get = getattr(torch._C, "_current_graph_task_id", None)
    return get is not None and get() != -1


@dataclass
class _Plan:
    """Per (batch, sequence length, device) geometry: covered-token indices and gathered masks."""

    start: int
    stop: int
    index: torch.Tensor | None = None  # [B, K] (sparse)
    arc_mask: torch.Tensor | None = None  # [B, 1, K or L, S_arc]
    sig_mask: torch.Tensor | None = None  # [B, 1, K or L, S_sig]


@dataclass
class _Prepared:
    """What one transformer forward needs: the plan, ID tokens, weights and a K/V cache."""

    plan: _Plan
    arc_tokens: torch.Tensor | None
    sig_tokens: torch.Tensor | None
    id_weight: float
    siglip_weight: float
    dense: bool
    kv_cache: dict | None  # shared across forwards of one identities() block when grads are off
    batch: int = 1


@dataclass
class _IdentityState:
    """Validated inputs of one :meth:`WithAnyoneAdapter.identities` block."""

    arcface: torch.Tensor  # [Bi, N, d]
    siglip: torch.Tensor | None  # [Bi, N, T, 768]
    boxes: torch.Tensor  # [Bb, N, 4] float64
    height: int
    width: int
    id_weight: float
    siglip_weight: float
    target_tokens: int | slice | None
    people: torch.Tensor | None = None  # [B, N] bool: False marks a padded person (attended by no token)
    plans: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    kv_cache: dict = field(default_factory=dict)

    @property
    def num_people(self) -> int:
        return int(self.arcface.shape[1])

    @property
    def batch(self) -> int:
        return max(int(self.arcface.shape[0]), int(self.boxes.shape[0]))


class WithAnyoneAdapter(ModelMixin, ConfigMixin):
    """WithAnyone's identity adapter (token encoders + one ID cross-attention per FLUX block), hook-based.

    Parameter names equal the authors' release (``ipa_arc.{i}``, ``ipa_sig.{i}``, ``arcface_in_arc``,
    ``arcface_in_sig``, ``siglip_in_sig``), so their checkpoint loads without renaming.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        num_double_blocks: int = 19,
        num_single_blocks: int = 38,
        hidden_size: int = 3072,
        num_heads: int = 24,
        head_dim: int = 64,
        arcface_dim: int = 512,
        siglip_dim: int = 768,
        num_arc_tokens: int = 8,
        num_siglip_tokens: int = 256,
        use_siglip: bool = True,
    ):
        super().__init__()
        total = num_double_blocks + num_single_blocks
        self.arcface_in_arc = ArcFaceTokenEncoder(arcface_dim, hidden_size, num_arc_tokens)
        self.ipa_arc = nn.ModuleList(IdentityCrossAttention(hidden_size, num_heads, head_dim) for _ in range(total))
        if use_siglip:
            self.arcface_in_sig = ArcFaceTokenEncoder(arcface_dim, hidden_size, num_arc_tokens)
            self.siglip_in_sig = SiglipTokenEncoder(siglip_dim, hidden_size)
            self.ipa_sig = nn.ModuleList(IdentityCrossAttention(hidden_size, num_heads, head_dim) for _ in range(total))
        #: "sparse" (gather → attend → scatter over tokens inside some box) or "dense" (every token; the
        #: release's computation, kept for checks and benchmarks).
        self.attention_mode: Literal["sparse", "dense"] = "sparse"
        #: reuse each block's ID keys/values across the calls of one identities() block when gradients are
        #: off (the ID tokens do not change between denoising steps)
        self.cache_kv: bool = True
        self.load_report: LoadReport | None = None
        self._handles: list[Any] = []
        self._transformer_ref: weakref.ref | None = None
        self._stack: list[_IdentityState] = []
        self._prepared: _Prepared | None = None

    # ------------------------------------------------------------------ checkpoints (authors' layout)
    @classmethod
    def from_authors_checkpoint(
        cls,
        source: str | Path | dict[str, torch.Tensor],
        *,
        num_double_blocks: int | None = None,
        head_dim: int = 64,
        strict: bool = False,
        torch_dtype: torch.dtype | None = None,
        local_files_only: bool = False,
    ) -> WithAnyoneAdapter:
        """Build from the released ``withanyone.safetensors`` (or a BFL single file with base + adapter keys).

        ``source`` is a file, a folder holding ``withanyone.safetensors``, a hub id, or a state dict. The
        config is inferred from tensor shapes; ``.load_report`` lists missing/unexpected adapter keys and
        the base-model keys that were set aside.
        """
        return load_authors_checkpoint(
            cls,
            source,
            num_double_blocks=num_double_blocks,
            head_dim=head_dim,
            strict=strict,
            torch_dtype=torch_dtype,
            local_files_only=local_files_only,
        )

    def to_authors_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights under the release's key names (no prefix), detached and contiguous."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    def save_authors_checkpoint(
        self,
        path: str | Path,
        dtype: torch.dtype | None = None,
        base_state_dict: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write :meth:`to_authors_state_dict` as safetensors at ``path`` (atomically); returns the path.

        With ``base_state_dict`` (BFL keys of the base FLUX model) the file is a BFL single file holding
        base and adapter keys, as the release's full checkpoint.
        """
        sd = self.to_authors_state_dict()
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        if base_state_dict:
            clash = sorted(set(base_state_dict) & set(sd))
            if clash:
                raise ValueError(f"base_state_dict already holds adapter keys: {clash[:5]}")
            sd = {**base_state_dict, **sd}
        return save_state_dict(sd, path, metadata={"format": "pt", "source": "withanyone"})

    # ------------------------------------------------------------------ token encoders
    def encode_arcface(self, arcface: torch.Tensor) -> torch.Tensor:
        """[B, N, 512] ArcFace embeddings → the ArcFace branch's ID tokens [B, N·8, w]."""
        return self.arcface_in_arc(arcface).flatten(1, 2)

    def encode_siglip(self, siglip: torch.Tensor, arcface: torch.Tensor) -> torch.Tensor:
        """[B, N, 256, 768] SigLIP features + [B, N, 512] ArcFace → the SigLIP branch's tokens [B, N·264, w]."""
        if not self.config.use_siglip:
            raise IdentityInputError("this adapter has no SigLIP branch (use_siglip=False)")
        return siglip_branch_tokens(self.siglip_in_sig(siglip), self.arcface_in_sig(arcface))

    # ------------------------------------------------------------------ attach / detach
    @property
    def attached(self) -> bool:
        """Whether the adapter's hooks are on a transformer."""
        return bool(self._handles)

    def attach(self, transformer: nn.Module) -> WithAnyoneAdapter:
        """Hook onto a diffusers ``FluxTransformer2DModel`` (LoRA, quantised or offloaded); idempotent."""
        base = getattr(transformer, "_orig_mod", transformer)
        current = self._transformer_ref() if self._transformer_ref is not None else None
        if current is base and self._handles:
            return self
        if self._handles:
            self.detach()
        doubles = getattr(base, "transformer_blocks", None)
        singles = getattr(base, "single_transformer_blocks", None)
        if doubles is None or singles is None:
            raise TypeError(
                f"attach() needs a diffusers FluxTransformer2DModel (transformer_blocks + "
                f"single_transformer_blocks), got {type(transformer).__name__}"
            )
        cfg = self.config
        if len(doubles) != cfg.num_double_blocks or len(singles) != cfg.num_single_blocks:
            raise ValueError(
                f"adapter built for {cfg.num_double_blocks} double + {cfg.num_single_blocks} single blocks, "
                f"transformer has {len(doubles)} + {len(singles)}"
            )
        tcfg = getattr(base, "config", None)
        if tcfg is not None and hasattr(tcfg, "num_attention_heads"):
            width = int(tcfg.num_attention_heads) * int(tcfg.attention_head_dim)
            if width != cfg.hidden_size:
                raise ValueError(f"adapter width {cfg.hidden_size} != transformer width {width}")
        handles = [base.register_forward_pre_hook(self._pre_forward_hook, with_kwargs=True)]
        for i, block in enumerate(list(doubles) + list(singles)):
            handles.append(block.register_forward_hook(self._make_block_hook(i), with_kwargs=True))
        self._handles = handles
        self._transformer_ref = weakref.ref(base)
        return self

    def detach(self) -> WithAnyoneAdapter:
        """Remove every hook; the transformer is back to its bare behaviour."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._transformer_ref = None
        self._prepared = None
        return self

    # ------------------------------------------------------------------ identities
    @contextlib.contextmanager
    def identities(
        self,
        arcface: torch.Tensor,
        siglip: torch.Tensor | None = None,
        boxes: BoxesLike | None = None,
        height: int | None = None,
        width: int | None = None,
        id_weight: float = 1.0,
        siglip_weight: float = 0.0,
        target_tokens: int | slice | None = None,
        people: torch.Tensor | None = None,
    ) -> Iterator[None]:
        """Within this block, every call of the attached transformer gets the identity residuals.

        ``arcface`` [B, N, 512] (B = 1 broadcasts), ``siglip`` [B, N, 256, 768] or None, ``boxes`` one
        list of N pixel boxes (x1, y1, x2, y2) per batch item, ``height``/``width`` the output image's
        pixels; ``target_tokens`` (int count or slice) limits the residual to those image tokens
        (Kontext: the target image's tokens come first). A branch whose weight is 0 is skipped.
        ``people`` [B, N] bool marks real people when items are padded to N (training batches with 1–4
        people): a padded person's box is ignored and no image token attends to its tokens.
        """
        if people is not None:
            people = torch.as_tensor(people, dtype=torch.bool).cpu()
            bt = torch.as_tensor(boxes, dtype=torch.float64).clone() if boxes is not None else None
            if bt is None or bt.shape[:2] != people.shape:
                raise IdentityInputError(f"people mask {tuple(people.shape)} does not match boxes [B, N, 4]")
            bt[~people] = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)  # any valid box; masked below
            boxes = bt
        state = self._validate(arcface, siglip, boxes, height, width, id_weight, siglip_weight, target_tokens)
        state.people = people
        if not self._handles:
            raise RuntimeError("call adapter.attach(transformer) before adapter.identities(...)")
        self._stack.append(state)
        try:
            yield
        finally:
            self._stack.remove(state)
            self._prepared = None

    def _validate(self, arcface, siglip, boxes, height, width, id_weight, siglip_weight, target_tokens):
        cfg = self.config
        if not isinstance(arcface, torch.Tensor):
            raise IdentityInputError(
                f"arcface must be a tensor [B, N, {cfg.arcface_dim}], got {type(arcface).__name__}"
            )
        if arcface.ndim == 2:
            arcface = arcface.unsqueeze(0)
        if arcface.ndim != 3 or arcface.shape[-1] != cfg.arcface_dim:
            hint = ""
            if arcface.shape[-1] == 128:
                hint = " (128-d looks like dlib: the adapter was trained on insightface antelopev2 embeddings)"
            raise IdentityInputError(f"arcface must be [B, N, {cfg.arcface_dim}], got {tuple(arcface.shape)}{hint}")
        for name, w in (("id_weight", id_weight), ("siglip_weight", siglip_weight)):
            if not math.isfinite(float(w)):
                raise IdentityInputError(f"{name} must be finite, got {w}")
        if height is None or width is None:
            raise IdentityInputError("height and width (output image pixels) are required to place the face boxes")
        token_grid(height, width)
        if boxes is None:
            raise InvalidBoxError("face boxes are required: one (x1, y1, x2, y2) per person per batch item")
        n = int(arcface.shape[1])
        bt = boxes_to_tensor(boxes, num_people=n)
        bi = int(arcface.shape[0])
        if bt.shape[0] != bi and 1 not in (bt.shape[0], bi):
            raise InvalidBoxError(f"boxes are given for {bt.shape[0]} batch items but arcface for {bi}")
        if n:
            box_coverage(bt, height, width)  # raises for boxes outside the image
        if float(siglip_weight) != 0.0:
            if not cfg.use_siglip:
                raise IdentityInputError("siglip_weight != 0 but this adapter has no SigLIP branch")
            if siglip is None:
                raise IdentityInputError("siglip_weight != 0 needs siglip features [B, N, 256, 768]")
        if siglip is not None:
            if siglip.ndim == 3:
                siglip = siglip.unsqueeze(0)
            if siglip.ndim != 4 or siglip.shape[1] != n or siglip.shape[-1] != cfg.siglip_dim or siglip.shape[0] != bi:
                raise IdentityInputError(
                    f"siglip must be [{bi}, {n}, T, {cfg.siglip_dim}] to match arcface {tuple(arcface.shape)}, "
                    f"got {tuple(siglip.shape)}"
                )
        if target_tokens is not None and not isinstance(target_tokens, (int, slice)):
            raise IdentityInputError(
                f"target_tokens must be an int count or a slice, got {type(target_tokens).__name__}"
            )
        return _IdentityState(
            arcface=arcface,
            siglip=siglip,
            boxes=bt,
            height=int(height),
            width=int(width),
            id_weight=float(id_weight),
            siglip_weight=float(siglip_weight),
            target_tokens=target_tokens,
        )

    # ------------------------------------------------------------------ per-forward preparation
    def _target_range(self, state: _IdentityState, length: int) -> tuple[int, int]:
        rows, cols = token_grid(state.height, state.width)
        grid = rows * cols
        t = state.target_tokens
        if t is None:
            start, stop = 0, grid
        elif isinstance(t, int):
            start, stop = 0, t
        else:
            if t.step not in (None, 1):
                raise IdentityInputError(f"target_tokens slice must be contiguous, got step {t.step}")
            start, stop, _ = t.indices(length)
        if stop - start != grid:
            raise IdentityInputError(
                f"target image tokens [{start}, {stop}) hold {stop - start} tokens but a "
                f"{state.width}×{state.height} image has {rows}×{cols} = {grid}"
            )
        if stop > length:
            raise IdentityInputError(
                f"the transformer got {length} image tokens, fewer than the {grid} of a "
                f"{state.width}×{state.height} image (tokens [{start}, {stop}))"
            )
        return start, stop

    def _plan(self, state: _IdentityState, batch: int, length: int, device: torch.device, dense: bool) -> _Plan:
        key = (batch, length, str(device), dense)
        plan = state.plans.get(key)
        if plan is not None:
            return plan
        start, stop = self._target_range(state, length)
        cover = box_coverage(state.boxes, state.height, state.width, length, offset=start)  # [Bb, N, L]
        if state.people is not None:
            cover = cover & state.people.reshape(cover.shape[0], -1, 1)
        if cover.shape[0] != batch:
            cover = cover.expand(batch, -1, -1)
        cover = cover.to(device)
        n_arc = self.config.num_arc_tokens
        n_sig = None if state.siglip is None else int(state.siglip.shape[2]) + n_arc
        person_rows = cover.transpose(1, 2)  # [B, L, N]
        plan = _Plan(start=start, stop=stop)
        if dense:
            plan.arc_mask = person_rows.repeat_interleave(n_arc, dim=2).unsqueeze(1)
            if n_sig is not None:
                plan.sig_mask = person_rows.repeat_interleave(n_sig, dim=2).unsqueeze(1)
        else:
            covered = cover.any(1)  # [B, L]
            index = select_covered_tokens(covered)
            plan.index = index
            plan.arc_mask = gather_mask_rows(person_rows.repeat_interleave(n_arc, dim=2).unsqueeze(1), index, covered)
            if n_sig is not None:
                plan.sig_mask = gather_mask_rows(
                    person_rows.repeat_interleave(n_sig, dim=2).unsqueeze(1), index, covered
                )
        state.plans[key] = plan
        return plan

    def _tokens(self, state: _IdentityState, batch: int, device: torch.device, dtype: torch.dtype):
        use_arc = state.id_weight != 0.0 or self.attention_mode == "dense"
        use_sig = state.siglip is not None and (state.siglip_weight != 0.0 or self.attention_mode == "dense")
        key = (str(device), dtype, use_arc, use_sig)
        cacheable = not torch.is_grad_enabled()
        if cacheable and key in state.tokens:
            arc, sig = state.tokens[key]
        else:
            arcface = state.arcface.to(device=device, dtype=dtype)
            arc = self.encode_arcface(arcface) if use_arc else None
            sig = None
            if use_sig:
                sig = self.encode_siglip(state.siglip.to(device=device, dtype=dtype), arcface)
            if cacheable:
                state.tokens[key] = (arc, sig)
        return arc, sig  # batch 1 or ``batch``; keys/values are expanded after projection

    def _pre_forward_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        state = self._stack[-1] if self._stack else None
        if state is None:
            self._prepared = None
            return None
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3:
            raise IdentityInputError("the transformer's hidden_states must be a [B, L, C] tensor")
        batch, length = int(hidden.shape[0]), int(hidden.shape[1])
        if state.batch not in (1, batch):
            raise IdentityInputError(
                f"identities were given for {state.batch} batch items, the transformer runs {batch}"
            )
        device = hidden.device
        if self.device != device:
            self.to(device)
        dense = self.attention_mode == "dense"
        if state.num_people == 0:
            self._prepared = None
            return None
        plan = self._plan(state, batch, length, device, dense)
        arc, sig = self._tokens(state, batch, device, self.dtype)
        self._prepared = _Prepared(
            plan=plan,
            arc_tokens=arc,
            sig_tokens=sig,
            id_weight=state.id_weight,
            siglip_weight=state.siglip_weight,
            dense=dense,
            kv_cache=state.kv_cache if self.cache_kv else None,
            batch=batch,
        )
        return None

    # ------------------------------------------------------------------ the residual
    def _make_block_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            temb = kwargs.get("temb", args[2] if len(args) > 2 else None)
            attr = f"{_PREPARED_ATTR}_{id(self)}"
            prepared = getattr(temb, attr, None) if isinstance(temb, torch.Tensor) else None
            if prepared is None:
                if _in_backward():  # recomputing a forward that ran without identities
                    return None
                prepared = self._prepared
                if prepared is None:
                    return None
                if isinstance(temb, torch.Tensor):
                    # remembered on this forward's temb, so checkpoint recomputation finds the same inputs
                    setattr(temb, attr, prepared)
            encoder_hidden_states, hidden_states = output
            return encoder_hidden_states, self._residual(index, hidden_states, prepared)

        return hook

    def _kv(self, branch: str, index: int, tokens: torch.Tensor, prepared: _Prepared):
        attn = (self.ipa_arc if branch == "arc" else self.ipa_sig)[index]
        if torch.is_grad_enabled() or prepared.kv_cache is None:
            k, v = attn.project_kv(tokens)
        else:
            key = (branch, index, str(tokens.device), tokens.dtype, tokens.shape[0])
            kv = prepared.kv_cache.get(key)
            if kv is None:
                kv = prepared.kv_cache[key] = attn.project_kv(tokens)
            k, v = kv
        if k.shape[0] != prepared.batch:  # identities of batch 1 broadcast over the transformer's batch
            k, v = k.expand(prepared.batch, -1, -1, -1), v.expand(prepared.batch, -1, -1, -1)
        return k, v

    def _residual(self, index: int, img: torch.Tensor, prepared: _Prepared,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
        """``img + id_weight·CA_arc + siglip_weight·CA_sig`` on the covered tokens (or all, when dense), computed in
        ``dtype`` (default the adapter's; ComfyUI's patch passes the compute dtype of fp8-stored adapters)."""
        plan = prepared.plan
        dtype = self.dtype if dtype is None else dtype
        branches = []
        if prepared.arc_tokens is not None and (prepared.id_weight != 0.0 or prepared.dense):
            branches.append(("arc", prepared.id_weight, prepared.arc_tokens, plan.arc_mask))
        if prepared.sig_tokens is not None and (prepared.siglip_weight != 0.0 or prepared.dense):
            branches.append(("sig", prepared.siglip_weight, prepared.sig_tokens, plan.sig_mask))
        if not branches:
            return img
        out = img
        if prepared.dense:
            x = img.to(dtype)
            for branch, weight, tokens, mask in branches:
                attn = (self.ipa_arc if branch == "arc" else self.ipa_sig)[index]
                k, v = self._kv(branch, index, tokens, prepared)
                out = out + (weight * attn.attend(x, k, v, mask)).to(img.dtype)
            return out
        x = gather_tokens(img, plan.index).to(dtype)
        for branch, weight, tokens, mask in branches:
            attn = (self.ipa_arc if branch == "arc" else self.ipa_sig)[index]
            k, v = self._kv(branch, index, tokens, prepared)
            out = scatter_add_tokens(out, plan.index, (weight * attn.attend(x, k, v, mask)).to(img.dtype))
        return out
