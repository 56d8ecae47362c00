"""benchmarks/gpu.py: the CPU dry run at tiny width exercises every measurement; without CUDA it skips cleanly."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_dry_run_measures_every_variant_preset_and_compile(gpu, capsys):
    # memory presets: no offload, model offload + quantised base and adapter, group offload + nf4 (skipped on CPU)
    result = gpu.main(["--dry-run", "--repeats", "1", "--warmup", "0", "--memory-presets", "none,16gb,8gb"])
    assert _last_json(capsys) == result  # the last line is the JSON object
    assert result["dry_run"] is True
    assert set(result["step_ms"]) == {"plain", "ours_arcface", "ours_siglip", "authors_dense"}
    assert all(v > 0 for v in result["step_ms"].values())
    for key in ("adapter_overhead_arcface", "adapter_overhead_siglip"):
        assert result[key] == pytest.approx(result["step_ms"][key.replace("adapter_overhead_", "ours_")]
                                            / result["step_ms"]["plain"] - 1, abs=2e-3)
    assert set(result["peak_vram_gb"]) == {"bf16", "model_cpu_offload", "group_offload", "quantized"}
    assert all(v is None for v in result["peak_vram_gb"].values())  # no CUDA memory on the CPU
    for name in ("bf16", "model_cpu_offload", "group_offload"):  # these run on the CPU too
        assert result["preset_step_ms"][name] > 0
    # the library's memory presets on a whole tiny pipeline: those that run on a CPU do (nf4 needs CUDA)
    from withanyone.pipeline.memory import PRESETS

    assert set(result["memory_preset_step_ms"]) == {"none", "16gb", "8gb"}
    for name, ms in result["memory_preset_step_ms"].items():
        assert (ms is None) == (PRESETS[name].base == "nf4"), name
    assert all(v is None for v in result["memory_preset_peak_vram_gb"].values())
    # torch.compile with the adapter attached: no graph break per block, no recompile per generation
    assert result["compile_speedup"] > 0
    assert result["graph_breaks"] < 4  # 2 double + 2 single blocks
    assert result["new_graphs_third_generation"] == 0


def test_without_cuda_it_skips_with_a_reason_and_the_computed_table(gpu, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = gpu.main([])
    out = capsys.readouterr().out
    assert "gpu.py: skipped:" in out and "--dry-run" in out
    assert json.loads(out.strip().splitlines()[-1]) == result
    w = result["computed_weights_gb"]
    # FLUX-dev transformer 11.90 B + adapter 2.78 B + SigLIP 0.09 B parameters, 2 bytes each
    assert w["bf16"] == pytest.approx(2 * (11.901 + 2.782 + 0.093), abs=0.05)
    assert w["bf16"] > w["model_cpu_offload"] > w["quantized"] > w["group_offload"]
