"""Tolerances for comparing float32 results computed along different kernel / BLAS paths.

A fixed ``atol`` such as 1e-5 is a guess about the output's size: a tensor of magnitude ~30 carries
rounding noise of a few ``eps32 · 30 ≈ 4e-6`` per operation, and a network of a few layers accumulates
tens of those, so the same test passes on one machine and fails on another (1.0014e-5 against 1e-5 was
seen on a fresh checkout). :func:`fp32_atol` scales the allowance with the reference's magnitude instead.
"""

from __future__ import annotations

import torch

EPS32 = float(torch.finfo(torch.float32).eps)  # 1.19e-7


def fp32_atol(reference: torch.Tensor, ulps: float = 256.0) -> float:
    """Absolute tolerance of ``ulps`` float32 epsilons at the reference's largest magnitude (never below 1e-6).

    256 ulps at scale s is ~3e-5·s: room for accumulated rounding of deep fp32 stacks run through different
    matmul kernels, yet ~100× below any real bug these tests look for (wrong keys, masks or scales move
    outputs by ≥ 1e-2·s).
    """
    scale = float(reference.detach().abs().max()) if reference.numel() else 0.0
    return max(ulps * EPS32 * scale, 1e-6)


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 256.0) -> None:
    """``torch.testing.assert_close`` with :func:`fp32_atol` of ``expected`` (rtol 0)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=fp32_atol(expected, ulps))
