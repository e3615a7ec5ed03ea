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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from abdag.comparators.metric_specs import (
    DEFAULT_METRICS,
    METRICS,
    cumulative_curves,
)
from abdag.comparators.schema import DEAD_LETTER_COUNT, PAIRS_DEDUP
from abdag.comparators.statistics import (
    McNemarResult,
    SequentialResult,
    mcnemar_from_counts,
    paired_bootstrap_metric_diff,
    per_request_loss,
    sequential_test,
)
from abdag.comparators.tasks import TASK_SPECS, TASKS, task_spec
from abdag.comparators.verdict import Verdict, decide

__all__ = [
    "DEAD_LETTERS_SQL",
    "LIST_EXPERIMENTS_SQL",
    "LOSS_NAMES",
    "METRICS_SQL",
    "OVERVIEW_SQL",
    "PRED_SQL",
    "REPORT_METRICS",
    "ROWS_SQL",
    "ROW_COLUMNS",
    "TIMELINE_COUNTS_SQL",
    "Report",
    "build_report",
    "declared_metrics",
    "group_alpha",
    "list_experiments",
    "metrics_sql",
    "rows_sql",
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


# ------------------------------------------------------------------------ report
@dataclass
class Report:
    """Everything a user needs to judge B against A; ``metrics[name]`` is
    ``(a, b, b - a, ci_low, ci_high)`` with the interval on ``b - a``."""

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
        v = self.verdict
        lines += ["", f"  Verdict: {v.label} (confidence {v.confidence:.3f})", f"  {v.reason}"]
        return "\n".join(lines)


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
    )


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
