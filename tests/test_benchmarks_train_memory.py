"""benchmarks/train_memory.py: the per-GPU accounting shards what each strategy shards, and saved-tensor bytes are real."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_memory.py"


@pytest.fixture(scope="module")
def tm():
    spec = importlib.util.spec_from_file_location("bench_train_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_static_memory_per_strategy(tm):
    p = {"adapter": 10**9, "flux": 10**10, "largest_block": 10**8, "t5": 4 * 10**9, "clip": 0, "vae": 0,
         "arcface_r100": 0}
    ddp, z2, z3 = (tm.static_gb(p, s, 8) for s in ("ddp", "zero2", "zero3"))
    assert sum(ddp.values()) == pytest.approx(16 + 20 + 8)  # 16 B per trainable param, bf16 FLUX and T5
    assert (z2["gradients"], z2["optimizer_state"], z2["trainable_weights"]) == pytest.approx((2 / 8, 12 / 8, 2))
    assert z2["frozen_base"] == pytest.approx(20) and z2["text_encoders"] == 0
    assert z3["trainable_weights"] == pytest.approx(2 / 8)
    assert z3["frozen_base"] == pytest.approx(20 / 8 + 0.2)  # sharded + the largest block gathered
    assert sum(tm.static_gb(p, "zero3", 1).values()) == pytest.approx(sum(ddp.values()))


def test_saved_bytes_counts_each_storage_once_and_skips_parameters(tm):
    lin = torch.nn.Linear(64, 32).requires_grad_(False)
    saved = tm.SavedBytes(tm._storages(lin))
    x = torch.randn(10, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        y = lin(x)
        (y * y).sum()  # saves y twice (one storage)
    # the frozen Linear saves only its weight for the input's gradient (a parameter: not counted), not x
    assert sum(saved.by_phase().values()) == y.nbytes
