"""PairMetrics: label-free statistics, latency, thresholds and per-partition merging.

Each metric's live value against scikit-learn (and SQL and offline) is checked for every
metric and task in ``tests/test_metric_oracle.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from abdag.comparators.metrics import (
    DEFAULT_METRICS,
    LogHistogram,
    PairMetrics,
)

REL = 1e-9


def _binary(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    na = rng.normal(size=n)
    nb = 0.6 * na + 0.8 * rng.normal(size=n)
    sa = 1 / (1 + np.exp(-(1.0 * y + na - 0.5)))
    sb = 1 / (1 + np.exp(-(1.6 * y + nb - 0.8)))
    pa, pb = (sa >= 0.5).astype(int), (sb >= 0.5).astype(int)
    la, lb = rng.gamma(2, 5, n), rng.gamma(2, 8, n)
    return y, sa, pa, sb, pb, la, lb


def _feed(pm, y, sa, pa, sb, pb, la=None, lb=None, idx=None):
    idx = range(len(y)) if idx is None else idx
    for i in idx:
        pm.update(
            float(sa[i]),
            int(pa[i]) if pa is not None else None,
            float(sb[i]),
            int(pb[i]) if pb is not None else None,
            float(y[i]),
            None if la is None else float(la[i]),
            None if lb is None else float(lb[i]),
        )


def test_binary_pair_statistics_loss_and_latency():
    y, sa, pa, sb, pb, la, lb = _binary()
    pm = PairMetrics("binary")
    _feed(pm, y, sa, pa, sb, pb, la, lb)
    snap = pm.snapshot()
    for m, s in (("a", sa), ("b", sb)):
        v = snap[m]
        assert set(v) >= set(DEFAULT_METRICS["binary"]) | {"roc_auc_err_bound", "mean_loss"}
        assert v["mean_loss"] == pytest.approx(skm.log_loss(y, s), rel=REL)
        assert v["roc_auc_err_bound"] < 1e-3  # the documented bound with 1000 bins
        assert v["n"] == len(y)
    pair = snap["pair"]
    assert pair["agreement"] == pytest.approx(np.mean(pa == pb), rel=REL)
    assert pair["flip_rate"] == pytest.approx(np.mean(pa != pb), rel=REL)
    assert pair["mean_abs_score_diff"] == pytest.approx(np.mean(np.abs(sa - sb)), rel=REL)
    assert pair["b01"] == np.sum((pa != y) & (pb == y))
    assert pair["b10"] == np.sum((pa == y) & (pb != y))
    assert snap["b"]["roc_auc"] > snap["a"]["roc_auc"]
    for m, lat in (("a", la), ("b", lb)):
        for q in (0.5, 0.95):
            ref = np.quantile(lat, q, method="lower")
            assert snap[m][f"latency_p{round(q * 100)}_ms"] == pytest.approx(ref, rel=0.011)


def test_shared_confusion_matrix_counts_each_event_once():
    y, sa, pa, sb, pb, *_ = _binary(500)
    pm = PairMetrics("binary")
    _feed(pm, y, sa, pa, sb, pb)
    cm = pm._side["a"]["cm"]
    assert cm.total_weight == 500  # five metrics read it; it was updated once per event
    assert pm.snapshot()["a"]["accuracy"] == pytest.approx(skm.accuracy_score(y, pa), rel=REL)


def test_river_rocauc_opt_in_is_an_approximation():
    y, sa, pa, sb, pb, *_ = _binary(1000)
    pm = PairMetrics("binary", ["accuracy", "roc_auc", "roc_auc_river"])
    _feed(pm, y, sa, pa, sb, pb)
    snap = pm.snapshot()
    exact = skm.roc_auc_score(y, sa)
    assert snap["a"]["roc_auc_river"] == pytest.approx(exact, abs=0.02)
    assert abs(snap["a"]["roc_auc"] - exact) <= snap["a"]["roc_auc_err_bound"]
    assert set(snap["a"]) >= {"accuracy", "roc_auc", "roc_auc_river"}
    assert "precision" not in snap["a"]


def test_multiclass_loss_and_agreement():
    rng = np.random.default_rng(1)
    n, k = 2000, 4
    y = rng.integers(0, k, n)
    pa = np.where(rng.random(n) < 0.6, y, rng.integers(0, k, n))
    pb = np.where(rng.random(n) < 0.7, y, rng.integers(0, k, n))
    sa, sb = rng.random(n), rng.random(n)
    pm = PairMetrics("multiclass")
    _feed(pm, y, sa, pa, sb, pb)
    snap = pm.snapshot()
    for m, p in (("a", pa), ("b", pb)):
        assert snap[m]["mean_loss"] == pytest.approx(1 - skm.accuracy_score(y, p), rel=REL)
    assert snap["pair"]["agreement"] == pytest.approx(np.mean(pa == pb), rel=REL)


def test_regression_loss_difference():
    rng = np.random.default_rng(2)
    n = 2000
    y = rng.normal(10, 3, n)
    sa = y + rng.normal(0, 1.5, n)
    sb = y + rng.normal(0.1, 1.0, n)
    pm = PairMetrics("regression")
    _feed(pm, y, sa, None, sb, None)
    snap = pm.snapshot()
    assert "agreement" not in snap["pair"]
    assert snap["pair"]["mean_loss_diff"] == pytest.approx(
        np.mean((sa - y) ** 2 - (sb - y) ** 2), rel=REL
    )


def test_unlabelled_updates_only_touch_label_free_stats():
    pm = PairMetrics("binary")
    pm.update(0.9, 1, 0.2, 0, None, 3.0, 4.0)
    pm.update(0.8, 1, 0.7, 1, None)
    snap = pm.snapshot()
    assert snap["pair"]["n_pairs"] == 2 and snap["pair"]["n_labelled"] == 0
    assert snap["pair"]["agreement"] == 0.5
    assert math.isnan(snap["a"]["accuracy"]) and math.isnan(snap["a"]["roc_auc"])
    assert snap["a"]["latency_p50_ms"] == pytest.approx(3.0, rel=0.011)


def test_binary_pred_defaults_to_threshold():
    pm = PairMetrics("binary", ["accuracy"])
    pm.update(0.9, None, 0.3, None, 1)
    assert pm.snapshot()["a"]["accuracy"] == 1.0 and pm.snapshot()["b"]["accuracy"] == 0.0
    # each model's own threshold, when the pair carries a score and no class
    pm = PairMetrics("binary", ["accuracy"], threshold_a=0.95, threshold_b=0.25)
    pm.update(0.9, None, 0.3, None, 1)
    assert pm.snapshot()["a"]["accuracy"] == 0.0 and pm.snapshot()["b"]["accuracy"] == 1.0
    pm.update(0.9, 0, 0.3, 1, 1)  # a class sent by the model wins over any threshold
    assert pm.snapshot()["a"]["accuracy"] == 0.0 and pm.snapshot()["b"]["accuracy"] == 1.0


def test_log_histogram_quantiles_at_the_edges():
    h = LogHistogram()
    assert math.isnan(h.quantile(0.5))
    for x in (0.0, 0.0, 1.0, 10.0):
        h.update(x)
    assert h.quantile(0.0) == 0.0
    assert h.quantile(1.0) == pytest.approx(10.0, rel=0.011)


def test_bad_arguments():
    with pytest.raises(ValueError):
        PairMetrics("ranking")
    with pytest.raises(ValueError, match=r"unknown regression metrics \['accuracy'\]"):
        PairMetrics("regression", ["accuracy"])
