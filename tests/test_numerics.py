"""The fp32 comparison tolerance scales with the tensor, so BLAS-path noise passes and real errors fail."""

from __future__ import annotations

import pytest
import torch
from tiny_models.numerics import EPS32, assert_close_fp32, fp32_atol


def test_rounding_noise_at_scale_passes_where_a_fixed_1e5_failed():
    ref = torch.linspace(-2.7, 2.7, 1000)
    # the failure seen on a fresh machine: 1.0014e-5 off on outputs of magnitude ~2.7 (~31 ulps at that scale)
    noisy = ref.clone()
    noisy[17] += 1.0014e-5
    with pytest.raises(AssertionError):
        torch.testing.assert_close(noisy, ref, rtol=0, atol=1e-5)
    assert_close_fp32(noisy, ref)


def test_real_errors_still_fail_and_the_tolerance_tracks_scale():
    ref = torch.linspace(-2.7, 2.7, 1000)
    wrong = ref.clone()
    wrong[17] += 1e-3  # a genuine discrepancy (~0.04 % of the scale)
    with pytest.raises(AssertionError):
        assert_close_fp32(wrong, ref)
    assert fp32_atol(100 * ref) == pytest.approx(100 * fp32_atol(ref))
    assert fp32_atol(ref) == pytest.approx(256 * EPS32 * 2.7, rel=1e-6)
    assert fp32_atol(torch.zeros(3)) == 1e-6
