"""The A/B report of one experiment, read from ClickHouse.

Every number users see comes from the deduplicated ``pairs`` table (``pairs FINAL``: one
row per request, the highest stage wins), so re-delivered rows and stage upgrades never
count twice. Each metric's value is its SQL (``MetricSpec.sql`` in
:mod:`abdag.comparators.metric_specs`, exact: ClickHouse's ``arrayROCAUC`` equals scikit-learn's
``roc_auc_score`` and ``arrayAUCPR`` its ``average_precision_score``, ties included), over
the row columns of ``ROW_COLUMNS``; the SQL is built with ``{experiment:String}``
server-side parameters so that a CLI can print the SQL behind a number. Per-request rows
are then pulled once (numpy) for what SQL cannot do well: the always-valid sequential test
on per-request loss differences and paired bootstrap intervals of each metric's offline
value. The metrics shown are those the DAG declared (``dag.compare(metrics=...)``, kept in
the ``experiments`` table), else the task's ``DEFAULT_METRICS``.

>>> sorted(METRICS_SQL)
['binary', 'multiclass', 'regression']
>>> "{experiment:String}" in METRICS_SQL["binary"] and "pairs FINAL" in METRICS_SQL["binary"]
True
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from abdag.comparators.decision_time import (
    RATE_WINDOW_S,
    UNKNOWN_REQUEST_REASON,
    LabelStats,
    TimeToDecision,
    time_to_decision,
)
from abdag.comparators.metric_specs import (
    DEFAULT_METRICS,
    METRICS,
    cumulative_curves,
)
from abdag.comparators.schema import DEAD_LETTER_COUNT, PAIRS_DEDUP
from abdag.comparators.segments import SegmentReport, adjust, segment_report
from abdag.comparators.srm import SrmResult, skipped, srm_check, srm_check_segments
from abdag.comparators.statistics import (
    McNemarResult,
    SequentialResult,
    mcnemar_from_counts,
    paired_bootstrap_metric_diff,
    per_request_loss,
    sequential_test,
)
from abdag.comparators.tasks import TASK_SPECS, TASKS, task_spec
from abdag.comparators.verdict import WITHHELD, Verdict, decide, withhold

__all__ = [
    "DEAD_LETTERS_SQL",
    "LABELS_SQL",
    "LIST_EXPERIMENTS_SQL",
    "LOSS_NAMES",
    "METRICS_SQL",
    "OVERVIEW_SQL",
    "PRED_SQL",
    "REPORT_METRICS",
    "ROWS_SQL",
    "ROW_COLUMNS",
    "SEGMENT_NAMES_SQL",
    "SRM_SEGMENTS_SQL",
    "SRM_SQL",
    "TIMELINE_COUNTS_SQL",
    "Report",
    "build_report",
    "build_reports",
    "check_served_split",
    "declared_metrics",
    "declared_mirror",
    "group_alpha",
    "list_experiments",
    "metrics_sql",
    "report_segments",
    "rows_sql",
    "segment_rows_sql",
    "timeline",
]

REPORT_METRICS: dict[str, tuple[str, ...]] = {
    t: tuple(k for k in DEFAULT_METRICS[t] if not METRICS[k].live_only) for t in TASKS
}
"""What a report shows when the DAG declared no metrics: the task's defaults."""
LOSS_NAMES = {t: spec.loss for t, spec in TASK_SPECS.items()}

_EXP = "experiment = {experiment:String}"
# Rows that can be scored, per task. The same predicate feeds the metric SQL, the rows
# pulled for the tests and the timeline, so every count agrees.
_SCORABLE = {t: spec.scorable_sql for t, spec in TASK_SPECS.items()}
_LABELLED = "status = 'paired' AND label IS NOT NULL"


def _labelled_where(task: str) -> str:
    return f"{_EXP} AND {_LABELLED} AND {_SCORABLE[task]}"


OVERVIEW_SQL = f"""SELECT
    countIf(status = 'paired') AS paired,
    countIf(status = 'missing_a') AS missing_a,
    countIf(status = 'missing_b') AS missing_b,
    countIf({_LABELLED}) AS labelled,
    argMax(task, paired_ts) AS task,
    argMaxIf(model_a, paired_ts, status = 'paired') AS model_a,
    argMaxIf(model_b, paired_ts, status = 'paired') AS model_b,
    argMaxIf(version_a, paired_ts, status = 'paired') AS version_a,
    argMaxIf(version_b, paired_ts, status = 'paired') AS version_b,
    min(request_ts) AS first_request_ts,
    max(request_ts) AS last_request_ts
FROM {PAIRS_DEDUP}
WHERE {_EXP}"""

DEAD_LETTERS_SQL = f"""SELECT reason, {DEAD_LETTER_COUNT} AS n
FROM dead_letters
WHERE dag = {{dag:String}}
GROUP BY reason
ORDER BY reason"""

SRM_SQL = f"""SELECT
    countIf(served_by = 'a') AS served_a,
    countIf(served_by = 'b') AS served_b,
    countIf(served_by = '') AS not_served
FROM {PAIRS_DEDUP}
WHERE {_EXP}"""
"""Whose answer was served, per request (``served_by``): the counts of the SRM check."""

SRM_SEGMENTS_SQL = f"""SELECT
    segment,
    value,
    countIf(served_by = 'a') AS served_a,
    countIf(served_by = 'b') AS served_b,
    countIf(served_by = '') AS not_served
FROM {PAIRS_DEDUP}
ARRAY JOIN mapKeys(segments) AS segment, mapValues(segments) AS value
WHERE {_EXP}
GROUP BY segment, value
ORDER BY segment, value"""
"""The SRM check's counts per value of each segment the rows record (one row per request
and segment: a request counts once in each segment); no rows without segments."""

LIST_EXPERIMENTS_SQL = "SELECT DISTINCT experiment FROM pairs ORDER BY experiment"
# DISTINCT is unaffected by duplicate rows, so this one read of pairs needs no FINAL.

PRED_SQL: dict[str, str] = {t: spec.pred_sql("{m}") for t, spec in TASK_SPECS.items()}
"""The predicted class of model ``{m}`` per row (NULL when it has none), in every query."""

ROW_COLUMNS: dict[str, dict[str, str]] = {
    task: {
        "y": TASK_SPECS[task].label_sql,
        **{f"s{m}": f"ifNull(score_{m}, nan)" for m in ("a", "b")},
        **{f"p{m}": f"ifNull({PRED_SQL[task].format(m=m)}, -1)" for m in ("a", "b")},
    }
    for task in TASKS
}
"""The columns every metric reads, per labelled and scorable row: label ``y``, scores
``sa``/``sb``, classes ``pa``/``pb``. One definition for the metric SQL, the rows the
bootstrap and the sequential test resample, and the dashboard's rows."""


def _row_select(task: str, indent: str = "    ") -> str:
    return ",\n".join(f"{indent}{expr} AS {col}" for col, expr in ROW_COLUMNS[task].items())


def metrics_sql(task: str, names: tuple[str, ...] | list[str] | None = None) -> str:
    """One query for every metric of ``names`` (the report's defaults when None), A and B:
    columns ``n``, ``b01`` / ``b10`` (classification) and ``<metric>_a`` / ``<metric>_b``."""
    names = REPORT_METRICS[task] if names is None else tuple(names)
    cols = ["count() AS n"]
    if task_spec(task).classes:
        cols += ["countIf(pa != y AND pb = y) AS b01", "countIf(pa = y AND pb != y) AS b10"]
    for name in names:
        sql = METRICS[name].sql
        if sql is None:
            raise ValueError(f"{name} has no SQL value (live only)")
        cols += [f"{sql.format(m=m)} AS {name}_{m}" for m in ("a", "b")]
    select = ",\n    ".join(cols)
    return f"""WITH labelled AS (
    SELECT
{_row_select(task, "        ")}
    FROM {PAIRS_DEDUP}
    WHERE {_labelled_where(task)}
)
SELECT
    {select}
FROM labelled"""


METRICS_SQL: dict[str, str] = {t: metrics_sql(t) for t in TASKS}
"""The report's metric query of each task, with its default metrics."""


def rows_sql(task: str, *extra: str) -> str:
    """Labelled rows (``ROW_COLUMNS`` and ``extra`` columns) in the order labels arrived."""
    cols = _row_select(task) + "".join(f",\n    {e}" for e in extra)
    return f"""SELECT
{cols}
FROM {PAIRS_DEDUP}
WHERE {_labelled_where(task)}
ORDER BY coalesce(label_ts, paired_ts), request_id"""


ROWS_SQL: dict[str, str] = {t: rows_sql(t) for t in TASKS}
"""Labelled rows in the order labels arrived: the order the sequential test watched them."""

_BUCKET = "toUnixTimestamp(toStartOfInterval({ts}, toIntervalSecond({{bucket_seconds:UInt32}})))"

TIMELINE_COUNTS_SQL: dict[str, str] = {
    task: f"""SELECT
    {_BUCKET.format(ts="request_ts")} AS t,
    countIf(status = 'paired') AS paired,
    countIf({_LABELLED} AND {_SCORABLE[task]}) AS labelled
FROM {PAIRS_DEDUP}
WHERE {_EXP}
GROUP BY t
ORDER BY t"""
    for task in TASKS
}
"""Paired and labelled requests per time bucket of ``request_ts`` (:func:`timeline`)."""

_DELAY_S = (
    "(toUnixTimestamp64Milli(assumeNotNull(label_ts)) "
    "- toUnixTimestamp64Milli(request_ts)) / 1000.0"
)


def _age_s(ts: str) -> str:
    return f"(toUnixTimestamp64Milli(as_of) - toUnixTimestamp64Milli({ts})) / 1000.0"


LABELS_SQL: dict[str, str] = {
    task: f"""WITH
    (SELECT max(greatest(request_ts, ifNull(label_ts, request_ts)))
     FROM {PAIRS_DEDUP} WHERE {_EXP}) AS as_of,
    (SELECT quantileExactInclusive(0.99)(toNullable({_DELAY_S}))
     FROM {PAIRS_DEDUP} WHERE {_labelled_where(task)}) AS p99
SELECT
    as_of,
    min(request_ts) AS first_request_ts,
    countIf(status = 'paired') AS paired,
    countIf(lab) AS labelled,
    quantileExactInclusive(0.5)(delay_s) AS delay_p50_s,
    quantileExactInclusive(0.9)(delay_s) AS delay_p90_s,
    p99 AS delay_p99_s,
    countIf(status = 'paired' AND label IS NULL AND age_s < ifNull(p99, inf)) AS waiting,
    countIf(status = 'paired' AND age_s >= p99) AS settled_paired,
    countIf(lab AND age_s >= p99) AS settled_labelled,
    countIf(lab AND label_age_s < {{window_seconds:UInt32}}) AS labelled_in_window,
    countIf(status = 'paired' AND age_s < {{window_seconds:UInt32}}) AS paired_in_window
FROM (
    SELECT
        *,
        {_LABELLED} AND {_SCORABLE[task]} AS lab,
        if(lab, {_DELAY_S}, NULL) AS delay_s,
        {_age_s("request_ts")} AS age_s,
        {_age_s("label_ts")} AS label_age_s
    FROM {PAIRS_DEDUP}
    WHERE {_EXP}
)"""
    for task in TASKS
}
"""Label delay and coverage of one experiment, one row (read by
:class:`abdag.comparators.decision_time.LabelStats`): ``as_of`` the experiment's latest
time (last request or label); ``delay_p50_s`` / ``p90`` / ``p99`` of ``label_ts -
request_ts`` over the labelled pairs the test counts (``quantileExactInclusive``: numpy's
``method='linear'``); ``waiting`` paired requests without a label younger than the p99
delay; ``settled_*`` requests older than it; ``labelled_in_window`` labels whose
``label_ts`` is within ``{window_seconds}`` of ``as_of``, ``paired_in_window`` requests
whose ``request_ts`` is. docs/statistics.md, "Label delay and coverage"."""


# ------------------------------------------------------------------------ report
@dataclass
class Report:
    """Everything a user needs to judge B against A; ``metrics[name]`` is
    ``(a, b, b - a, ci_low, ci_high)`` with the interval on ``b - a``.

    ``srm``: the served-split check of a split experiment (None otherwise); while it fires
    ``verdict`` is 'withheld' and ``statistical_verdict`` is what the tests said."""

    experiment: str
    task: str
    model_a: str
    model_b: str
    version_a: str
    version_b: str
    counts: dict[str, int]
    metrics: dict[str, tuple[float, float, float, float, float]]
    mcnemar: McNemarResult | None
    sequential: SequentialResult | None
    verdict: Verdict
    sql: list[str]
    margin: float = 0.0
    alpha: float = 0.05
    loss: str = ""
    dead_letters: dict[str, int] = field(default_factory=dict)
    ci_method: str = ""
    first_request_ts: str | None = None
    last_request_ts: str | None = None
    srm: SrmResult | None = None
    statistical_verdict: Verdict | None = None
    # label delay and coverage; labelled pairs still needed and when (decision_time)
    labels: LabelStats | None = None
    time_to_decision: TimeToDecision | None = None
    # A against B within each segment value, BH-adjusted (abdag.comparators.segments)
    segments: SegmentReport | None = None
    # dag.compare(mirror=...): the share of requests B scored (the pairs hold only those)
    mirror: float = 1.0

    def compared(self) -> int:
        """The requests compared: every pairs row (paired or not), all of them mirrored."""
        c = self.counts
        return sum(int(c.get(k, 0)) for k in ("paired", "missing_a", "missing_b"))

    def mirror_summary(self) -> dict[str, Any]:
        """The mirrored share, the requests compared and the whole traffic estimated from
        them (compared / share): A's answers to the others are in no table."""
        n = self.compared()
        estimated = round(n / self.mirror) if self.mirror > 0 else n
        return {"fraction": self.mirror, "compared": n, "requests_estimated": estimated}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: NaN and infinities become None, numpy scalars Python numbers."""
        return _json_safe(
            {
                "experiment": self.experiment,
                "task": self.task,
                "model_a": self.model_a,
                "model_b": self.model_b,
                "version_a": self.version_a,
                "version_b": self.version_b,
                "counts": self.counts,
                "dead_letters": self.dead_letters,
                "metrics": {
                    k: {
                        "a": v[0],
                        "b": v[1],
                        "diff": v[2],
                        "ci_low": v[3],
                        "ci_high": v[4],
                        "higher_is_better": METRICS[k].higher_is_better,
                        "label": METRICS[k].label,
                    }
                    for k, v in self.metrics.items()
                },
                "mcnemar": self.mcnemar.to_dict() if self.mcnemar else None,
                "sequential": self.sequential.to_dict() if self.sequential else None,
                "verdict": self.verdict.to_dict(),
                # what the tests said, also while the verdict is withheld (SRM)
                "statistical_verdict": (self.statistical_verdict or self.verdict).to_dict(),
                "srm": self.srm.to_dict() if self.srm else None,
                "time_to_decision": (
                    self.time_to_decision.to_dict() if self.time_to_decision else None
                ),
                "labels": self.labels.to_dict() if self.labels else None,
                "segments": self.segments.to_dict() if self.segments else None,
                "mirror": self.mirror_summary(),
                "loss": self.loss,
                "margin": self.margin,
                "alpha": self.alpha,
                "ci_method": self.ci_method,
                "first_request_ts": self.first_request_ts,
                "last_request_ts": self.last_request_ts,
                "sql": self.sql,
            }
        )

    def render(self) -> str:
        """A text report: counts, a metric table, the tests and the verdict."""
        c = self.counts
        lines = [
            f"Experiment {self.experiment} ({self.task or 'no data'})",
            f"  A: {_model(self.model_a, self.version_a)}   "
            f"B: {_model(self.model_b, self.version_b)}",
            f"  {c.get('paired', 0)} paired, {c.get('missing_a', 0)} missing A, "
            f"{c.get('missing_b', 0)} missing B, {c.get('labelled', 0)} labelled, "
            f"{c.get('dead_letters', 0)} dead letters",
        ]
        if self.mirror < 1.0:  # B scored a stable share of the requests, only those compared
            lines.append(_mirror_line(self.mirror_summary()))
        if self.dead_letters:  # what was refused, and why: nothing is dropped unsaid
            why = ", ".join(f"{reason} {n}" for reason, n in sorted(self.dead_letters.items()))
            lines.append(f"  dead letters by reason: {why}")
        lines.append("")
        if self.metrics:
            level = f"{1 - self.alpha:.0%} CI"
            head = f"  {'metric':<10} {'A':>9} {'B':>9} {'B - A':>9}  {level:<22} better"
            lines += [head, "  " + "-" * (len(head) - 2)]
            for name, (a, b, diff, lo, hi) in self.metrics.items():
                hib = METRICS[name].higher_is_better
                arrow = "higher" if hib else "lower"
                ci = f"[{_f(lo, True)}, {_f(hi, True)}]"
                lines.append(
                    f"  {name:<10} {_f(a):>9} {_f(b):>9} {_f(diff, True):>9}  {ci:<22} {arrow}"
                )
            lines.append("")
        if self.mcnemar is not None:
            m = self.mcnemar
            kind = "exact binomial" if m.exact else "chi-square, continuity corrected"
            lines.append(
                f"  McNemar ({kind}): A wrong/B right {m.b01}, A right/B wrong {m.b10}, "
                f"p = {m.pvalue:.4g}"
            )
        s = self.sequential
        if s is not None and s.n:
            lines.append(
                f"  Sequential test on {self.loss} (always valid): mean improvement "
                f"{_f(s.mean, True)}, {1 - s.alpha:.0%} CS [{_f(s.lower, True)}, "
                f"{_f(s.upper, True)}], p = {s.pvalue_always_valid:.4g}, n = {s.n}"
            )
        if self.srm is not None:
            lines += [_srm_line(self.srm), *_srm_segment_lines(self.srm)]
        v = self.verdict
        if v.label == WITHHELD:  # e.g. "withheld: SRM: served 13.2% to B, declared 10%"
            lines += ["", f"  Verdict: {v.label}: {v.reason}"]
            sv = self.statistical_verdict
            if sv is not None:
                lines.append(
                    f"  statistical verdict, withheld: {sv.label} "
                    f"(confidence {sv.confidence:.3f}): {sv.reason}"
                )
            return "\n".join(lines + self._decision_lines() + self._segment_lines())
        lines += ["", f"  Verdict: {v.label} (confidence {v.confidence:.3f})", f"  {v.reason}"]
        return "\n".join(lines + self._decision_lines() + self._segment_lines())

    def _decision_lines(self) -> list[str]:
        """Time to decision and how labels come, under the verdict."""
        out = [f"  {x.render()}" for x in (self.time_to_decision, self.labels) if x is not None]
        return [""] + out if out else []

    def _segment_lines(self) -> list[str]:
        """A against B within each segment value, last (none without declared segments)."""
        s = self.segments
        return ["", *s.render()] if s is not None and (s.values or s.note) else []


def _mirror_line(m: dict[str, Any]) -> str:
    """E.g. "B mirrors 10% of requests: 1,012 compared of about 10,120 (...)"."""
    share = f"{100 * m['fraction']:.4g}%"
    return (
        f"  B mirrors {share} of requests: {m['compared']:,} compared of about "
        f"{m['requests_estimated']:,} (compared / {m['fraction']:g}, a stable hash of the "
        "request id chose them; A alone answered the rest)"
    )


def _srm_line(r: SrmResult) -> str:
    head = "  Served split (SRM check)"
    unserved = f"; {r.not_served} requests not served" if r.not_served else ""
    if r.status == "skipped":
        return f"{head}: skipped: {r.reason}{unserved}"
    outcome = (
        f"SRM fired (sequential p < {r.threshold:g}): verdict withheld"
        if r.fired
        else "no mismatch"
    )
    return (
        f"{head}: A {r.n_a}, B {r.n_b}: {r.summary()}; chi-square p = {r.pvalue_chi2:.4g}, "
        f"sequential p = {r.pvalue_sequential:.4g} (always valid){unserved}: {outcome}"
    )


def _srm_segment_lines(r: SrmResult, max_skipped: int = 10) -> list[str]:
    """Under the SRM line: the per-segment checks, each value that fired, the skipped."""
    if not r.segments:
        return []
    checked = [s for s in r.segments if s.status != "skipped"]
    few = [s for s in r.segments if s.status == "skipped"]
    fired = r.fired_segments
    head = "    per segment value"
    if checked:
        each = checked[0].threshold
        lines = [
            f"{head}: {len(checked)} checked at sequential p < {each:.3g} ({r.threshold:g} / "
            f"{len(checked)}, Bonferroni): "
            + (f"SRM fired in {len(fired)}: verdict withheld" if fired else "no mismatch")
        ]
    else:
        lines = [f"{head}: none checked yet"]
    for s in fired:
        lines.append(
            f"    ! SRM in segment {s.label}: {s.summary()} (A {s.n_a}, B {s.n_b}, "
            f"sequential p = {s.pvalue_sequential:.3g})"
        )
    if few:
        shown = ", ".join(f"{s.label} ({s.n_a + s.n_b})" for s in few[:max_skipped])
        more = f" and {len(few) - max_skipped} more" if len(few) > max_skipped else ""
        lines.append(f"    too few served requests, skipped: {shown}{more}")
    return lines


def _model(name: str, version: str) -> str:
    return f"{name or '?'} @ {version}" if version else (name or "?")


def _f(x: float | None, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if math.isinf(x):
        return "-inf" if x < 0 else "+inf"
    return f"{x:+.4f}" if sign else f"{x:.4f}"


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dt.datetime):
        return x.isoformat()
    return x


def _ts(x: Any) -> str | None:
    if not isinstance(x, dt.datetime) or x.replace(tzinfo=None) <= dt.datetime(1970, 1, 1):
        return None
    return (x if x.tzinfo else x.replace(tzinfo=dt.UTC)).isoformat()


def _one(client: Any, sql: str, params: dict[str, Any]) -> dict[str, Any]:
    res = client.query(sql, parameters=params)
    rows = res.result_rows
    return dict(zip(res.column_names, rows[0], strict=True)) if rows else {}


def build_report(
    client: Any,
    experiment: str,
    *,
    margin: float | None = None,
    alpha: float = 0.05,
    min_pairs: int = 200,
    n_resamples: int = 1000,
    seed: int = 0,
    ci_method: str = "auto",
    dag: str | None = None,
) -> Report:
    """Read one experiment from ClickHouse and judge B against A.

    ``margin``: non-inferiority margin on the mean per-request loss (log loss, 0/1 loss or
    squared error by task). ``ci_method``: scipy's bootstrap method for the metric
    intervals, ``'auto'`` = BCa up to 1000 labelled pairs, percentile above (BCa's
    jackknife costs O(n^2)). ``dag``: whose dead letters to count; by default the part of
    the experiment name before the first '.' (experiments are named ``<dag>.<comparison>``).

    ``margin=None`` takes the margin declared in the DAG (the ``experiments`` table; 0 if
    unknown). When the experiment is one of k challengers of a champion, ``alpha`` is
    split over them (Bonferroni), so the chance of any false "B better" stays ``alpha``.
    """
    params = {"experiment": experiment}
    declared = experiment_settings(client, experiment)
    if margin is None:
        margin = float(declared.get("margin", 0.0))
    alpha = group_alpha(alpha, declared)
    sql = [OVERVIEW_SQL]
    ov = _one(client, OVERVIEW_SQL, params)
    task = ov.get("task") or ""
    dag_name = dag if dag is not None else experiment.split(".", 1)[0]
    sql.append(DEAD_LETTERS_SQL)
    dead = {
        r[0]: int(r[1])
        for r in client.query(DEAD_LETTERS_SQL, parameters={"dag": dag_name}).result_rows
    }
    counts = {k: int(ov.get(k) or 0) for k in ("paired", "missing_a", "missing_b", "labelled")}
    counts["dead_letters"] = sum(dead.values())
    metrics: dict[str, tuple[float, float, float, float, float]] = {}
    mcn: McNemarResult | None = None
    seq: SequentialResult | None = None
    method = ""
    if task in TASKS:
        names = declared_metrics(task, declared)
        values_sql = metrics_sql(task, names)
        sql.append(values_sql)
        values = _one(client, values_sql, params)
        sql.append(ROWS_SQL[task])
        res = client.query(ROWS_SQL[task], parameters=params)
        cols = (
            dict(zip(res.column_names, res.result_columns, strict=True)) if res.result_rows else {}
        )
        y = np.asarray(cols.get("y", []), dtype=float)
        sa = np.asarray(cols.get("sa", []), dtype=float)
        sb = np.asarray(cols.get("sb", []), dtype=float)
        pa = np.asarray(cols.get("pa", []), dtype=np.int64)
        pb = np.asarray(cols.get("pb", []), dtype=np.int64)
        n = len(y)
        counts["scored"] = n
        method = ci_method if ci_method != "auto" else ("BCa" if n <= 1000 else "percentile")
        for name in names:
            a, b = _num(values.get(f"{name}_a")), _num(values.get(f"{name}_b"))
            lo = hi = math.nan
            if n >= 2:
                xa, xb = (sa, sb) if METRICS[name].reads == "score" else (pa, pb)
                iv = paired_bootstrap_metric_diff(
                    name,
                    y,
                    xa,
                    xb,
                    n_resamples=n_resamples,
                    confidence=1 - alpha,
                    seed=seed,
                    method=method,
                )
                lo, hi = iv.low, iv.high
            metrics[name] = (a, b, b - a, lo, hi)
        spec = task_spec(task)
        if spec.classes:
            mcn = mcnemar_from_counts(int(values.get("b01") or 0), int(values.get("b10") or 0))
        loss_a = per_request_loss(task, y, sa, pa)
        loss_b = per_request_loss(task, y, sb, pb)
        # a loss that can start with a run of equal values (0/1 loss) gets one pseudo
        # observation of its largest variance, which keeps the early interval honest
        seq = sequential_test(loss_a - loss_b, alpha, margin, prior_var=spec.prior_var)
    verdict = (
        decide(seq, mcn, margin=margin, alpha=alpha, min_pairs=min_pairs)
        if seq is not None
        else Verdict("not enough data", 0.0, "no labelled pairs with a known task yet")
    )
    statistical = verdict
    srm = check_served_split(client, experiment, declared, sql)
    if srm is not None and srm.any_fired:  # the served split is not the declared one
        verdict = withhold(srm.withhold_reason())
    unknown = dead.get(UNKNOWN_REQUEST_REASON, 0)  # labels whose request never came
    labels = LabelStats(unknown_request_labels=unknown)
    if task in TASKS:
        sql.append(LABELS_SQL[task])
        row = _one(client, LABELS_SQL[task], {**params, "window_seconds": RATE_WINDOW_S})
        labels = LabelStats.from_row(row, unknown_request_labels=unknown)
    ttd = time_to_decision(seq, verdict.label, labels, min_pairs=min_pairs)
    segments = (
        report_segments(
            client,
            experiment,
            task,
            declared_metrics(task, declared),
            alpha=alpha,
            verdict=statistical.label,
            sql=sql,
            n_resamples=n_resamples,
            seed=seed,
        )
        if task in TASKS
        else None
    )
    return Report(
        experiment=experiment,
        task=task,
        model_a=ov.get("model_a") or "",
        model_b=ov.get("model_b") or "",
        version_a=ov.get("version_a") or "",
        version_b=ov.get("version_b") or "",
        counts=counts,
        metrics=metrics,
        mcnemar=mcn,
        sequential=seq,
        verdict=verdict,
        sql=sql,
        margin=margin,
        alpha=alpha,
        loss=LOSS_NAMES.get(task, ""),
        dead_letters=dead,
        ci_method=method,
        first_request_ts=_ts(ov.get("first_request_ts")) if counts["paired"] else None,
        last_request_ts=_ts(ov.get("last_request_ts")) if counts["paired"] else None,
        srm=srm,
        statistical_verdict=statistical,
        labels=labels,
        time_to_decision=ttd,
        segments=segments,
        mirror=declared_mirror(declared),
    )


def declared_mirror(declared: dict[str, Any]) -> float:
    """The share of requests B scores (``dag.compare(mirror=...)``, the experiments row's
    ``mirror``); 1.0 when not recorded.

    >>> declared_mirror({"mirror": 0.1}), declared_mirror({})
    (0.1, 1.0)
    """
    m = declared.get("mirror")
    return float(m) if isinstance(m, int | float) and 0.0 < m <= 1.0 else 1.0


def check_served_split(
    client: Any, experiment: str, declared: dict[str, Any], sql: list[str] | None = None
) -> SrmResult | None:
    """The sample-ratio mismatch check of a split experiment (:mod:`abdag.comparators.srm`)
    on its served counts (``SRM_SQL``, appended to ``sql``); None unless the DAG declared
    ``mode="split"``. Skipped (with the reason) when the split is 0 or 1, once a promotion
    or a retirement changed who serves (the declared split no longer holds), and while
    there are too few served requests. With segments, each value of each segment is checked
    too (``SRM_SEGMENTS_SQL``, :func:`abdag.comparators.srm.srm_check_segments`: Bonferroni
    over the values checked), in ``segments`` of the result."""
    if declared.get("mode") != "split":
        return None
    share = float(declared.get("split") or 0.0)
    if not 0.0 < share < 1.0:
        return skipped(share, f"split {share:g}: one side serves every request")
    from abdag.comparators.decisions import latest_decision

    try:
        decision = latest_decision(client, experiment)
    except Exception:  # noqa: BLE001 - older stores have no decisions table
        decision = None
    if decision is not None:
        return skipped(share, f"{decision.action}d: the declared split no longer holds")
    if sql is not None:
        sql.append(SRM_SQL)
    try:
        c = _one(client, SRM_SQL, {"experiment": experiment})
    except Exception:  # noqa: BLE001 - a pairs table a worker of schema 6 has not migrated
        return skipped(share, "no served_by column in pairs (workers older than schema 6)")
    overall = srm_check(
        int(c.get("served_a") or 0),
        int(c.get("served_b") or 0),
        share,
        not_served=int(c.get("not_served") or 0),
    )
    try:
        res = client.query(SRM_SEGMENTS_SQL, parameters={"experiment": experiment})
    except Exception:  # noqa: BLE001 - a pairs table no worker of schema 7 has migrated
        return overall
    if sql is not None:
        sql.append(SRM_SEGMENTS_SQL)
    per_value = srm_check_segments(res.result_rows, share)
    return replace(overall, segments=per_value) if per_value else overall


def declared_metrics(task: str, declared: dict[str, Any]) -> tuple[str, ...]:
    """The metrics a report shows: the DAG's ``dag.compare(metrics=...)`` (the experiments
    row's ``metrics``, comma-separated) that have a SQL value, else ``REPORT_METRICS``.

    >>> declared_metrics("binary", {"metrics": "roc_auc,accuracy,roc_auc_river"})
    ('roc_auc', 'accuracy')
    >>> declared_metrics("regression", {"metrics": ""})
    ('mae', 'rmse', 'r2')
    """
    wanted = [k.strip() for k in str(declared.get("metrics") or "").split(",") if k.strip()]
    names = tuple(
        k for k in wanted if k in METRICS and task in METRICS[k].tasks and not METRICS[k].live_only
    )
    return names or REPORT_METRICS[task]


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def group_alpha(alpha: float, declared: dict[str, Any]) -> float:
    """The error rate of one of k challengers of a champion: ``alpha / k`` (Bonferroni),
    so the chance of any false "B better" in the group stays ``alpha``.

    >>> group_alpha(0.05, {"group_size": 2}), group_alpha(0.05, {})
    (0.025, 0.05)
    """
    return alpha / max(int(declared.get("group_size", 1) or 1), 1)


def experiment_settings(client: Any, experiment: str) -> dict[str, Any]:
    """What the DAG declared for an experiment (margin, group, ...); {} if not recorded."""
    try:
        return _one(
            client,
            "SELECT * FROM experiments FINAL WHERE experiment = {experiment:String}",
            {"experiment": experiment},
        )
    except Exception:  # noqa: BLE001 - older stores have no experiments table
        return {}


def group_members(client: Any, group: str) -> list[str]:
    """Experiments of a champion-and-challengers group (``<dag>.<name>``)."""
    try:
        dag, _, name = group.partition(".")
        rows = client.query(
            "SELECT experiment FROM experiments FINAL WHERE dag = {d:String} AND grp = {g:String} "
            "ORDER BY experiment",
            parameters={"d": dag, "g": name},
        ).result_rows
    except Exception:  # noqa: BLE001
        return []
    return [r[0] for r in rows]


def list_experiments(client: Any) -> list[str]:
    """Names of the experiments that have rows in ``pairs`` (none before the first write)."""
    exists = client.query(
        "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = 'pairs'"
    ).result_rows[0][0]
    if not exists:
        return []
    return [r[0] for r in client.query(LIST_EXPERIMENTS_SQL).result_rows]


def timeline(client: Any, experiment: str, bucket_seconds: int = 60) -> list[dict[str, Any]]:
    """Cumulative metrics of A and B at the end of each ``bucket_seconds`` bucket.

    One dict per bucket of ``request_ts``: ``ts`` (ISO, UTC), ``paired``, ``labelled``
    (both cumulative) and ``<metric>_a`` / ``<metric>_b`` for the report's metrics that
    have a curve (``MetricSpec.curve``), over every labelled pair requested up to the end
    of the bucket (``MetricSpec.cumulative``); None while nothing is labelled.
    Computed from deduplicated pairs; the last bucket equals the report.
    """
    ov = _one(client, OVERVIEW_SQL, {"experiment": experiment})
    task = ov.get("task") or ""
    if task not in TASKS:
        return []
    params = {"experiment": experiment, "bucket_seconds": int(bucket_seconds)}
    res = client.query(TIMELINE_COUNTS_SQL[task], parameters=params)
    per_bucket = [dict(zip(res.column_names, r, strict=True)) for r in res.result_rows]
    res = client.query(rows_sql(task, f"{_BUCKET.format(ts='request_ts')} AS t"), parameters=params)
    rows = {k: np.asarray(v) for k, v in zip(res.column_names, res.result_columns, strict=True)}
    if not res.result_rows:
        rows = {k: np.empty(0) for k in res.column_names}
    declared = experiment_settings(client, experiment)
    names = [k for k in declared_metrics(task, declared) if METRICS[k].curve]
    ts = [int(r["t"]) for r in per_bucket]
    curves = cumulative_curves(names, rows, rows["t"], ts)
    out = []
    paired = labelled = 0
    for i, r in enumerate(per_bucket):
        paired += int(r["paired"])
        labelled += int(r["labelled"])
        row: dict[str, Any] = {"paired": paired, "labelled": labelled}
        row.update({k: v[i] for k, v in curves.items()})
        row["ts"] = _ts(dt.datetime.fromtimestamp(int(r["t"]), tz=dt.UTC)) or ""
        out.append(_json_safe(row))
    return out


# ---------------------------------------------------------------------- segments
SEGMENT_NAMES_SQL = f"""SELECT DISTINCT arrayJoin(mapKeys(segments)) AS segment
FROM {PAIRS_DEDUP}
WHERE {_EXP}
ORDER BY segment"""
"""The segments the experiment's rows record (``dag.compare(segments=...)``)."""


def segment_rows_sql(task: str, count: int) -> str:
    """The report's labelled rows (``ROW_COLUMNS``, :func:`rows_sql`) with each row's value
    of ``count`` segments, named by the parameters ``{segment_0:String}``, ...: columns
    ``segment_0``, ... ('' where the row has no such key)."""
    cols = (f"segments[{{segment_{i}:String}}] AS segment_{i}" for i in range(count))
    return rows_sql(task, *cols)


def report_segments(
    client: Any,
    experiment: str,
    task: str,
    metrics: tuple[str, ...] | list[str],
    *,
    alpha: float = 0.05,
    verdict: str = "",
    sql: list[str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> SegmentReport | None:
    """A against B within each value of each segment of the experiment
    (:func:`abdag.comparators.segments.segment_report`: per metric the values, the
    interval, the paired test's p and the Benjamini-Hochberg q over this experiment's
    tests at ``alpha``), from its labelled rows in ``pairs FINAL``; the SQL is appended to
    ``sql``. None when no row records a segment; a report with only a ``note`` on a pairs
    table without the column (workers older than schema 7)."""
    params: dict[str, Any] = {"experiment": experiment}
    try:
        names = [r[0] for r in client.query(SEGMENT_NAMES_SQL, parameters=params).result_rows]
    except Exception:  # noqa: BLE001 - a pairs table no worker of schema 7 has migrated
        note = "no segments column in pairs (workers older than schema 7)"
        return SegmentReport(experiment, [], [], alpha=alpha, verdict=verdict, note=note)
    if not names:
        return None
    rows_query = segment_rows_sql(task, len(names))
    if sql is not None:
        sql += [SEGMENT_NAMES_SQL, rows_query]
    params.update({f"segment_{i}": name for i, name in enumerate(names)})
    res = client.query(rows_query, parameters=params)
    if res.result_rows:
        cols = dict(zip(res.column_names, res.result_columns, strict=True))
    else:
        cols = {c: [] for c in res.column_names}
    return segment_report(
        {k: np.asarray(cols[k]) for k in ROW_COLUMNS[task]},
        {name: cols[f"segment_{i}"] for i, name in enumerate(names)},
        metrics,
        experiment=experiment,
        alpha=alpha,
        verdict=verdict,
        n_resamples=n_resamples,
        seed=seed,
    )


def build_reports(
    client: Any, experiments: list[str], *, alpha: float = 0.05, **kwargs: Any
) -> list[Report]:
    """:func:`build_report` of each experiment (``kwargs`` passed on). For several (a
    champion and its challengers, ``abdag report <dag>.<name>``), Benjamini-Hochberg over
    the segments runs once over every challenger's tests together (segments x metrics x
    challengers) at ``alpha``, replacing each report's own."""
    reports = [build_report(client, e, alpha=alpha, **kwargs) for e in experiments]
    segments = [r.segments for r in reports if r.segments is not None]
    if len(reports) > 1 and segments:
        adjust(segments, alpha, scope=f"{len(reports)} challengers together")
    return reports
