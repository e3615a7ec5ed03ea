"""Incremental metrics for model A against model B on the same requests.

One :class:`PairMetrics` lives in the comparison node per experiment and Kafka partition.
It is updated once per paired request and gives live values for dashboards
(:meth:`PairMetrics.snapshot`, one ``metric_snapshots`` row per partition and metric); the
report and the dashboard compute theirs from the ``pairs`` rows in SQL.

Each metric is defined once, in :mod:`abdag.comparators.metric_specs` (its live face reads the
statistics below); this module keeps those statistics, once per pair. What is river and
what is not, and why:

* Confusion-matrix metrics (accuracy, precision, recall, F1, macro/micro F1) are river metrics
  sharing **one** ``river.metrics.ConfusionMatrix`` per model. Only the matrix is updated,
  once per event: updating each metric that shares a matrix would count the event once per
  metric.
* Log loss, MAE, RMSE and R2 are read from sums kept per pair (loss, absolute and squared
  error, Welford moments of the labels): exact, the same values as river's metrics without
  updating those too.
* ROC AUC and PR AUC come from a fixed-bin score histogram per label (:class:`ScoreHistogram`),
  not from ``river.metrics.ROCAUC``: river's is an approximation over ``n_thresholds``
  (its own doc example gives 0.875 for a true 0.75). The histogram's ROC AUC is within a
  computable bound of the exact value:
  ``|auc - exact| <= roc_auc_err_bound`` (pairs of a positive and a negative in the same bin
  count as ties). With the default 1000 bins the bound is usually below 1e-3. PR AUC is
  scikit-learn's ``average_precision_score`` on the binned scores. ``"roc_auc_river"`` adds
  river's ROCAUC as an opt-in (costly, about 35 us per update at 100 thresholds).
* Latency quantiles come from a log-bucket sketch (:class:`LogHistogram`, 1 % relative
  accuracy, a bound river's P2 ``river.stats.Quantile`` does not give).

A binary pair without a predicted class gets one from its score and ``threshold_a`` /
``threshold_b`` (default ``DEFAULT_THRESHOLD``, 0.5); abdag's model nodes always send the
class they derived with their own ``ModelNode.threshold``.

Loss per request (the quantity the sequential test uses): the task's
(:meth:`abdag.comparators.tasks.Task.request_loss`).

>>> pm = PairMetrics("binary")
>>> rows = [  # score_a, pred_a, score_b, pred_b, label
...     (0.9, 1, 0.8, 1, 1), (0.6, 1, 0.3, 0, 0), (0.2, 0, 0.7, 1, 1), (0.4, 0, 0.1, 0, 0)]
>>> for sa, pa, sb, pb, y in rows:
...     pm.update(sa, pa, sb, pb, y, latency_a_ms=5.0, latency_b_ms=7.0)
>>> snap = pm.snapshot()
>>> snap["a"]["accuracy"], snap["b"]["accuracy"], snap["b"]["roc_auc"]
(0.5, 1.0, 1.0)
>>> snap["pair"]["agreement"], snap["pair"]["b01"], snap["pair"]["b10"]
(0.5, 2.0, 0.0)
>>> round(snap["b"]["latency_p50_ms"], 1)
7.0
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from river import metrics as rm

from abdag.comparators.metric_specs import (
    AVAILABLE_METRICS,
    DEFAULT_METRICS,
    LiveStats,
    MetricSpec,
    hist_auc_bound,
    hist_average_precision,
    hist_roc_auc,
    specs_for,
)
from abdag.comparators.tasks import DEFAULT_THRESHOLD, EPS, TASKS, task_spec

__all__ = [
    "AVAILABLE_METRICS",
    "DEFAULT_METRICS",
    "EPS",
    "LogHistogram",
    "PairMetrics",
    "ScoreHistogram",
    "TASKS",
    "request_loss",
]

_NAN = float("nan")


def request_loss(task: str, score: float | None, pred: int | None, label: float) -> float:
    """Loss of one prediction for ``task`` (:meth:`abdag.comparators.tasks.Task.request_loss`).

    >>> round(request_loss("binary", 0.8, 1, 1), 4), request_loss("multiclass", None, 2, 1)
    (0.2231, 1.0)
    """
    return task_spec(task).request_loss(score, pred, label)


class ScoreHistogram:
    """Counts of scores in [0, 1] per label in ``n_bins`` equal bins: mergeable ROC/PR AUC.

    >>> h = ScoreHistogram(n_bins=10)
    >>> for s, y in [(0.1, 0), (0.4, 0), (0.35, 1), (0.8, 1)]:
    ...     h.update(s, y)
    >>> h.roc_auc(), h.roc_auc_err_bound()  # no positive shares a bin with a negative
    (0.75, 0.0)
    >>> h2 = ScoreHistogram(n_bins=2)
    >>> for s, y in [(0.1, 0), (0.4, 0), (0.35, 1), (0.8, 1)]:
    ...     h2.update(s, y)
    >>> h2.roc_auc(), h2.roc_auc_err_bound()  # (0.35, 1) ties with two negatives
    (0.75, 0.25)
    """

    def __init__(self, n_bins: int = 1000) -> None:
        self.n_bins = n_bins
        self.pos = np.zeros(n_bins, dtype=np.int64)
        self.neg = np.zeros(n_bins, dtype=np.int64)

    def bin(self, score: float) -> int:
        i = int(score * self.n_bins)
        return 0 if i < 0 else (self.n_bins - 1 if i >= self.n_bins else i)

    def update(self, score: float, label: float) -> None:
        if label == 1:
            self.pos[self.bin(score)] += 1
        else:
            self.neg[self.bin(score)] += 1

    def roc_auc(self) -> float:
        return hist_roc_auc(self.pos, self.neg)

    def roc_auc_err_bound(self) -> float:
        return hist_auc_bound(self.pos, self.neg)

    def pr_auc(self) -> float:
        return hist_average_precision(self.pos, self.neg)


class LogHistogram:
    """Mergeable quantile sketch: log-spaced buckets with relative accuracy ``rel_acc``.

    Like DDSketch: a value x > 0 falls in bucket ceil(log_gamma(x)) with
    gamma = (1 + a) / (1 - a); every value in a bucket is within a of its midpoint.

    >>> h = LogHistogram()
    >>> for x in range(1, 101):
    ...     h.update(float(x))
    >>> abs(h.quantile(0.5) - 50) / 50 < 0.02, abs(h.quantile(0.95) - 95) / 95 < 0.02
    (True, True)
    """

    def __init__(self, rel_acc: float = 0.01) -> None:
        self.rel_acc = rel_acc
        self.gamma = (1 + rel_acc) / (1 - rel_acc)
        self._log_gamma = math.log(self.gamma)
        self.buckets: dict[int, int] = {}
        self.zero = 0
        self.n = 0

    def update(self, x: float) -> None:
        self.n += 1
        if x <= 0:
            self.zero += 1
            return
        k = math.ceil(math.log(x) / self._log_gamma)
        self.buckets[k] = self.buckets.get(k, 0) + 1

    def quantile(self, q: float) -> float:
        return _log_quantile(self.buckets, self.zero, self.n, self.gamma, q)


def _log_quantile(buckets: dict[int, int], zero: int, n: int, gamma: float, q: float) -> float:
    if n == 0:
        return _NAN
    rank = q * (n - 1)
    cum = zero
    if cum > rank:
        return 0.0
    for k in sorted(buckets):
        cum += buckets[k]
        if cum > rank:
            return 2.0 * gamma**k / (gamma + 1.0)
    return 2.0 * gamma ** max(buckets) / (gamma + 1.0)


def _metric_values(specs: Iterable[MetricSpec], st: LiveStats) -> dict[str, float]:
    vals: dict[str, float] = {"n": float(st.n)}
    for spec in specs:
        vals.update(spec.live_values(st))
    return vals


class PairMetrics:
    """Live metrics of model A and model B on the same requests, for one partition.

    Parameters
    ----------
    task
        ``'binary'``, ``'multiclass'`` or ``'regression'``.
    metrics
        Labelled metrics to keep (``DEFAULT_METRICS[task]`` when None); see
        ``AVAILABLE_METRICS``. Label-free statistics (agreement, flip rate, mean absolute
        score difference, latency p50/p95) are always kept.
    auc_bins
        Histogram bins for ROC/PR AUC (binary).
    roc_thresholds
        ``n_thresholds`` for the opt-in ``"roc_auc_river"``.
    threshold_a, threshold_b
        Binary: class 1 when ``score >= threshold``, for a pair that carries a score and no
        class (model nodes send the class they derived with their own threshold).
    """

    def __init__(
        self,
        task: str,
        metrics: list[str] | None = None,
        *,
        auc_bins: int = 1000,
        roc_thresholds: int = 100,
        latency_rel_acc: float = 0.01,
        threshold_a: float = DEFAULT_THRESHOLD,
        threshold_b: float = DEFAULT_THRESHOLD,
    ) -> None:
        specs = specs_for(task, metrics)
        self.task = task
        spec = task_spec(task)  # what the task keeps, read once: update runs per pair
        self._classes, self._positive = spec.classes, spec.positive_score
        self._needs_score, self._loss = spec.reads == "score", spec.request_loss
        self.metrics = tuple(s.name for s in specs)
        self._specs = specs
        self.auc_bins = auc_bins
        self.threshold_a, self.threshold_b = threshold_a, threshold_b
        self.n_pairs = 0
        self.n_agree = 0
        self.n_score_pairs = 0
        self.sum_abs_score_diff = 0.0
        self.n_labelled = 0
        self.b01 = 0  # A wrong, B right
        self.b10 = 0  # A right, B wrong
        self.y_n, self.y_mean, self.y_m2 = 0, 0.0, 0.0  # Welford on labels (R2)
        keep_hist = any(s.live_state == "hist" for s in specs)
        self._side: dict[str, dict[str, Any]] = {}
        for m in ("a", "b"):
            river_metrics = {
                s.name: s.new_river(roc_thresholds=roc_thresholds)
                for s in specs
                if s.live_state == "river"
            }
            self._side[m] = {
                "cm": rm.ConfusionMatrix(),  # once per pair: every class metric reads it
                "river": river_metrics,
                "direct": list(river_metrics.values()),  # updated one by one, per pair
                "hist": ScoreHistogram(auc_bins) if keep_hist else None,
                "latency": LogHistogram(latency_rel_acc),
                "loss_sum": 0.0,
                "abs_err_sum": 0.0,
                "sq_err_sum": 0.0,
            }

    def update(
        self,
        score_a: float | None,
        pred_a: int | None,
        score_b: float | None,
        pred_b: int | None,
        label: float | None = None,
        latency_a_ms: float | None = None,
        latency_b_ms: float | None = None,
        *,
        count_pair: bool = True,
    ) -> None:
        """Add one paired request; ``label=None`` updates only label-free statistics.

        A label that arrives after its pair was already counted is added with
        ``count_pair=False``, so the label-free statistics see each request once.
        """
        classes, positive = self._classes, self._positive
        if positive:  # a missing class: from the score and the model's threshold
            if pred_a is None and score_a is not None:
                pred_a = int(score_a >= self.threshold_a)
            if pred_b is None and score_b is not None:
                pred_b = int(score_b >= self.threshold_b)
        sa, sb = self._side["a"], self._side["b"]
        if count_pair:
            self.n_pairs += 1
            if classes and pred_a is not None and pred_b is not None:
                self.n_agree += pred_a == pred_b
            if score_a is not None and score_b is not None:
                self.n_score_pairs += 1
                self.sum_abs_score_diff += abs(score_a - score_b)
            if latency_a_ms is not None:
                sa["latency"].update(latency_a_ms)
            if latency_b_ms is not None:
                sb["latency"].update(latency_b_ms)
        if label is None:
            return
        if self._needs_score and (score_a is None or score_b is None):
            return
        loss = self._loss
        if not classes:  # a value: error sums and the labels' moments
            y = float(label)
            self.y_n += 1
            delta = y - self.y_mean
            self.y_mean += delta / self.y_n
            self.y_m2 += delta * (y - self.y_mean)
            for side, s in ((sa, score_a), (sb, score_b)):
                e = s - y
                side["abs_err_sum"] += abs(e)
                side["sq_err_sum"] += e * e
                side["loss_sum"] += loss(s, None, y)
                for m in side["direct"]:
                    m.update(y, s)
        else:
            if pred_a is None or pred_b is None:
                return
            y = int(label)
            ok_a, ok_b = pred_a == y, pred_b == y
            self.b01 += ok_b and not ok_a
            self.b10 += ok_a and not ok_b
            for side, s, p in ((sa, score_a, pred_a), (sb, score_b, pred_b)):
                side["cm"].update(y, int(p))  # once: every cm metric reads this matrix
                side["loss_sum"] += loss(s, p, y)
                if positive:
                    for m in side["direct"]:
                        m.update(y == 1, s)
                    if side["hist"] is not None:
                        side["hist"].update(s, y)
        self.n_labelled += 1

    # ------------------------------------------------------------------ reading
    def snapshot(self) -> dict[str, dict[str, float]]:
        """Current values: ``{"a": {...}, "b": {...}, "pair": {...}}``, each metric's live
        value (:meth:`abdag.comparators.metric_specs.MetricSpec.live`)."""
        out: dict[str, dict[str, float]] = {}
        for m, side in self._side.items():
            hist = side["hist"]
            st = LiveStats(
                n=self.n_labelled,
                cm=side["cm"],
                loss_sum=side["loss_sum"],
                abs_err_sum=side["abs_err_sum"],
                sq_err_sum=side["sq_err_sum"],
                y_m2=self.y_m2,
                pos=hist.pos if hist is not None else None,
                neg=hist.neg if hist is not None else None,
                river=side["river"],
            )
            out[m] = _side_values(self._specs, st, side["latency"])
        out["pair"] = self._pair_stats()
        return out

    def _pair_stats(self) -> dict[str, float]:
        return _pair_stats(
            self.task,
            self.n_pairs,
            self.n_agree,
            self.n_score_pairs,
            self.sum_abs_score_diff,
            self.n_labelled,
            self.b01,
            self.b10,
            self._side["a"]["loss_sum"],
            self._side["b"]["loss_sum"],
        )


def _side_values(specs: Iterable[MetricSpec], st: LiveStats, lat: Any) -> dict[str, float]:
    """One model's snapshot: its metrics, mean loss and latency quantiles."""
    vals = _metric_values(specs, st)
    vals["mean_loss"] = st.loss_sum / st.n if st.n else _NAN
    vals["latency_p50_ms"] = lat.quantile(0.5)
    vals["latency_p95_ms"] = lat.quantile(0.95)
    return vals


def _pair_stats(
    task: str,
    n_pairs: int,
    n_agree: int,
    n_score_pairs: int,
    sum_abs: float,
    n_lab: int,
    b01: int,
    b10: int,
    loss_a: float,
    loss_b: float,
) -> dict[str, float]:
    out = {
        "n": float(n_pairs),  # the row count the snapshot sink records
        "n_pairs": float(n_pairs),
        "n_labelled": float(n_lab),
        "mean_abs_score_diff": sum_abs / n_score_pairs if n_score_pairs else _NAN,
        # mean(loss_a - loss_b): positive means B has the lower loss
        "mean_loss_diff": (loss_a - loss_b) / n_lab if n_lab else _NAN,
    }
    if task_spec(task).classes:
        agree = n_agree / n_pairs if n_pairs else _NAN
        out.update(
            agreement=agree,
            flip_rate=1.0 - agree,  # share of requests whose predicted class changes
            b01=float(b01),
            b10=float(b10),
            positive_flip_rate=b01 / n_lab if n_lab else _NAN,  # A wrong -> B right
            negative_flip_rate=b10 / n_lab if n_lab else _NAN,  # A right -> B wrong
        )
    return out
