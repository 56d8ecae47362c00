"""MultiID-Bench metric functions against an independent implementation of the paper's formulas."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from withanyone.bench.metrics import (
    CopyPaste,
    SimGT,
    SimRef,
    aggregate,
    angle,
    bootstrap_ci,
    copy_paste_score,
    cp_gate_passes,
    match_faces,
    robust_mean,
    score_faces,
)

# ----------------------------------------------------------------- reference implementation (written apart)


def ref_theta(a, b):
    """Angle via atan2(|a×b| generalised, a·b) on unit vectors — no arccos, so an independent route."""
    a = np.asarray(a, float) / np.linalg.norm(a)
    b = np.asarray(b, float) / np.linalg.norm(b)
    dot = float(np.clip(sum(x * y for x, y in zip(a, b, strict=True)), -1, 1))
    cross = math.sqrt(max(0.0, float(np.sum(np.outer(a, b) ** 2) - dot * dot)))  # |a|²|b|² − (a·b)² = |a∧b|²
    return math.atan2(cross, dot)


def ref_cp(g, t, r):
    tr = ref_theta(t, r)
    return 0.0 if tr < 1e-6 else (ref_theta(g, t) - ref_theta(g, r)) / tr


def ref_match(a, b):
    """Brute force over all injections: the assignment maximising the total cosine."""
    cos = [[float(np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y)) for y in b] for x in a]
    n, m = len(a), len(b)
    best, best_pairs = -1e9, None
    if n <= m:
        for perm in itertools.permutations(range(m), n):
            tot = sum(cos[i][perm[i]] for i in range(n))
            if tot > best + 1e-12:
                best, best_pairs = tot, [(i, perm[i]) for i in range(n)]
    else:
        for perm in itertools.permutations(range(n), m):
            tot = sum(cos[perm[j]][j] for j in range(m))
            if tot > best + 1e-12:
                best, best_pairs = tot, sorted((perm[j], j) for j in range(m))
    return best_pairs, [cos[i][j] for i, j in best_pairs]


def ref_robust_mean(values):
    v = sorted(values)
    q1, q3 = np.percentile(v, 25), np.percentile(v, 75)
    lo, hi = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
    kept = [x for x in v if lo <= x <= hi]
    if len(v) - len(kept) > len(v) / 2:
        return float(np.median(v))
    return sum(kept) / len(kept)


def unit(rng, n, d=16):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------- the tests


def test_cp_random_duplicate_antipodal_vectors_match_reference():
    rng = np.random.default_rng(0)
    for _ in range(300):
        g, t, r = unit(rng, 3)
        assert copy_paste_score(g, t, r) == pytest.approx(ref_cp(g, t, r), abs=1e-9)
    g, t, r = unit(rng, 3)
    # duplicates: output = GT → −1, output = reference → +1, GT = reference → 0 (undefined, paper sets 0)
    assert copy_paste_score(t, t, r) == pytest.approx(-1.0, abs=1e-9)
    assert copy_paste_score(r, t, r) == pytest.approx(1.0, abs=1e-9)
    assert copy_paste_score(g, t, t) == 0.0
    assert copy_paste_score(g, t, t * 3.0) == 0.0  # scale does not matter: unit vectors
    # antipodal: θ(t, r) = π; output = −t equals r here → +1; output orthogonal to both → 0
    e = np.eye(4)
    assert copy_paste_score(-e[0], e[0], -e[0]) == pytest.approx(1.0, abs=1e-9)
    assert copy_paste_score(e[1], e[0], -e[0]) == pytest.approx(0.0, abs=1e-9)
    assert copy_paste_score(e[0], e[0], -e[0]) == pytest.approx(-1.0, abs=1e-9)
    assert angle(e[0], -e[0]) == pytest.approx(math.pi)
    # nearly identical t and r: below 1e-6 rad → 0, not a huge ratio
    t2 = t + 1e-9 * unit(rng, 1)[0]
    assert copy_paste_score(g, t, t2) == 0.0


def test_cp_is_bounded_by_triangle_inequality():
    rng = np.random.default_rng(1)
    vals = [copy_paste_score(*unit(rng, 3, 8)) for _ in range(500)]
    assert min(vals) >= -1 - 1e-9 and max(vals) <= 1 + 1e-9
    assert min(vals) < -0.5 and max(vals) > 0.5  # the range is actually used


@pytest.mark.parametrize("n,m", [(1, 1), (2, 2), (3, 3), (4, 4), (2, 4), (4, 2), (3, 1)])
def test_match_faces_equals_brute_force(n, m):
    rng = np.random.default_rng(10 * n + m)
    for _ in range(20):
        a, b = unit(rng, n), unit(rng, m)
        pairs, sims = match_faces(a, b)
        rpairs, rsims = ref_match(a, b)
        assert sum(sims) == pytest.approx(sum(rsims), abs=1e-9)
        assert pairs == rpairs
        assert np.allclose(sims, rsims)


def test_match_faces_with_duplicates_recovers_permutation():
    rng = np.random.default_rng(3)
    a = unit(rng, 4)
    perm = [2, 0, 3, 1]
    pairs, sims = match_faces(a, a[perm])
    assert pairs == [(i, perm.index(i)) for i in range(4)]
    assert np.allclose(sims, 1.0)


def test_robust_mean_matches_reference_and_rules():
    rng = np.random.default_rng(4)
    for n in (1, 2, 3, 5, 10, 57):
        v = list(rng.normal(size=n))
        assert robust_mean(v) == pytest.approx(ref_robust_mean(v), abs=1e-12)
    v = [0.40, 0.41, 0.42, 0.43, 0.44, 5.0]  # one outlier dropped
    assert robust_mean(v) == pytest.approx(np.mean(v[:-1]))
    assert np.mean(v) > 1.0
    # heavy tails: Cauchy samples, many outliers dropped, still equal to the reference rule
    for seed in range(20):
        v = list(np.random.default_rng(seed).standard_cauchy(31))
        assert robust_mean(v) == pytest.approx(ref_robust_mean(v), abs=1e-12)
    v = [1.0, 1.0, 1.0, 1.0, 1.0, 9.0]  # IQR 0: the 9 drops (1 of 6), mean of the rest
    assert robust_mean(v) == 1.0
    assert math.isnan(robust_mean([]))
    assert robust_mean([float("nan"), 2.0, 4.0]) == 3.0


def test_more_than_half_rule_picks_median():
    # Q1..Q3 window tiny relative to the spread: 6 of 10 values out → median reported
    v = [0, 0, 0, 0, 1e3, -1e3, 2e3, -2e3, 3e3, -3e3]
    q1, q3 = np.percentile(v, [25, 75])
    lo, hi = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
    dropped = sum(not (lo <= x <= hi) for x in v)
    expected = float(np.median(v)) if dropped > len(v) / 2 else float(np.mean([x for x in v if lo <= x <= hi]))
    assert robust_mean(v) == pytest.approx(expected)


def test_bootstrap_ci_covers_mean_and_shrinks():
    rng = np.random.default_rng(5)
    small, big = rng.normal(0.5, 0.1, 20), rng.normal(0.5, 0.1, 2000)
    lo, hi = bootstrap_ci(small)
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_ci(big)
    assert (hi2 - lo2) < (hi - lo) / 3
    assert bootstrap_ci([0.3]) == (0.3, 0.3)
    agg = aggregate(small)
    assert agg.n == 20 and agg.mean == pytest.approx(small.mean())


def test_score_faces_multi_person_against_reference():
    rng = np.random.default_rng(6)
    for n in (1, 2, 3, 4):
        for _ in range(10):
            out, gt, refs = unit(rng, n), unit(rng, n), unit(rng, n)
            s = score_faces(out, gt, refs)
            gp, gs = ref_match(out, gt)
            rp, rs = ref_match(out, refs)
            assert s.sim_gt == pytest.approx(np.mean(gs)) and s.sim_ref == pytest.approx(np.mean(rs))
            g2t, g2r = dict(gp), dict(rp)
            cps = [ref_cp(out[i], gt[g2t[i]], refs[g2r[i]]) for i in range(n)]
            assert s.cp == pytest.approx(np.mean(cps), abs=1e-9)
            if n >= 2:
                cos = out @ refs.T
                mask = np.ones_like(cos, bool)
                for i, j in rp:
                    mask[i, j] = False
                assert s.sim_ref_unmatched == pytest.approx(cos[mask].mean())
            else:
                assert s.sim_ref_unmatched is None


def test_score_faces_copies_give_minus_and_plus_one_with_shuffled_order():
    rng = np.random.default_rng(7)
    gt, refs = unit(rng, 3), unit(rng, 3)
    assert score_faces(gt[[1, 2, 0]], gt, refs).cp == pytest.approx(-1.0)
    assert score_faces(refs[[2, 0, 1]], gt, refs).cp == pytest.approx(1.0)
    assert score_faces(gt, None, refs).cp is None and score_faces(gt, None, refs).sim_gt is None


def test_metric_objects_and_gate():
    rng = np.random.default_rng(8)
    gt, refs = unit(rng, 1), unit(rng, 1)
    m = SimGT()
    assert m.update(gt, gt) == pytest.approx(1.0)
    m.update(refs, gt)
    v = m.compute()
    assert v.n == 2 and v.mean == pytest.approx((1 + float(gt[0] @ refs[0])) / 2)
    sr = SimRef()
    sr.update(refs, refs)
    assert sr.compute().mean == pytest.approx(1.0)
    # gate: Sim(GT) 1.0 passes, a random output (Sim(GT) ≈ 0) is gated out
    cp = CopyPaste()
    assert cp.update(gt, gt, refs) == pytest.approx(-1.0)
    far = -gt  # Sim(GT) = −1 < 0.40
    assert cp.update(far, gt, refs) is None and cp.gated_out == 1
    cp_nogate = CopyPaste(gate=None)
    assert cp_nogate.update(far, gt, refs) is not None
    assert cp_gate_passes(0.41, 1) and not cp_gate_passes(0.40, 1)
    assert cp_gate_passes(0.36, 2) and not cp_gate_passes(0.35, 3)
    merged = SimGT().merge(m)
    assert merged.compute().n == 2
