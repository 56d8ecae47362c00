"""quantize_adapter on a tiny bf16 FLUX: the hooks still run once per block, no identities → the bare output
bit for bit, and the identity residual stays within a stated tolerance of the bf16 adapter's residual."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models.flux import random_identities, tiny_adapter, tiny_flux_inputs, tiny_flux_transformer

from withanyone.model.quantize import ADAPTER_FORMATS, adapter_format, quantize_adapter, weight_bytes

pytest.importorskip("optimum.quanto")

BOXES = [[(10.0, 12.0, 90.0, 100.0), (120.0, 130.0, 250.0, 240.0)]]
#: Relative error of the transformer's identity residual (output with identities − bare output) against the
#: bf16 adapter's, on the tiny model (width 192; scaled weights, per-channel scales). Full-width figures:
#: benchmarks/memory.py and docs/benchmarks.md.
RESIDUAL_TOLERANCE = {"bf16": 0.0, "fp8": 0.08, "int8": 0.02}


@pytest.fixture(scope="module")
def transformer():
    return tiny_flux_transformer(seed=0).to(torch.bfloat16)


@pytest.fixture(scope="module")
def bf16_adapter():
    return tiny_adapter(seed=1, scale_out=4.0).to(torch.bfloat16)


def _inputs():
    return {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in tiny_flux_inputs(seed=2).items()}


def _run(transformer, adapter, identities: bool):
    inputs = _inputs()
    adapter.attach(transformer)
    try:
        with torch.no_grad():
            if not identities:
                return transformer(**inputs)[0]
            arc, sig = random_identities(1, 2, seed=3)
            with adapter.identities(arcface=arc, siglip=sig, boxes=BOXES, height=256, width=256,
                                    id_weight=1.0, siglip_weight=0.5):
                return transformer(**inputs)[0]
    finally:
        adapter.detach()


@pytest.mark.parametrize("fmt", ADAPTER_FORMATS)
def test_quantised_adapter_hooks_bare_output_and_residual(transformer, bf16_adapter, fmt):
    with torch.no_grad():
        bare = transformer(**_inputs())[0]
    ref = _run(transformer, bf16_adapter, identities=True).float() - bare.float()
    adapter = quantize_adapter(copy.deepcopy(bf16_adapter), fmt)
    assert adapter_format(adapter) == fmt

    # no identities: the hooks return None and the output is the bare transformer's, bit for bit
    assert torch.equal(_run(transformer, adapter, identities=False), bare)

    # the block hooks run once per block (2 double + 2 single), each on its own cross-attention
    calls: list[str] = []
    handles = [m.register_forward_hook(lambda mod, a, o, name=name: calls.append(name))
               for name, m in adapter.named_modules() if name.endswith("to_out")]
    try:
        out = _run(transformer, adapter, identities=True)
    finally:
        for h in handles:
            h.remove()
    assert sorted(calls) == sorted(f"{b}.{i}.to_out" for b in ("ipa_arc", "ipa_sig") for i in range(4))

    residual = out.float() - bare.float()
    err = float((residual - ref).norm() / ref.norm())
    assert ref.norm() > 0.1  # the identities do move the output
    assert err <= RESIDUAL_TOLERANCE[fmt], f"{fmt}: residual relative error {err:.4f}"
    if fmt != "bf16":
        assert err > 0  # the weights really are stored differently


def test_quantised_weights_hold_fewer_bytes(bf16_adapter):
    full = weight_bytes(bf16_adapter)
    linear = sum(m.weight.numel() for m in bf16_adapter.modules() if isinstance(m, torch.nn.Linear))
    for fmt in ("fp8", "int8"):
        q = quantize_adapter(copy.deepcopy(bf16_adapter), fmt)
        # each Linear weight drops from 2 bytes to 1 per element (plus one bf16 scale per output channel)
        saved = full - weight_bytes(q)
        assert 0.95 * linear <= saved <= linear, (fmt, saved, linear)


def test_formats_are_checked(bf16_adapter):
    with pytest.raises(ValueError, match="'nf4' is not one of bf16, fp8, int8"):
        quantize_adapter(copy.deepcopy(bf16_adapter), "nf4")
    q = quantize_adapter(copy.deepcopy(bf16_adapter), "int8")
    assert quantize_adapter(q, "int8") is q  # same format: no-op
    with pytest.raises(ValueError, match="already stored as int8"):
        quantize_adapter(q, "fp8")
    assert quantize_adapter(bf16_adapter, "bf16") is bf16_adapter
    assert adapter_format(bf16_adapter) == "bf16"
