"""A against B within segments of the traffic, with Benjamini-Hochberg over all the tests.

An overall "B better" can hide a part of the traffic where B is worse: a country, a
device, a band of amounts. ``dag.compare(segments=[...])`` makes every pair row record
the request's value of each declared segment (``pairs.segments``: a payload field, or a
bucketed feature ``{name: fn(payload)}``, see :func:`segment_values`), and
:func:`segment_report` compares A and B within each value of each segment:

* per metric: A, B, B - A and the paired bootstrap interval
  (:func:`abdag.comparators.statistics.paired_bootstrap_metric_diff`, percentile), and a
  two-sided p-value for "B differs from A" from the paired test :data:`TESTS` names for
  that metric: McNemar for accuracy (and for recall, on the rows whose label is 1), a
  paired t-test on the per-request loss for the metrics that are means of one (log loss,
  MAE; RMSE and R² through the squared error), and otherwise (ROC AUC, PR AUC,
  precision, F1, macro F1) a Wald test with the paired bootstrap's standard error;
* values with fewer than :data:`MIN_LABELLED` labelled pairs are listed as too few and
  not tested;
* :func:`benjamini_hochberg` turns every p-value of every (segment value, metric) pair,
  and of every challenger of a group (:func:`adjust`), into a q-value; a metric where
  ``q < alpha`` and B is on the wrong side is a segment where B is significantly worse,
  which the report calls out when its verdict says B better or not worse.

docs/statistics.md, "Segments", says why these tests and why BH rather than Bonferroni.

>>> benjamini_hochberg([0.01, 0.04, 0.03, 0.5]).round(4).tolist()
[0.04, 0.0533, 0.0533, 0.5]
>>> segment_values((("country", None), ("big", lambda p: p["amount"] > 100)),
...                {"country": "FR", "amount": 250.0})
{'country': 'FR', 'big': 'True'}
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps

from abdag.comparators.metric_specs import METRICS
from abdag.comparators.statistics import mcnemar_from_counts, paired_bootstrap_metric_diff

__all__ = [
    "FAVOURS_B",
    "MAX_LISTED",
    "MIN_LABELLED",
    "MISSING",
    "TESTS",
    "VALUE_MAX",
    "MetricTest",
    "SegmentReport",
    "SegmentValue",
    "adjust",
    "benjamini_hochberg",
    "metric_test",
    "segment_report",
    "segment_values",
]

MIN_LABELLED = 30
"""A segment value with fewer labelled pairs is listed as too few and not tested: below
it the t and Wald tests' normal approximations and the bootstrap's percentiles are not to
be trusted (docs/statistics.md, "Segments")."""

MISSING = ""
"""The value of a segment whose payload field is absent or null (shown as ``(missing)``)."""

VALUE_MAX = 256
"""A segment value is cut to this many characters (a segment is a category, not a text)."""

MAX_LISTED = 100
"""At most this many untested values are listed in JSON (``too_few_count`` says how many)."""

FAVOURS_B = ("B better", "B not worse")
"""Verdicts under which a segment where B is significantly worse is called out."""

TESTS: dict[str, str] = {
    "accuracy": "McNemar",
    "micro_f1": "McNemar",
    "recall": "McNemar on label 1",
    "log_loss": "paired t on the loss",
    "mae": "paired t on the loss",
    "rmse": "paired t on squared error",
    "r2": "paired t on squared error",
}
"""The paired test behind each metric's p-value; a metric not listed (ROC AUC, PR AUC,
precision, F1, macro F1) gets :data:`BOOTSTRAP_Z`."""

BOOTSTRAP_Z = "bootstrap z"


# ---------------------------------------------------------------- segment values
def segment_values(
    specs: Sequence[tuple[str, Callable[[Any], Any] | None]],
    payload: Any,
    on_error: Callable[[str, BaseException], None] | None = None,
) -> dict[str, str]:
    """One request's value of each segment (``Comparison.segment_specs()``): ``str`` of
    the payload field, or of what the bucket function returned; :data:`MISSING` for an
    absent or null field, a function that returned None, or one that raised (``on_error``
    is told). Never raises; values are cut to :data:`VALUE_MAX` characters."""
    get = payload.get if isinstance(payload, dict) else None
    out: dict[str, str] = {}
    for name, fn in specs:
        try:
            v = (get(name) if get is not None else None) if fn is None else fn(payload)
            out[name] = MISSING if v is None else (v if isinstance(v, str) else str(v))[:VALUE_MAX]
        except Exception as exc:  # noqa: BLE001 - a user's bucket function
            if on_error is not None:
                on_error(name, exc)
            out[name] = MISSING
    return out


# ------------------------------------------------------------ Benjamini-Hochberg
def benjamini_hochberg(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values (adjusted p-values), in the order given: the smallest
    ``m / j * p_(j)`` over ranks ``j >= rank(i)``, at most 1. The same arithmetic as
    statsmodels' ``multipletests(p, method="fdr_bh")[1]`` (``p_(j) / (j / m)``), so the
    values are equal to the last bit; rejecting ``q <= alpha`` is BH's step-up rule."""
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    if m == 0:
        return p.copy()
    order = np.argsort(p)
    raw = p[order] / (np.arange(1, m + 1) / float(m))
    ranked = np.minimum.accumulate(raw[::-1])[::-1]
    ranked[ranked > 1] = 1
    q = np.empty_like(ranked)
    q[order] = ranked
    return q


# ------------------------------------------------------------------ one metric
@dataclass
class MetricTest:
    """One metric in one segment value: A, B, ``diff`` = B - A with its bootstrap interval,
    the paired test's two-sided ``pvalue`` (None: not testable here, ``note`` says why),
    its BH ``qvalue``, ``significant`` (q < alpha) and ``b_worse`` (significant, with B on
    the wrong side of A)."""

    metric: str
    a: float
    b: float
    diff: float
    ci_low: float
    ci_high: float
    test: str
    pvalue: float | None
    qvalue: float | None = None
    significant: bool = False
    b_worse: bool = False
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["higher_is_better"] = METRICS[self.metric].higher_is_better
        return d


def _mcnemar_p(y: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> float:
    b01 = int(((pa != y) & (pb == y)).sum())
    b10 = int(((pa == y) & (pb != y)).sum())
    return mcnemar_from_counts(b01, b10).pvalue


def _paired_t_p(d: np.ndarray) -> float | None:
    """Two-sided one-sample t-test of mean(d) = 0 (scipy's ``ttest_1samp``)."""
    d = np.asarray(d, dtype=float)
    if len(d) < 2 or not np.all(np.isfinite(d)):
        return None
    if np.all(d == d[0]):  # no spread: equal (p 1) or every request differs the same way
        return 1.0 if d[0] == 0 else 0.0
    return float(sps.ttest_1samp(d, 0.0).pvalue)


def _bootstrap_z_p(estimate: float, se: float) -> float | None:
    """Wald test of metric(B) - metric(A) = 0 with the paired bootstrap's standard error
    (``Interval.se``): ``2 * (1 - Phi(|estimate| / se))``."""
    if not math.isfinite(se):
        return None
    if se == 0:
        return 1.0 if estimate == 0 else 0.0
    return float(2 * sps.norm.sf(abs(estimate) / se))


def metric_test(
    name: str,
    y: np.ndarray,
    sa: np.ndarray,
    sb: np.ndarray,
    pa: np.ndarray,
    pb: np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> MetricTest:
    """A and B on one segment value's labelled rows (``ROW_COLUMNS``: label ``y``, scores,
    classes) for metric ``name``, with the interval and the p-value of :data:`TESTS`."""
    spec = METRICS[name]
    xa, xb = (sa, sb) if spec.reads == "score" else (pa, pb)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = float(spec.offline(y, xa)), float(spec.offline(y, xb))
    iv = paired_bootstrap_metric_diff(
        name,
        y,
        xa,
        xb,
        n_resamples=n_resamples,
        confidence=confidence,
        seed=seed,
        method="percentile",
    )
    test = TESTS.get(name, BOOTSTRAP_Z)
    diff = b - a
    note = ""
    p: float | None
    if not math.isfinite(diff):
        p, note = None, "no value here (one class only?)"
    elif name in ("accuracy", "micro_f1"):
        p = _mcnemar_p(y, pa, pb)
    elif name == "recall":
        pos = y == 1
        p = _mcnemar_p(y[pos], pa[pos], pb[pos]) if pos.any() else None
        note = "" if pos.any() else "no label 1 here"
    elif name in ("log_loss", "mae"):
        p = _paired_t_p(spec.per_row(y, xb) - spec.per_row(y, xa))
    elif name in ("rmse", "r2"):
        p = _paired_t_p((xb - y) ** 2 - (xa - y) ** 2)
    else:
        p = _bootstrap_z_p(diff, iv.se)
        note = "" if p is not None else "too few resamples with a value"
    return MetricTest(name, a, b, diff, iv.low, iv.high, test, p, note=note)


# ----------------------------------------------------------------- the report
@dataclass
class SegmentValue:
    """One value of one segment: its labelled pairs ``n`` and, unless ``too_few``, a
    :class:`MetricTest` per metric."""

    segment: str
    value: str
    n: int
    too_few: bool = False
    metrics: list[MetricTest] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.segment}={self.value if self.value != MISSING else '(missing)'}"

    def worse(self) -> list[str]:
        """The metrics where B is significantly worse here."""
        return [m.metric for m in self.metrics if m.b_worse]

    def to_dict(self) -> dict[str, Any]:
        return {
            "segment": self.segment,
            "value": self.value,
            "n": self.n,
            "status": "too few labelled pairs" if self.too_few else "tested",
            "metrics": {m.metric: m.to_dict() for m in self.metrics},
        }


@dataclass
class SegmentReport:
    """Every segment value of one experiment (:func:`segment_report`), once adjusted.

    ``scope``: what Benjamini-Hochberg ran over (``experiment``, or the group of
    challengers) and ``n_tests`` how many p-values that was; ``verdict``: the overall
    statistical verdict, against which :meth:`hidden` calls out the segments where B is
    significantly worse. ``note``: why there is nothing (no segments declared, ...)."""

    experiment: str
    segments: list[str]
    values: list[SegmentValue]
    alpha: float = 0.05
    min_labelled: int = MIN_LABELLED
    confidence: float = 0.95
    verdict: str = ""
    scope: str = "experiment"
    n_tests: int = 0
    note: str = ""

    def tested(self) -> list[SegmentValue]:
        return [v for v in self.values if not v.too_few]

    def too_few(self) -> list[SegmentValue]:
        return [v for v in self.values if v.too_few]

    def worse(self) -> list[SegmentValue]:
        """Segment values where B is significantly worse on at least one metric."""
        return [v for v in self.values if v.worse()]

    def hidden(self) -> list[SegmentValue]:
        """:meth:`worse`, when the overall verdict says B better or not worse."""
        return self.worse() if self.verdict in FAVOURS_B else []

    def to_dict(self) -> dict[str, Any]:
        def brief(v: SegmentValue) -> dict[str, Any]:
            return {"segment": v.segment, "value": v.value, "n": v.n, "metrics": v.worse()}

        few = self.too_few()
        return {
            "segments": self.segments,
            "alpha": self.alpha,
            "min_labelled": self.min_labelled,
            "confidence": self.confidence,
            "scope": self.scope,
            "n_tests": self.n_tests,
            "verdict": self.verdict,
            "note": self.note,
            "values": [v.to_dict() for v in self.tested()],
            "too_few": [
                {"segment": v.segment, "value": v.value, "n": v.n} for v in few[:MAX_LISTED]
            ],
            "too_few_count": len(few),
            "b_worse": [brief(v) for v in self.worse()],
            "b_worse_despite_verdict": [brief(v) for v in self.hidden()],
        }

    def render(self, max_too_few: int = 10) -> list[str]:
        """Text lines for ``abdag report``."""
        head = "  Segments"
        if not self.values:
            return [f"{head}: {self.note or 'no segment values yet'}"]
        lines = [
            f"{head} ({', '.join(self.segments)}): A and B within each value; p: the paired "
            "test of each metric, q: Benjamini-Hochberg over "
            f"{self.n_tests} tests ({self.scope}), B worse where q < {self.alpha:g}",
        ]
        tested = self.tested()
        if tested:
            level = f"{self.confidence:.0%} CI"
            cols = f"{'segment':<22} {'n':>6}  {'metric':<9} {'A':>8} {'B':>8} {'B - A':>8}"
            table = f"  {cols}  {level:<20} {'p':>9} {'q':>9}"
            lines += [table, "  " + "-" * (len(table) - 2)]
            for v in tested:
                for i, m in enumerate(v.metrics):
                    who = f"{v.label[:22]:<22} {v.n:>6}" if i == 0 else " " * 29
                    ci = f"[{_f(m.ci_low, True)}, {_f(m.ci_high, True)}]"
                    flag = "  B worse" if m.b_worse else ("  B better" if m.significant else "")
                    lines.append(
                        f"  {who}  {m.metric:<9} {_f(m.a):>8} {_f(m.b):>8} {_f(m.diff, True):>8}"
                        f"  {ci:<20} {_p(m.pvalue):>9} {_p(m.qvalue):>9}{flag}"
                    )
        few = self.too_few()
        if few:
            shown = ", ".join(f"{v.label} ({v.n})" for v in few[:max_too_few])
            more = f" and {len(few) - max_too_few} more" if len(few) > max_too_few else ""
            lines.append(
                f"  too few labelled pairs (< {self.min_labelled}), not tested: {shown}{more}"
            )
        for v in self.hidden():
            lines.append(
                f"  ! B is significantly worse for {v.label} ({', '.join(v.worse())}) "
                f"although the verdict is {self.verdict}"
            )
        return lines


def _f(x: float | None, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:+.4f}" if sign else f"{x:.4f}"


def _p(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.2e}" if x < 1e-3 else f"{x:.4f}"


def segment_report(
    rows: Mapping[str, np.ndarray],
    values: Mapping[str, Sequence[str] | np.ndarray],
    metrics: Sequence[str],
    *,
    experiment: str = "",
    alpha: float = 0.05,
    confidence: float | None = None,
    min_labelled: int = MIN_LABELLED,
    n_resamples: int = 1000,
    seed: int = 0,
    verdict: str = "",
) -> SegmentReport:
    """Compare A and B within each value of each segment, then adjust (BH over this
    report's tests; :func:`adjust` again over a group's reports).

    ``rows``: the labelled rows' ``y``, ``sa``, ``sb``, ``pa``, ``pb`` (the report's
    ``ROW_COLUMNS``); ``values``: segment name -> each row's value. ``confidence`` of the
    intervals: ``1 - alpha`` unless given. Values are listed per segment, the largest first.
    """
    confidence = 1 - alpha if confidence is None else confidence
    y = np.asarray(rows["y"], dtype=float)
    cols = {k: np.asarray(rows[k], dtype=float) for k in ("sa", "sb")}
    cols.update({k: np.asarray(rows[k], dtype=np.int64) for k in ("pa", "pb")})
    out: list[SegmentValue] = []
    for name, col in values.items():
        col = np.asarray(col, dtype=str)
        if len(col) != len(y):
            raise ValueError(f"segment {name!r}: {len(col)} values for {len(y)} rows")
        if not len(col):
            continue
        uniq, inverse, counts = np.unique(col, return_inverse=True, return_counts=True)
        order = np.argsort(inverse, kind="stable")  # each value's rows, in the rows' order
        groups = np.split(order, np.cumsum(counts)[:-1])
        for k in sorted(range(len(uniq)), key=lambda k: (-counts[k], str(uniq[k]))):
            idx = groups[k]
            v = SegmentValue(name, str(uniq[k]), int(counts[k]))
            if v.n < min_labelled:
                v.too_few = True
            else:
                sub = {c: x[idx] for c, x in cols.items()}
                v.metrics = [
                    metric_test(
                        m,
                        y[idx],
                        sub["sa"],
                        sub["sb"],
                        sub["pa"],
                        sub["pb"],
                        confidence=confidence,
                        n_resamples=n_resamples,
                        seed=seed,
                    )
                    for m in metrics
                ]
            out.append(v)
    report = SegmentReport(
        experiment,
        list(values),
        out,
        alpha=alpha,
        min_labelled=min_labelled,
        confidence=confidence,
        verdict=verdict,
    )
    adjust([report], alpha)
    return report


def adjust(reports: Sequence[SegmentReport], alpha: float, scope: str | None = None) -> int:
    """Benjamini-Hochberg over every p-value of every report together (a group's
    challengers: segments x metrics x challengers); sets each test's ``qvalue``,
    ``significant`` and ``b_worse`` and each report's ``alpha``, ``n_tests`` and ``scope``.
    Returns the number of p-values. Untested values and untestable metrics do not count."""
    tests = [m for r in reports for v in r.values for m in v.metrics if m.pvalue is not None]
    q = benjamini_hochberg([m.pvalue for m in tests])
    for m, qi in zip(tests, q, strict=True):
        m.qvalue = float(qi)
        m.significant = bool(qi < alpha)
        hib = METRICS[m.metric].higher_is_better
        m.b_worse = m.significant and (m.diff < 0 if hib else m.diff > 0)
    for r in reports:
        r.alpha, r.n_tests = alpha, len(tests)
        if scope is not None:
            r.scope = scope
    return len(tests)
