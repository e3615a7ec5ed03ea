"""Curves over time for the dashboard, read from deduplicated pairs (``pairs FINAL``).

:func:`timeline_payload` gives what a person watching a live test needs per bucket of
``request_ts``: the cumulative value of each of the experiment's metrics for A and B (those
the report shows that have a curve, each computed by its ``MetricSpec.cumulative`` in
:mod:`abdag.comparators.metric_specs`), latency p50/p95 per model, agreement and flips, unpaired
counts, label coverage and label delay, and the path of the always-valid confidence
sequence behind the verdict.

Counts and quantiles are computed in SQL (``BUCKETS_SQL``). Metric curves and the
confidence sequence need the labelled rows themselves (``LABELLED_ROWS_SQL``: the report's
``ROWS_SQL`` columns, rows and order, with their buckets), so that the last point of every
curve equals the number in the report.

>>> sorted(BUCKETS_SQL)
['binary', 'multiclass', 'regression']
>>> pick_bucket(0), pick_bucket(600), pick_bucket(86_400)
(5, 10, 900)
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import numpy as np

# The report's row predicates and columns are reused on purpose: the dashboard must count
# exactly the rows the report counts.
from abdag.comparators.metric_specs import METRICS, cumulative_curves
from abdag.comparators.report import (
    _LABELLED,
    _SCORABLE,
    OVERVIEW_SQL,
    PRED_SQL,
    REPORT_METRICS,
    declared_metrics,
    experiment_settings,
    group_alpha,
    rows_sql,
)
from abdag.comparators.schema import PAIRS_DEDUP
from abdag.comparators.statistics import confidence_sequence, per_request_loss
from abdag.comparators.tasks import TASK_SPECS, TASKS

__all__ = [
    "BUCKETS_SQL",
    "CURVE_METRICS",
    "LABELLED_ROWS_SQL",
    "MAX_BUCKETS",
    "NICE_BUCKETS",
    "TimelineError",
    "pick_bucket",
    "timeline_payload",
]

CURVE_METRICS: dict[str, tuple[str, ...]] = {
    t: tuple(k for k in REPORT_METRICS[t] if METRICS[k].curve) for t in TASKS
}
"""Cumulative metrics drawn for A and B when the DAG declared none, by task (each point:
all labelled pairs so far); a DAG's ``dag.compare(metrics=...)`` replaces them."""

NICE_BUCKETS = (5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)
TARGET_BUCKETS = 120
MAX_BUCKETS = 5000
"""A request for more buckets than this is refused (400): it would only draw noise."""

_EXP = "experiment = {experiment:String}"
_BUCKET = "toStartOfInterval({ts}, toIntervalSecond({{bucket_seconds:UInt32}}))"


def _buckets_sql(task: str, *, by_bucket: bool = True) -> str:
    scorable = _SCORABLE[task]
    cols = [
        "countIf(status = 'paired') AS paired",
        "countIf(status = 'missing_a') AS missing_a",
        "countIf(status = 'missing_b') AS missing_b",
        "countIf(lab) AS labelled",
        "countIf(cmp) AS compared",
        # Nullable arguments: NULL (no value) when no row of the bucket has one
        "quantileExactInclusive(0.5)(latency_a_ms) AS latency_p50_a",
        "quantileExactInclusive(0.95)(latency_a_ms) AS latency_p95_a",
        "quantileExactInclusive(0.5)(latency_b_ms) AS latency_p50_b",
        "quantileExactInclusive(0.95)(latency_b_ms) AS latency_p95_b",
        "quantileExactInclusive(0.5)(delay_s) AS label_delay_p50_s",
        "quantileExactInclusive(0.9)(delay_s) AS label_delay_p90_s",
        "quantileExactInclusive(0.99)(delay_s) AS label_delay_p99_s",
    ]
    derived = [
        f"{_LABELLED} AND {scorable} AS lab",
        f"status = 'paired' AND {scorable} AS cmp",
        "if(lab, (toUnixTimestamp64Milli(assumeNotNull(label_ts)) "
        "- toUnixTimestamp64Milli(request_ts)) / 1000.0, NULL) AS delay_s",
    ]
    if not TASK_SPECS[task].classes:
        cols.append("avgIf(abs(score_a - score_b), cmp) AS mean_abs_diff")
    else:
        derived += [
            f"{PRED_SQL[task].format(m='a')} AS pa",
            f"{PRED_SQL[task].format(m='b')} AS pb",
            "toInt64(label) AS y",
        ]
        cols += [
            "countIf(cmp AND pa = pb) AS agree",
            "countIf(lab AND pa != y AND pb = y) AS fixed",
            "countIf(lab AND pa = y AND pb != y) AS broken",
        ]
    select = ",\n    ".join(cols)
    extra = ",\n        ".join(derived)
    bucket = f"toUnixTimestamp({_BUCKET.format(ts='request_ts')})" if by_bucket else "0"
    return f"""SELECT
    {bucket} AS t,
    {select}
FROM (
    SELECT
        *,
        {extra}
    FROM {PAIRS_DEDUP}
    WHERE {_EXP}
)
GROUP BY t
ORDER BY t"""


BUCKETS_SQL: dict[str, str] = {t: _buckets_sql(t) for t in TASKS}
"""Per bucket of ``request_ts`` (not cumulative): counts, latency and label-delay quantiles."""

SUMMARY_SQL: dict[str, str] = {t: _buckets_sql(t, by_bucket=False) for t in TASKS}
"""The same figures over the whole experiment (one row), for the page's headline numbers."""


LABELLED_ROWS_SQL: dict[str, str] = {
    t: rows_sql(
        t,
        f"toUnixTimestamp({_BUCKET.format(ts='request_ts')}) AS t_request",
        f"toUnixTimestamp({_BUCKET.format(ts='coalesce(label_ts, paired_ts)')}) AS t_label",
    )
    for t in TASKS
}
"""The report's labelled rows, in its order (label arrival), with their buckets."""

SPAN_SQL = f"""SELECT min(request_ts) AS first, max(request_ts) AS last
FROM pairs
WHERE {_EXP}"""


class TimelineError(ValueError):
    """The request cannot be answered as asked (e.g. far too many buckets)."""


def pick_bucket(span_seconds: float) -> int:
    """The smallest nice bucket that draws at most ``TARGET_BUCKETS`` points over the span."""
    for b in NICE_BUCKETS:
        if span_seconds / b < TARGET_BUCKETS:
            return b
    return NICE_BUCKETS[-1]


def _iso(t: int) -> str:
    return dt.datetime.fromtimestamp(t, tz=dt.UTC).isoformat()


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _figures(task: str, r: dict[str, Any]) -> dict[str, Any]:
    """Rates and quantiles of one row of ``BUCKETS_SQL`` / ``SUMMARY_SQL``."""
    out = {
        "paired": r["paired"],
        "missing_a": r["missing_a"],
        "missing_b": r["missing_b"],
        "labelled": r["labelled"],
        "coverage": _ratio(r["labelled"], r["paired"]),
        "label_delay_p50_s": r["label_delay_p50_s"],
        "label_delay_p90_s": r["label_delay_p90_s"],
        "label_delay_p99_s": r["label_delay_p99_s"],
    }
    for m in ("a", "b"):
        out[f"latency_p50_{m}"] = r[f"latency_p50_{m}"]
        out[f"latency_p95_{m}"] = r[f"latency_p95_{m}"]
    if not TASK_SPECS[task].classes:
        out["mean_abs_diff"] = r["mean_abs_diff"]
    else:
        out["agreement"] = _ratio(r["agree"], r["compared"])
        out["flip_rate"] = _ratio(r["fixed"] + r["broken"], r["labelled"])
        out["fixed_rate"] = _ratio(r["fixed"], r["labelled"])
        out["broken_rate"] = _ratio(r["broken"], r["labelled"])
    return out


def _rows(client: Any, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    res = client.query(sql, parameters=params)
    return [dict(zip(res.column_names, r, strict=True)) for r in res.result_rows]


def _sequential_path(task: str, rows: dict[str, np.ndarray], alpha: float) -> list[dict[str, Any]]:
    """The confidence sequence on mean(loss_a - loss_b) at the end of each label bucket.

    Same construction as :func:`abdag.comparators.statistics.sequential_test` (running
    intersection after the burn-in, the current interval when it becomes empty), so the
    last point equals the report's sequential result.
    """
    y = rows["y"]
    if len(y) == 0:
        return []
    d = per_request_loss(task, y, rows["sa"], rows["pa"]) - per_request_loss(
        task, y, rows["sb"], rows["pb"]
    )
    _, mean, lo, hi, start = confidence_sequence(d, alpha, prior_var=TASK_SPECS[task].prior_var)
    run_lo = np.full(len(d), -np.inf)
    run_hi = np.full(len(d), np.inf)
    if start < len(d):
        run_lo[start:] = np.maximum.accumulate(lo[start:])
        run_hi[start:] = np.minimum.accumulate(hi[start:])
        empty = run_lo > run_hi
        run_lo = np.where(empty, lo, run_lo)
        run_hi = np.where(empty, hi, run_hi)
    t = rows["t_label"]
    last = np.flatnonzero(np.append(t[1:] != t[:-1], True))  # last row of each bucket
    return [
        {
            "t": int(t[i]),
            "ts": _iso(int(t[i])),
            "n": int(i + 1),
            "mean": float(mean[i]),
            "lower": float(run_lo[i]),
            "upper": float(run_hi[i]),
        }
        for i in last
    ]


def timeline_payload(
    client: Any, experiment: str, bucket_seconds: int | None = None, *, alpha: float = 0.05
) -> dict[str, Any]:
    """Everything the dashboard draws over time for one experiment (JSON-safe).

    ``buckets``: one dict per non-empty bucket of ``request_ts`` with ``t`` (epoch s),
    ``ts`` (ISO), per-bucket counts (``paired``, ``missing_a``, ``missing_b``,
    ``labelled``), running totals (``cum_paired``, ``cum_labelled``), cumulative
    ``<metric>_a`` / ``<metric>_b`` for ``metrics`` (titles and directions in
    ``metric_info``), ``latency_p50_a`` ... ``latency_p95_b``
    (ms), ``agreement`` (share of compared pairs where A and B predict the same class),
    ``flip_rate`` (share of labelled pairs where exactly one model is right; ``fixed_rate``
    B right only, ``broken_rate`` A right only), ``coverage`` (labelled / paired, in the
    bucket) and ``label_delay_p50_s`` / ``p90`` / ``p99`` (``label_ts - request_ts`` of the
    bucket's labelled pairs, ``quantileExactInclusive``: numpy's ``'linear'``).
    ``sequential``: the confidence sequence per bucket of label arrival time. ``summary``:
    the per-bucket figures over the whole experiment.
    ``bucket_seconds=None`` picks one from the experiment's span.
    """
    params: dict[str, Any] = {"experiment": experiment}
    task = (_rows(client, OVERVIEW_SQL, params) or [{}])[0].get("task") or ""
    span = (_rows(client, SPAN_SQL, params) or [{}])[0]
    first, last = span.get("first"), span.get("last")
    seconds = (last - first).total_seconds() if first and last else 0.0
    bucket = int(bucket_seconds) if bucket_seconds else pick_bucket(seconds)
    if bucket < 1:
        raise TimelineError("bucket must be a positive number of seconds")
    if seconds / bucket > MAX_BUCKETS:
        raise TimelineError(
            f"bucket={bucket} s would give {int(seconds / bucket) + 1} buckets over "
            f"{seconds:.0f} s of requests (at most {MAX_BUCKETS}); use a larger bucket"
        )
    names = []
    declared = experiment_settings(client, experiment)
    alpha = group_alpha(alpha, declared)  # as the report judges one of k challengers
    if task in TASKS:
        names = [k for k in declared_metrics(task, declared) if METRICS[k].curve]
    out: dict[str, Any] = {
        "experiment": experiment,
        "task": task,
        "bucket_seconds": bucket,
        "metrics": names,
        # how to title and read each curve (from the metric's spec, not the page)
        "metric_info": {
            k: {"label": METRICS[k].label, "higher_is_better": METRICS[k].higher_is_better}
            for k in names
        },
        "buckets": [],
        "sequential": [],
        "summary": {},
    }
    if task not in BUCKETS_SQL:
        return out
    params["bucket_seconds"] = bucket
    res = client.query(LABELLED_ROWS_SQL[task], parameters=params)
    cols = {k: np.asarray(v) for k, v in zip(res.column_names, res.result_columns, strict=True)}
    if not res.result_rows:
        cols = {k: np.empty(0) for k in res.column_names}
    per_bucket = _rows(client, BUCKETS_SQL[task], params)
    ts = [int(r["t"]) for r in per_bucket]
    curves = cumulative_curves(names, cols, cols["t_request"], ts)
    run: dict[str, int] = {}
    for i, r in enumerate(per_bucket):
        t = int(r["t"])
        for k, v in r.items():
            if k != "t" and isinstance(v, int):
                run[k] = run.get(k, 0) + v
        row: dict[str, Any] = {"t": t, "ts": _iso(t), **_figures(task, r)}
        row["cum_paired"] = run["paired"]
        row["cum_labelled"] = run["labelled"]
        row["cum_coverage"] = _ratio(run["labelled"], run["paired"])
        row.update({k: v[i] for k, v in curves.items()})  # NaN (None) while nothing labelled
        out["buckets"].append(row)
    summary = _rows(client, SUMMARY_SQL[task], params)
    out["summary"] = _figures(task, summary[0]) if summary else {}
    out["sequential"] = _sequential_path(task, cols, alpha)
    return _safe(out)
