"""AUROC, bootstrap, permutation and BH against cases worked out by hand."""

import math

import numpy as np
import pytest

from train.analysis.significance import SparseAUROC, auroc, benjamini_hochberg, bootstrap_ci, permutation_pvalue


def test_auroc_hand_cases():
    # 3 of the 4 (pos, neg) pairs are ordered correctly.
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # Pairs: 1>0, 1=1 (half), 2>0, 2>1 → 3.5 / 4.
    assert auroc([0, 1, 1, 2], [0, 0, 1, 1]) == pytest.approx(0.875)
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.5)
    assert auroc([3, 2, 1], [0, 1, 1]) == pytest.approx(0.0)
    assert math.isnan(auroc([1, 2], [1, 1]))
    # A weight of 2 on a row counts it twice.
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], weights=[1, 2, 1, 1]) == pytest.approx(
        auroc([0.1, 0.4, 0.4, 0.35, 0.8], [0, 0, 0, 1, 1])
    )


def test_sparse_auroc_matches_dense_columns():
    rng = np.random.default_rng(0)
    n, f = 300, 40
    dense = rng.normal(size=(n, f)) * (rng.random((n, f)) < 0.15)
    dense[:, 3] = 0.0  # a feature that never fires
    dense[:50, 5] = 1.0  # heavy ties
    dense[dense < -1.2] = -1.5  # negative activations rank below the silent rows (no ReLU)
    labels = rng.random(n) < 0.4
    w = rng.integers(0, 3, n).astype(float)
    rows, feats = np.nonzero(dense)
    s = SparseAUROC(rows, feats, dense[rows, feats], f)
    got = s(w * labels, w * ~labels)
    want = [auroc(dense[:, j], labels, w) for j in range(f)]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert got[3] == pytest.approx(0.5)


def test_bootstrap_hand_enumerated():
    # Clusters: two positives scoring 0.9 and 0.2, one negative at 0.5. The stratified
    # bootstrap always keeps the negative; the positive pair is {0.9,0.9} (p=1/4, AUROC 1),
    # {0.9,0.2} (p=1/2, AUROC 1/2) or {0.2,0.2} (p=1/4, AUROC 0).
    scores = np.array([0.9, 0.2, 0.5])
    labels = np.array([1, 1, 0])
    rows = np.arange(3)
    s = SparseAUROC(rows, np.zeros(3, int), scores, 1)
    lo, hi = bootstrap_ci(s, labels, rows, n_boot=2000, seed=1, level=0.95)
    assert (lo[0], hi[0]) == (0.0, 1.0)
    lo, hi = bootstrap_ci(s, labels, rows, n_boot=2000, seed=1, level=0.4)  # 30%..70%
    assert (lo[0], hi[0]) == (0.5, 0.5)


def test_bootstrap_perfect_separation_is_degenerate():
    scores = np.array([5.0, 6.0, 7.0, 1.0, 2.0, 0.0])
    labels = np.array([1, 1, 1, 0, 0, 0])
    rows = np.arange(6)
    s = SparseAUROC(rows, np.zeros(6, int), scores, 1)
    lo, hi = bootstrap_ci(s, labels, rows, n_boot=200, seed=0)
    assert (lo[0], hi[0]) == (1.0, 1.0)


def test_bootstrap_resamples_sequences_not_tokens():
    # Three positive sequences of 3, 2 and 4 tokens and two negative ones of 2 and 3: a resample
    # draws whole sequences within each class, so a row's weight is its sequence's multiplicity.
    seen = []

    def stat(pw, nw):
        seen.append((pw.copy(), nw.copy()))
        return np.array([0.0])

    labels_by_seq = np.array([1, 1, 1, 0, 0])
    row_seq = np.repeat(np.arange(5), [3, 2, 4, 2, 3])  # 14 rows
    starts = np.r_[0, np.cumsum([3, 2, 4, 2])]
    bootstrap_ci(stat, labels_by_seq, row_seq, n_boot=60, seed=0)
    assert len(seen) == 60
    mults = []
    for pw, nw in seen:
        w = pw + nw
        assert np.all(w == np.round(w)) and np.all(w >= 0)
        m = w[starts]
        np.testing.assert_array_equal(w, m[row_seq])  # constant within each sequence
        assert not np.any(pw[row_seq >= 3]) and not np.any(nw[row_seq < 3])  # each row on its class's side
        assert m[:3].sum() == 3 and m[3:].sum() == 2  # each class keeps its number of sequences
        mults.append(tuple(m))
    assert len(set(mults)) > 1  # the resamples differ ...
    assert any(0 in m for m in mults) and any(max(m) >= 2 for m in mults)  # ... with replacement


def test_permutation_exact_enumeration():
    # 4 single-row sequences, perfectly separated (AUROC 1). Of the C(4,2)=6 label
    # arrangements, only the observed one and its mirror reach |AUROC-1/2| = 1/2: p = 2/6.
    scores = np.array([0.9, 0.8, 0.1, 0.2])
    labels = np.array([1, 1, 0, 0])
    rows = np.arange(4)
    s = SparseAUROC(rows, np.zeros(4, int), scores, 1)
    assert permutation_pvalue(s, labels, rows, n_perm=100)[0] == pytest.approx(1 / 3)


def test_permutation_monte_carlo_close_to_exact():
    # 8 sequences, 4/4, perfectly separated: exact p = 2/C(8,4) = 2/70.
    scores = np.array([8, 7, 6, 5, 1, 2, 3, 4], dtype=float)
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    rows = np.arange(8)
    s = SparseAUROC(rows, np.zeros(8, int), scores, 1)
    p = permutation_pvalue(s, labels, rows, n_perm=2000, seed=3)[0]
    assert abs(p - 2 / 70) < 0.012
    # A feature with no signal gets a large p-value.
    s2 = SparseAUROC(rows, np.zeros(8, int), np.array([1, 2, 1, 2, 1, 2, 1, 2.0]), 1)
    assert permutation_pvalue(s2, labels, rows, n_perm=2000, seed=3)[0] > 0.5


def test_benjamini_hochberg_hand_case():
    # Sorted p: .005 .01 .03 .04 (m=4) → p·m/rank: .02 .02 .04 .04, already monotone.
    q = benjamini_hochberg(np.array([0.01, 0.04, 0.03, 0.005]))
    np.testing.assert_allclose(q, [0.02, 0.04, 0.04, 0.02])
    # Monotone step-up: a later smaller value pulls earlier ones down; NaN is not a test.
    q = benjamini_hochberg(np.array([0.02, np.nan, 0.03, 0.9]))
    np.testing.assert_allclose(q[[0, 2, 3]], [0.045, 0.045, 0.9])
    assert np.isnan(q[1])
