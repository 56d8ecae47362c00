"""benchmarks/memory.py: computed bytes cross-check the issue's meta-device counts, measured bytes of a quantised
slice scale per block, and each offload scheme's peak follows from the component bytes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"
GB = 1e9

pytest.importorskip("optimum.quanto")


@pytest.fixture(scope="module")
def mem():
    spec = importlib.util.spec_from_file_location("bench_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_computed_transformer_bytes_match_the_meta_counts(mem):
    c = mem.computed_transformer(mem.fd.transformer())  # FLUX.1-dev on the meta device
    # the figures, counted independently: GGUF Q8_0 12.65 GB, Q4_0 6.70 GB, NF4 6.14 GB
    assert c["gguf-q8_0"]["bytes"] / GB == pytest.approx(12.65, abs=0.01)
    assert c["gguf-q4_0"]["bytes"] / GB == pytest.approx(6.70, abs=0.01)
    assert c["nf4"]["bytes"] / GB == pytest.approx(6.14, abs=0.03)
    assert all(v["source"] == "computed" for v in c.values())


def test_measured_slice_bytes_scale_per_block(mem):
    from tiny_models.flux import tiny_flux_transformer

    slice_ = tiny_flux_transformer(seed=0, num_layers=1, num_single_layers=1).to(torch.bfloat16)
    full = tiny_flux_transformer(seed=0, num_layers=3, num_single_layers=5).to(torch.bfloat16)
    out, slices = mem.transformer_bytes(slice_, {"double_blocks": 3, "single_blocks": 5})
    assert out["bf16"]["bytes"] == 2 * sum(p.numel() for p in full.parameters())  # exact for bf16
    linear = sum(m.weight.numel() for m in full.modules() if isinstance(m, torch.nn.Linear))
    # int8 (quanto) halves the Linear weights but the output projections it leaves in bf16
    assert out["bf16"]["bytes"] - linear <= out["int8"]["bytes"] < out["bf16"]["bytes"] - 0.8 * linear
    assert out["fp8"]["bytes"] < out["bf16"]["bytes"]
    assert set(slices) == {"bf16", "fp8", "int8"}


def test_offload_peaks_follow_from_component_bytes(mem):
    from withanyone.pipeline.memory import MemoryPreset

    def row(b, block=0, outside=0):
        return {"bytes": b, "block_bytes": block, "outside_blocks": outside, "source": "x"}

    comp = {"transformer": {"bf16": row(100, 5, 10)}, "adapter": {"bf16": row(20), "int8": row(10)},
            "t5": {"bf16": row(50, 2, 8)}, "clip": {"bf16": row(3)}, "vae": {"bf16": row(2)},
            "siglip": {"bf16": row(1)}}
    none = mem.preset_bytes(MemoryPreset("a", "bf16", "bf16", "none"), comp)
    assert none["sum_bytes"] == none["peak_bytes"] == 176
    model = mem.preset_bytes(MemoryPreset("b", "bf16", "int8", "model"), comp)
    assert model["peak_bytes"] == 10 + 100 and model["sum_bytes"] == 166  # adapter + transformer
    group = mem.preset_bytes(MemoryPreset("c", "bf16", "bf16", "group"), comp)
    assert group["peak_bytes"] == 3 + 2 + 1 + 20 + max(10 + 2 * 5, 8 + 2 * 2)
    assert group["device_bytes"]["t5"] == 50
