"""Every metric, defined once: its live, offline and SQL values and which way is better.

One small class per metric (after river's ``river/metrics/base.py``), registered in
:data:`METRICS`. A metric says:

* ``name``, ``label`` (for people), ``tasks``, ``higher_is_better``, and ``reads``: whether
  it reads the predicted class (``'pred'``) or the score (``'score'``: P(class 1) for
  binary, the predicted value for regression);
* :meth:`MetricSpec.offline` ``(y, x)``: the exact value in numpy, vectorised over the last
  axis. The report's paired bootstrap resamples it, and it is the oracle the other faces
  are tested against;
* :meth:`MetricSpec.cumulative` ``(y, x, ends)``: the value over each prefix ``[:k]``, for
  the dashboard's curves (from ``offline`` unless the class knows an incremental form);
* ``sql``: one ClickHouse aggregate over the labelled rows' columns ``y``, ``s{m}`` (score)
  and ``p{m}`` (class) of model ``{m}`` (``a`` or ``b``), see
  :func:`abdag.comparators.report.metrics_sql`: the number the report (CLI and page) shows;
* :meth:`MetricSpec.live` ``(stats)``: the value from the mergeable statistics that
  :class:`abdag.comparators.metrics.PairMetrics` keeps per model (:class:`LiveStats`): the shared
  river confusion matrix, loss and error sums, label moments, a score histogram. A metric
  costs nothing per pair beyond the statistic it names in ``live_state``.

Adding a metric: a class here, listed in ``METRICS``, and its scikit-learn reference in
``tests/test_metric_oracle.py`` (which checks live == SQL == offline == scikit-learn for
every metric and task). Live snapshots, the report's value and interval, the dashboard's
curves and ``DEFAULT_METRICS`` follow from the registry.

>>> DEFAULT_METRICS["regression"]
('mae', 'rmse', 'r2')
>>> m = METRICS["recall"]
>>> m.tasks, m.higher_is_better, m.reads
(('binary',), True, 'pred')
>>> float(m.offline(np.array([1, 1, 0]), np.array([1, 0, 0])))
0.5
>>> m.sql.format(m="a")
'ifNull(countIf(pa = 1 AND y = 1) / nullIf(countIf(y = 1), 0), 0)'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from abdag.comparators.tasks import EPS, TASKS, task_spec

__all__ = [
    "AVAILABLE_METRICS",
    "DEFAULT_METRICS",
    "EPS",
    "HIGHER_IS_BETTER",
    "METRICS",
    "LiveStats",
    "MetricSpec",
    "average_precision",
    "cumulative_curves",
    "hist_auc_bound",
    "hist_average_precision",
    "hist_roc_auc",
    "roc_auc",
    "specs_for",
]

_NAN = float("nan")


# --------------------------------------------------------------- live statistics
@dataclass
class LiveStats:
    """What a live value may read: one model's mergeable statistics in one PairMetrics.

    ``n`` labelled pairs; ``cm`` the river ``ConfusionMatrix`` every class metric shares
    (classification); ``loss_sum`` the task's per-request loss summed (binary log loss,
    0/1 loss, squared error); ``abs_err_sum`` / ``sq_err_sum`` (regression);
    ``y_m2`` the sum of squared label deviations (regression, shared by A and B);
    ``pos`` / ``neg`` the score histogram per label (binary, when an AUC is kept);
    ``river`` the per-pair river metrics of ``live_state = 'river'`` metrics.
    """

    n: int
    cm: Any = None
    loss_sum: float = 0.0
    abs_err_sum: float = 0.0
    sq_err_sum: float = 0.0
    y_m2: float = 0.0
    pos: np.ndarray | None = None
    neg: np.ndarray | None = None
    river: dict[str, Any] = field(default_factory=dict)


def _river_on_cm(cls_name: str, cm: Any) -> float:
    # river is imported at the first live read: the report and the DAG API never need it
    from river import metrics as rm

    return float(getattr(rm, cls_name)(cm=cm).get())


# ------------------------------------------------------------------ base classes
class MetricSpec:
    """One metric: its faces (see the module doc). Subclasses set the class attributes.

    ``live_state``: ``'cm'`` (confusion matrix), ``'sums'``, ``'hist'`` (score histogram,
    kept only when such a metric is asked for) or ``'river'`` (a river metric updated per
    pair, not mergeable). ``live_abs_tol``: 0 when the live value is exact, else how far
    it may be from the offline one (a binned approximation). ``live_only``: no offline or
    SQL value (reported live, never in the report). ``default``: in ``DEFAULT_METRICS``;
    ``curve``: drawn over time by the dashboard.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]]
    higher_is_better: ClassVar[bool] = True
    reads: ClassVar[str] = "pred"
    sql: ClassVar[str | None] = None
    live_state: ClassVar[str] = "cm"
    live_abs_tol: ClassVar[float] = 0.0
    live_only: ClassVar[bool] = False
    default: ClassVar[bool] = True
    curve: ClassVar[bool] = True

    def offline(self, y: np.ndarray, x: np.ndarray) -> Any:
        """Exact value of ``x`` (classes or scores, see ``reads``) against labels ``y``."""
        raise NotImplementedError(f"{self.name} has no offline value")

    def live(self, s: LiveStats) -> float:
        """Value from the live statistics (called only when ``s.n > 0``)."""
        raise NotImplementedError

    def live_values(self, s: LiveStats) -> dict[str, float]:
        """What a snapshot shows for this metric (NaN before any labelled pair)."""
        return {self.name: float(self.live(s)) if s.n else _NAN}

    def new_river(self, *, roc_thresholds: int = 100) -> Any:
        """The river metric updated per pair (``live_state = 'river'`` only)."""
        raise NotImplementedError

    def cumulative(self, y: np.ndarray, x: np.ndarray, ends: Sequence[int]) -> np.ndarray:
        """``offline(y[:k], x[:k])`` for each ``k`` in ``ends`` (NaN for ``k = 0``)."""
        y, x = np.asarray(y), np.asarray(x)
        out = np.full(len(ends), _NAN)
        seen: dict[int, float] = {}
        for i, k in enumerate(int(k) for k in ends):
            if k:
                if k not in seen:
                    seen[k] = float(self.offline(y[:k], x[:k]))
                out[i] = seen[k]
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _RowMean(MetricSpec):
    """``finish(mean of per_row(y, x))``: offline value and curves from one definition."""

    def per_row(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def finish(self, mean: Any) -> Any:
        return mean

    def offline(self, y: np.ndarray, x: np.ndarray) -> Any:
        return self.finish(self.per_row(y, x).mean(-1))

    def cumulative(self, y: np.ndarray, x: np.ndarray, ends: Sequence[int]) -> np.ndarray:
        k = np.asarray(ends, dtype=np.int64)
        c = np.concatenate(([0.0], np.cumsum(self.per_row(y, x), dtype=float)))
        return np.where(k > 0, self.finish(c[k] / np.maximum(k, 1)), _NAN)


def _ratio(num: Any, den: Any) -> np.ndarray:
    # scikit-learn's zero_division default: 0 where the denominator is 0
    num = np.asarray(num, dtype=float)
    return np.divide(num, den, out=np.zeros(np.shape(num)), where=np.asarray(den) > 0)


class _CountRatio(MetricSpec):
    """``sum(num) / sum(den)`` of per-row counts, 0 when the denominator is 0."""

    def counts(self, y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def offline(self, y: np.ndarray, x: np.ndarray) -> Any:
        num, den = self.counts(np.asarray(y), np.asarray(x))
        return _ratio(num.sum(-1), den.sum(-1))

    def cumulative(self, y: np.ndarray, x: np.ndarray, ends: Sequence[int]) -> np.ndarray:
        k = np.asarray(ends, dtype=np.int64)
        num, den = self.counts(np.asarray(y), np.asarray(x))
        cn = np.concatenate(([0], np.cumsum(num)))[k]
        cd = np.concatenate(([0], np.cumsum(den)))[k]
        return np.where(k > 0, _ratio(cn, cd), _NAN)


def _tp_pp_ap(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: true positive, predicted positive, actual positive (class 1)."""
    y1, p1 = y == 1, p == 1
    return (y1 & p1).astype(np.int64), p1.astype(np.int64), y1.astype(np.int64)


# ---------------------------------------------------------------- the metrics
class Accuracy(_RowMean):
    name, label = "accuracy", "Accuracy"
    tasks = ("binary", "multiclass")
    sql = "avg(p{m} = y)"

    def per_row(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.asarray(x) == np.asarray(y)

    def live(self, s: LiveStats) -> float:
        return _river_on_cm("Accuracy", s.cm)


class Precision(_CountRatio):
    name, label = "precision", "Precision"
    tasks = ("binary",)
    sql = "ifNull(countIf(p{m} = 1 AND y = 1) / nullIf(countIf(p{m} = 1), 0), 0)"

    def counts(self, y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tp, pp, _ = _tp_pp_ap(y, p)
        return tp, pp

    def live(self, s: LiveStats) -> float:
        return _river_on_cm("Precision", s.cm)


class Recall(_CountRatio):
    name, label = "recall", "Recall"
    tasks = ("binary",)
    sql = "ifNull(countIf(p{m} = 1 AND y = 1) / nullIf(countIf(y = 1), 0), 0)"

    def counts(self, y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tp, _, ap = _tp_pp_ap(y, p)
        return tp, ap

    def live(self, s: LiveStats) -> float:
        return _river_on_cm("Recall", s.cm)


class F1(_CountRatio):
    name, label = "f1", "F1"
    tasks = ("binary",)
    # 2 tp / (2 tp + fp + fn), and 2 tp + fp + fn = predicted positives + actual positives
    sql = (
        "ifNull(2 * countIf(p{m} = 1 AND y = 1) / nullIf(countIf(p{m} = 1) + countIf(y = 1), 0), 0)"
    )

    def counts(self, y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tp, pp, ap = _tp_pp_ap(y, p)
        return 2 * tp, pp + ap

    def live(self, s: LiveStats) -> float:
        return _river_on_cm("F1", s.cm)


class MacroF1(MetricSpec):
    """Mean F1 over the classes present in the labels or the predictions (scikit-learn)."""

    name, label = "macro_f1", "Macro F1"
    tasks = ("multiclass",)
    # per class (sumMap keys): predicted count (.2), actual count (.3), true positives (.4)
    sql = (
        "arrayAvg((tp, pr, ac) -> 2 * tp / (pr + ac), "
        "(sumMap([p{m}, y], [1, 0], [0, 1], [toUInt8(p{m} = y), 0]) AS f1_classes_{m}).4, "
        "f1_classes_{m}.2, f1_classes_{m}.3)"
    )

    def offline(self, y: np.ndarray, x: np.ndarray) -> Any:
        y, p = np.asarray(y), np.asarray(x)
        total = np.zeros(np.shape(y)[:-1])
        count = np.zeros(np.shape(y)[:-1])
        for c in np.union1d(np.unique(y), np.unique(p)):
            yc, pc = y == c, p == c
            den = yc.sum(-1) + pc.sum(-1)
            total += _ratio(2 * (yc & pc).sum(-1), den)
            count += den > 0  # only classes present in y or pred (of this resample)
        return _ratio(total, count)

    def live(self, s: LiveStats) -> float:
        return _river_on_cm("MacroF1", s.cm)


class MicroF1(Accuracy):
    """Single-label micro F1, which equals accuracy; listed for those who look for it."""

    name, label = "micro_f1", "Micro F1"
    tasks = ("multiclass",)

    def live(self, s: LiveStats) -> float:
        return _river_on_cm("MicroF1", s.cm)


class RocAuc(MetricSpec):
    """ROC AUC. Offline and SQL exact (ties count one half); live from a fixed-bin score
    histogram, within ``roc_auc_err_bound`` (shown alongside) of the exact value."""

    name, label = "roc_auc", "ROC AUC"
    tasks = ("binary",)
    reads = "score"
    sql = "arrayROCAUC(groupArray(s{m}), groupArray(y))"
    live_state = "hist"
    live_abs_tol = 1e-3  # the bound with 1000 bins on spread scores; the snapshot has it

    def offline(self, y: np.ndarray, x: np.ndarray) -> Any:
        return roc_auc(y, x)

    def live_values(self, s: LiveStats) -> dict[str, float]:
        return {
            "roc_auc": hist_roc_auc(s.pos, s.neg),
            "roc_auc_err_bound": hist_auc_bound(s.pos, s.neg),
        }

    def cumulative(self, y: np.ndarray, x: np.ndarray, ends: Sequence[int]) -> np.ndarray:
        """Adds, prefix by prefix, the Mann-Whitney U of every pair that involves a new row,
        instead of ranking every prefix again."""
        is_pos = np.asarray(y) == 1
        s = np.asarray(x, dtype=float)
        pos, neg = np.empty(0), np.empty(0)
        u, start = 0.0, 0
        out = np.full(len(ends), _NAN)
        for i, k in enumerate(int(k) for k in ends):
            new_pos = np.sort(s[start:k][is_pos[start:k]])
            new_neg = np.sort(s[start:k][~is_pos[start:k]])
            start = max(start, k)
            neg = np.sort(np.concatenate([neg, new_neg]), kind="mergesort")
            lo = np.searchsorted(neg, new_pos, "left")
            hi = np.searchsorted(neg, new_pos, "right")
            u += float(lo.sum() + 0.5 * (hi - lo).sum())  # new positives, all negatives
            lo = np.searchsorted(pos, new_neg, "left")
            hi = np.searchsorted(pos, new_neg, "right")
            u += float((len(pos) - hi).sum() + 0.5 * (hi - lo).sum())  # new negatives, old pos
            pos = np.sort(np.concatenate([pos, new_pos]), kind="mergesort")
            if len(pos) and len(neg):
                out[i] = u / (len(pos) * len(neg))
        return out


class PrAuc(MetricSpec):
    """Average precision (scikit-learn's step-wise PR AUC); live from the score histogram."""

    name, label = "pr_auc", "PR AUC"
    tasks = ("binary",)
    reads = "score"
    sql = "arrayAUCPR(groupArray(s{m}), groupArray(y))"
    live_state = "hist"
    live_abs_tol = 5e-3
    curve = False  # a sort of every prefix per bucket: left off the dashboard's curves

    def offline(self, y: np.ndarray, x: np.ndarray) -> Any:
        return average_precision(y, x)

    def live(self, s: LiveStats) -> float:
        return hist_average_precision(s.pos, s.neg)


class LogLoss(_RowMean):
    name, label = "log_loss", "Log loss"
    tasks = ("binary",)
    higher_is_better = False
    reads = "score"
    _c = f"least(greatest(s{{m}}, {EPS}), 1 - {EPS})"
    sql = f"-avg(if(y = 1, log({_c}), log(1 - {_c})))"
    live_state = "sums"

    def per_row(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=float)
        c = np.clip(np.asarray(x, dtype=float), EPS, 1 - EPS)
        return -(y * np.log(c) + (1 - y) * np.log1p(-c))

    def live(self, s: LiveStats) -> float:
        return s.loss_sum / s.n  # binary: the loss summed per request is the log loss


class RocAucRiver(MetricSpec):
    """river's ``ROCAUC`` (opt-in, live only): an approximation over ``n_thresholds``
    that cannot be merged, about 35 us per update at 100 thresholds."""

    name, label = "roc_auc_river", "ROC AUC (river)"
    tasks = ("binary",)
    reads = "score"
    live_state = "river"
    live_abs_tol = 0.02
    live_only = True
    default = False
    curve = False

    def new_river(self, *, roc_thresholds: int = 100) -> Any:
        from river import metrics as rm

        return rm.ROCAUC(n_thresholds=roc_thresholds)

    def live(self, s: LiveStats) -> float:
        return float(s.river[self.name].get())


class Mae(_RowMean):
    name, label = "mae", "MAE"
    tasks = ("regression",)
    higher_is_better = False
    reads = "score"
    sql = "avg(abs(s{m} - y))"
    live_state = "sums"

    def per_row(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.abs(np.asarray(x, dtype=float) - np.asarray(y, dtype=float))

    def live(self, s: LiveStats) -> float:
        return s.abs_err_sum / s.n


class Rmse(_RowMean):
    name, label = "rmse", "RMSE"
    tasks = ("regression",)
    higher_is_better = False
    reads = "score"
    sql = "sqrt(avg((s{m} - y) * (s{m} - y)))"
    live_state = "sums"

    def per_row(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=float) - np.asarray(y, dtype=float)) ** 2

    def finish(self, mean: Any) -> Any:
        return np.sqrt(mean)

    def live(self, s: LiveStats) -> float:
        return math.sqrt(s.sq_err_sum / s.n)


class R2(MetricSpec):
    """Coefficient of determination; NaN when the labels do not vary."""

    name, label = "r2", "R²"
    tasks = ("regression",)
    reads = "score"
    sql = "1 - sum((s{m} - y) * (s{m} - y)) / nullIf(varPopStable(y) * count(), 0)"
    live_state = "sums"

    def offline(self, y: np.ndarray, x: np.ndarray) -> Any:
        y = np.asarray(y, dtype=float)
        sse = ((np.asarray(x, dtype=float) - y) ** 2).sum(-1)
        sst = ((y - y.mean(-1, keepdims=True)) ** 2).sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(sst > 0, 1.0 - sse / sst, np.nan)

    def live(self, s: LiveStats) -> float:
        return 1.0 - s.sq_err_sum / s.y_m2 if s.n > 1 and s.y_m2 > 0 else _NAN


# ------------------------------------------------------------------- registry
METRICS: dict[str, MetricSpec] = {
    m.name: m
    for m in (
        Accuracy(),
        Precision(),
        Recall(),
        F1(),
        MacroF1(),
        MicroF1(),
        RocAuc(),
        PrAuc(),
        LogLoss(),
        RocAucRiver(),
        Mae(),
        Rmse(),
        R2(),
    )
}
"""Every metric by name, in the order reports and snapshots list them."""

AVAILABLE_METRICS: dict[str, tuple[str, ...]] = {
    t: tuple(k for k, m in METRICS.items() if t in m.tasks) for t in TASKS
}
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    t: tuple(k for k, m in METRICS.items() if t in m.tasks and m.default) for t in TASKS
}
HIGHER_IS_BETTER: dict[str, bool] = {k: m.higher_is_better for k, m in METRICS.items()}


def specs_for(task: str, names: Sequence[str] | None = None) -> tuple[MetricSpec, ...]:
    """The specs of ``names`` (the task's defaults when None); unknown names raise.

    >>> [m.name for m in specs_for("multiclass")]
    ['accuracy', 'macro_f1', 'micro_f1']
    """
    task_spec(task)  # an unknown task raises, naming the known ones
    names = DEFAULT_METRICS[task] if names is None else tuple(names)
    unknown = [k for k in names if k not in AVAILABLE_METRICS[task]]
    if unknown:
        raise ValueError(
            f"unknown {task} metrics {sorted(unknown)}; known: {list(AVAILABLE_METRICS[task])}"
        )
    return tuple(METRICS[k] for k in names)


def cumulative_curves(
    names: Sequence[str], rows: Mapping[str, np.ndarray], t: np.ndarray, buckets: Sequence[int]
) -> dict[str, np.ndarray]:
    """``<name>_a`` / ``<name>_b`` over the rows with ``t <= bucket``, for each bucket.

    ``rows``: the report's row columns ``y``, ``sa``, ``sb``, ``pa``, ``pb`` (see
    :data:`abdag.comparators.report.ROWS_SQL`), ``t`` each row's bucket; ``buckets`` ascending.
    """
    order = np.argsort(np.asarray(t), kind="stable")
    ends = np.searchsorted(np.asarray(t)[order], np.asarray(buckets), side="right")
    y = np.asarray(rows["y"])[order]
    out: dict[str, np.ndarray] = {}
    for name in names:
        spec = METRICS[name]
        for m in ("a", "b"):
            x = np.asarray(rows[f"s{m}" if spec.reads == "score" else f"p{m}"])[order]
            out[f"{name}_{m}"] = spec.cumulative(y, x, ends)
    return out


# ------------------------------------------- exact AUCs, vectorised over resamples
def roc_auc(y: np.ndarray, score: np.ndarray, axis: int = -1) -> np.ndarray | float:
    """Exact ROC AUC from ranks (Mann-Whitney U, ties count one half); NaN with one class.

    >>> roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    """
    from scipy.stats import rankdata  # scipy only where an exact AUC is computed

    y = np.moveaxis(np.asarray(y), axis, -1).astype(bool)
    s = np.moveaxis(np.asarray(score, dtype=float), axis, -1)
    r = rankdata(s, axis=-1)
    npos = y.sum(-1)
    nneg = y.shape[-1] - npos
    u = (r * y).sum(-1) - npos * (npos + 1) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        out = u / (npos * nneg)
    out = np.where((npos > 0) & (nneg > 0), out, np.nan)
    return float(out) if out.ndim == 0 else out


def average_precision(y: np.ndarray, score: np.ndarray, axis: int = -1) -> np.ndarray | float:
    """Average precision, scikit-learn's definition (step-wise, no interpolation):
    ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds. ClickHouse's ``arrayAUCPR``
    gives the same value.

    >>> average_precision(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.8333333333333333
    """
    y = np.moveaxis(np.asarray(y), axis, -1).astype(float)
    s = np.moveaxis(np.asarray(score, dtype=float), axis, -1)
    n = s.shape[-1]
    order = np.argsort(-s, axis=-1, kind="stable")
    ss = np.take_along_axis(s, order, -1)
    ys = np.take_along_axis(y, order, -1)
    prec = np.cumsum(ys, -1) / np.arange(1, n + 1)
    end = np.ones(ss.shape, dtype=bool)  # last element of each group of tied scores
    end[..., :-1] = ss[..., :-1] != ss[..., 1:]
    idx = np.where(end, np.arange(n), n)
    idx = np.flip(np.minimum.accumulate(np.flip(idx, -1), -1), -1)
    p_at_end = np.take_along_axis(prec, idx, -1)
    npos = ys.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (ys * p_at_end).sum(-1) / npos
    out = np.where(npos > 0, out, np.nan)
    return float(out) if out.ndim == 0 else out


# --------------------------------------------- AUCs of a score histogram (live)
def hist_roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC of binned scores (a positive and a negative in one bin count as a tie)."""
    p, n = pos.sum(), neg.sum()
    if p == 0 or n == 0:
        return _NAN
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (p * n))


def hist_auc_bound(pos: np.ndarray, neg: np.ndarray) -> float:
    """Largest distance of :func:`hist_roc_auc` from the exact AUC of the unbinned scores."""
    p, n = pos.sum(), neg.sum()
    if p == 0 or n == 0:
        return _NAN
    return float((pos * neg).sum() / (2.0 * p * n))


def hist_average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    """scikit-learn's average precision of binned scores."""
    p = pos.sum()
    if p == 0:
        return _NAN
    tp = np.cumsum(pos[::-1])
    fp = np.cumsum(neg[::-1])
    seen = (tp + fp) > 0
    prec = np.divide(tp, tp + fp, out=np.zeros(len(tp)), where=seen)
    return float((pos[::-1] * prec).sum() / p)
