"""The identity adapter's weights in fewer bytes: fp8 or int8 weight-only storage through optimum-quanto.

Only the ``nn.Linear`` weights are quantised (per output channel, symmetric, one scale each); LayerNorms and
biases keep the adapter's dtype, and every matmul computes in that dtype (``compute_dtype``, bf16 by
default for a bf16 adapter). The hooks live on the transformer's blocks, not on the adapter, so a quantised
adapter attaches, caches K/V and leaves the bare transformer bit-identical exactly as a bf16 one does.

Why quanto and not diffusers' layerwise casting for fp8: casting a weight to ``float8_e4m3fn`` without a
scale puts most of the adapter's small weights (|w| ≲ 0.02) into e4m3's subnormal range; on a full-width
double + single block slice that gave an 11.8 % relative error of the identity residual against 4.9 % for
quanto's scaled fp8 and 1.9 % for int8 (``benchmarks/memory.py`` measures them side by side).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ADAPTER_FORMATS", "adapter_format", "quantize_adapter", "weight_bytes"]

#: Storage formats of the adapter's Linear weights: ``bf16`` leaves the adapter as it is.
ADAPTER_FORMATS: tuple[str, ...] = ("bf16", "fp8", "int8")

_FORMAT_ATTR = "_withanyone_adapter_format"


def adapter_format(adapter: nn.Module) -> str:
    """The format :func:`quantize_adapter` stored the adapter in (``"bf16"`` when it never ran)."""
    return getattr(adapter, _FORMAT_ATTR, "bf16")


def _quanto_weights(fmt: str) -> Any:
    try:
        from optimum.quanto import qfloat8_e4m3fn, qint8
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"adapter format {fmt!r} needs optimum-quanto: pip install 'withanyone[lowvram]'"
        ) from exc
    return {"fp8": qfloat8_e4m3fn, "int8": qint8}[fmt]


def quantize_adapter(adapter: nn.Module, fmt: str, *, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Store ``adapter``'s Linear weights as ``fmt`` (``"bf16"`` no-op, ``"fp8"`` e4m3 or ``"int8"``), in place.

    ``compute_dtype`` (default: the adapter's current dtype) is the dtype the adapter is cast to first and
    in which its matmuls run. Returns the adapter. A second call with the same format is a no-op; asking
    for another format once quantised raises ``ValueError`` (reload the bf16 weights instead).
    """
    if fmt not in ADAPTER_FORMATS:
        raise ValueError(f"adapter format {fmt!r} is not one of {', '.join(ADAPTER_FORMATS)}")
    current = adapter_format(adapter)
    if current == fmt:
        return adapter
    if current != "bf16":
        raise ValueError(f"the adapter is already stored as {current}; reload it to store it as {fmt}")
    if compute_dtype is not None:
        adapter.to(compute_dtype)
    if fmt == "bf16":
        return adapter
    from optimum.quanto import freeze, quantize

    weights = _quanto_weights(fmt)
    was_training = adapter.training
    # weights only: quanto swaps every nn.Linear for a QLinear; LayerNorms stay (they quantise activations only)
    quantize(adapter, weights=weights, activations=None)
    freeze(adapter)
    adapter.train(was_training)
    for p in adapter.parameters():
        p.requires_grad_(False)
    setattr(adapter, _FORMAT_ATTR, fmt)
    return adapter


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, counting a quantised tensor subclass by its inner data and scales."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers as stored (quantised data + scales; shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        key = id(t)
        if key in seen:
            continue
        seen.add(key)
        total += _tensor_bytes(t.data if isinstance(t, nn.Parameter) else t)
    return total
