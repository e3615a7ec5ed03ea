"""Paired statistics and the verdict rule."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn import metrics as skm
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

from abdag.comparators.statistics import (
    McNemarResult,
    average_precision,
    mcnemar_from_counts,
    mcnemar_test,
    paired_bootstrap_auc_diff,
    paired_bootstrap_metric_diff,
    per_request_loss,
    roc_auc,
    sequential_test,
)
from abdag.comparators.verdict import decide


def _binormal(n, d_a, d_b, seed, rho=0.5):
    """Scores whose true AUC is Phi(d / sqrt(2)) (equal-variance binormal model)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(int)
    ea = rng.normal(size=n)
    eb = rho * ea + np.sqrt(1 - rho**2) * rng.normal(size=n)
    sa = 1 / (1 + np.exp(-(d_a * y + ea - d_a / 2)))
    sb = 1 / (1 + np.exp(-(d_b * y + eb - d_b / 2)))
    return y, sa, sb


# ------------------------------------------------------------------ McNemar
@pytest.mark.parametrize("b01,b10", [(3, 12), (10, 10), (0, 5), (40, 70), (200, 150)])
def test_mcnemar_equals_statsmodels(b01, b10):
    rng = np.random.default_rng(b01 * 1000 + b10)
    both, none = 300, 50
    ca = np.r_[np.zeros(b01), np.ones(b10), np.ones(both), np.zeros(none)].astype(bool)
    cb = np.r_[np.ones(b01), np.zeros(b10), np.ones(both), np.zeros(none)].astype(bool)
    perm = rng.permutation(len(ca))
    res = mcnemar_test(ca[perm], cb[perm])
    exact = b01 + b10 < 25
    ref = sm_mcnemar([[both, b10], [b01, none]], exact=exact, correction=True)
    assert (res.b01, res.b10, res.exact) == (b01, b10, exact)
    assert res.pvalue == pytest.approx(ref.pvalue, rel=1e-12)
    assert res.statistic == pytest.approx(ref.statistic, rel=1e-12)


def test_mcnemar_no_discordance():
    assert mcnemar_from_counts(0, 0).pvalue == 1.0


# ------------------------------------------------------ metric functions, exact
# (every metric's offline value against scikit-learn: tests/test_metric_oracle.py)
def test_rank_auc_and_ap_equal_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1500)
    s = np.round(rng.random(1500) + 0.4 * y, 1)  # many ties
    assert roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), rel=1e-12)
    assert average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s), rel=1e-12)
    batch = np.stack([s, s[::-1]])
    yb = np.stack([y, y])
    np.testing.assert_allclose(
        roc_auc(yb, batch), [skm.roc_auc_score(y, s), skm.roc_auc_score(y, s[::-1])]
    )
    np.testing.assert_allclose(
        average_precision(yb, batch),
        [skm.average_precision_score(y, s), skm.average_precision_score(y, s[::-1])],
    )


def test_per_request_loss():
    y, s, _ = _binormal(500, 1.0, 1.0, 2)
    assert per_request_loss("binary", y, s).mean() == pytest.approx(skm.log_loss(y, s), rel=1e-9)
    assert per_request_loss("multiclass", np.array([1, 2]), pred=np.array([1, 0])).tolist() == [
        0.0,
        1.0,
    ]
    with pytest.raises(ValueError):
        per_request_loss("ranking", y, s)


# -------------------------------------------------------------------- bootstrap
def test_bootstrap_auc_ci_contains_truth_and_is_reproducible():
    d_a, d_b = 1.0, 1.6
    true_diff = norm.cdf(d_b / np.sqrt(2)) - norm.cdf(d_a / np.sqrt(2))
    y, sa, sb = _binormal(2000, d_a, d_b, seed=3)
    iv = paired_bootstrap_auc_diff(y, sa, sb, n_resamples=1000, seed=7)
    assert iv.estimate == pytest.approx(skm.roc_auc_score(y, sb) - skm.roc_auc_score(y, sa))
    assert iv.low < true_diff < iv.high
    assert iv.low > 0  # B clearly better
    assert iv.method == "BCa" and iv.n == 2000
    again = paired_bootstrap_auc_diff(y, sa, sb, n_resamples=1000, seed=7)
    assert (again.low, again.high) == (iv.low, iv.high)
    other = paired_bootstrap_auc_diff(y, sa, sb, n_resamples=1000, seed=8)
    assert (other.low, other.high) != (iv.low, iv.high)


def test_bootstrap_ci_coverage_of_auc_diff():
    d_a, d_b = 1.0, 1.3
    true_diff = norm.cdf(d_b / np.sqrt(2)) - norm.cdf(d_a / np.sqrt(2))
    hits = 0
    for k in range(40):
        y, sa, sb = _binormal(400, d_a, d_b, seed=100 + k)
        iv = paired_bootstrap_auc_diff(y, sa, sb, n_resamples=400, seed=k, method="percentile")
        hits += iv.low < true_diff < iv.high
    assert hits >= 34  # nominal 95 %: 38 of 40 expected


def test_bootstrap_generic_metrics():
    rng = np.random.default_rng(4)
    y = rng.normal(size=1500)
    a = y + rng.normal(0, 1.0, 1500)
    b = y + rng.normal(0, 0.7, 1500)
    iv = paired_bootstrap_metric_diff("mae", y, a, b, n_resamples=800, method="percentile")
    assert iv.high < 0  # B's error is lower
    true_mae_diff = (0.7 - 1.0) * np.sqrt(2 / np.pi)
    assert iv.low < true_mae_diff < iv.high
    own = paired_bootstrap_metric_diff(
        lambda yy, x: np.abs(x - yy).mean(-1), y, a, b, n_resamples=800, method="percentile"
    )
    assert (own.low, own.high) == (iv.low, iv.high)
    same = paired_bootstrap_metric_diff("accuracy", y > 0, a > 0, a > 0, n_resamples=200)
    assert same.estimate == 0.0 and same.low == same.high == 0.0  # degenerate -> percentile


# ------------------------------------------------------------ sequential test
def test_sequential_type_one_error_on_null_streams():
    rng = np.random.default_rng(5)
    streams, n, alpha = 200, 2000, 0.05
    for kind in ("normal", "zero_one"):
        rejections = 0
        for _ in range(streams):
            if kind == "normal":
                d = rng.normal(0, 1, n)
                prior = 0.0
            else:  # 0/1 loss differences: mostly ties, discordant +-1
                d = rng.choice([-1.0, 0.0, 1.0], n, p=[0.05, 0.9, 0.05])
                prior = 1.0
            res = sequential_test(d, alpha, prior_var=prior)
            # always valid: "ever rejected while watching" is what is bounded
            rejections += res.pvalue_always_valid < alpha
        assert rejections / streams <= alpha + 0.03, kind


def test_sequential_p_value_matches_interval():
    rng = np.random.default_rng(6)
    for _ in range(50):
        d = rng.normal(0.02, 1, 3000)
        r = sequential_test(d, 0.05)
        assert (r.pvalue_always_valid < 0.05) == (r.lower > 0 or r.upper < 0)


def test_sequential_detects_improvement_and_degradation():
    rng = np.random.default_rng(7)
    better = sequential_test(rng.normal(0.15, 1, 3000))
    assert better.decision == "B better" and better.lower > 0 and better.pvalue_always_valid < 1e-3
    worse = sequential_test(rng.normal(-0.15, 1, 3000))
    assert worse.decision == "B worse" and worse.upper < 0
    not_worse = sequential_test(rng.normal(0.0, 1, 20000), margin=0.1)
    assert not_worse.decision == "B not worse" and not_worse.lower > -0.1
    assert not_worse.pvalue_margin < 0.05
    early = sequential_test(rng.normal(0.15, 1, 50))
    assert early.decision == "inconclusive" and early.lower == -np.inf


def test_sequential_identical_models():
    r = sequential_test(np.zeros(500), margin=0.01)
    assert (r.lower, r.upper, r.decision) == (0.0, 0.0, "B not worse")
    assert sequential_test(np.zeros(500)).decision == "inconclusive"
    # 0/1 loss with a prior: 500 ties bound the discordance near 1 %, not below 0.1 %
    assert sequential_test(np.zeros(500), margin=0.02, prior_var=1.0).decision == "B not worse"
    assert sequential_test(np.zeros(500), margin=0.001, prior_var=1.0).decision == "inconclusive"


# ---------------------------------------------------------------------- verdict
def test_verdict_cases():
    rng = np.random.default_rng(8)
    better = decide(sequential_test(rng.normal(0.2, 1, 2000)))
    assert better.label == "B better" and better.confidence > 0.99
    worse = decide(sequential_test(rng.normal(-0.2, 1, 2000)))
    assert worse.label == "B worse" and worse.confidence > 0.99
    few = decide(sequential_test(rng.normal(0.5, 1, 150)), min_pairs=200)
    assert few.label == "not enough data" and few.confidence == 0.0 and "150" in few.reason
    unsure = decide(sequential_test(rng.normal(0.0, 1, 500)))
    assert unsure.label == "not enough data" and "inconclusive" in unsure.reason
    nw = decide(sequential_test(rng.normal(0.0, 1, 20000), margin=0.1), margin=0.1)
    assert nw.label == "B not worse" and nw.confidence > 0.95
    with pytest.raises(ValueError):
        decide(sequential_test(rng.normal(0, 1, 300)), margin=-1)


def test_verdict_mcnemar_guardrail():
    rng = np.random.default_rng(9)
    seq_better = sequential_test(rng.normal(0.2, 1, 2000))
    seq_flat = sequential_test(rng.normal(0.0, 1, 2000))
    against_b = McNemarResult(b01=40, b10=90, statistic=18.5, pvalue=1e-5, exact=False)
    for_b = McNemarResult(b01=90, b10=40, statistic=18.5, pvalue=1e-5, exact=False)
    assert decide(seq_better, for_b).label == "B better"
    conflict = decide(seq_better, against_b)
    assert conflict.label == "not enough data" and "disagree" in conflict.reason
    worse = decide(seq_flat, against_b)
    assert worse.label == "B worse" and worse.confidence == pytest.approx(1 - 1e-5)
