"""Rows of the ClickHouse tables, built from what the join emitted.

Kept apart from the sink (which only moves rows) and the schema (which only declares
tables), so the column order is written once.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from abdag.comparators.join import Emitted
from abdag.comparators.schema import columns
from abdag.comparators.tasks import task_spec

PAIR_COLUMNS = columns("pairs")  # the tables' columns are declared once, in the schema
SNAPSHOT_COLUMNS = columns("metric_snapshots")
_TIME_COLUMNS = {"request_ts", "paired_ts", "label_ts"}


def experiment_name(dag: str, comparison: str) -> str:
    """Experiments are named ``<dag>.<comparison>`` so two DAGs never mix their rows."""
    return f"{dag}.{comparison}"


def pair_row(
    experiment: str, node: Any, emitted: Emitted, partition: int, worker: str, now: float
) -> dict:
    """A JSON-safe dict with every pairs column (times as epoch seconds)."""
    a, b = emitted.a or {}, emitted.b or {}
    task = task_spec(node.task)
    request_ts = a.get("request_ts") or b.get("request_ts") or emitted.first_ts
    return {
        "experiment": experiment,
        "request_id": emitted.request_id,
        "partition": partition,
        "status": emitted.status,
        "task": node.task,
        "model_a": node.a,
        "model_b": node.b,
        "version_a": a.get("version", ""),
        "version_b": b.get("version", ""),
        "score_a": task.score_of(a),
        "score_b": task.score_of(b),
        "pred_a": a.get("label"),
        "pred_b": b.get("label"),
        "label": emitted.label,
        "latency_a_ms": a.get("latency_ms"),
        "latency_b_ms": b.get("latency_ms"),
        "request_ts": request_ts,
        "paired_ts": now,
        "label_ts": emitted.label_ts,
        "stage": emitted.stage,
        "worker": worker,
        "served_by": emitted.served_by,
        "segments": emitted.segments or {},  # dag.compare(segments=...), name -> value
    }


def to_insert_values(row: dict[str, Any]) -> list[Any]:
    """Column values in PAIR_COLUMNS order, times as timezone-aware datetimes.

    A row from a worker older than a column (still on the pairs topic during an upgrade)
    gets the column's default: ``served_by`` ''."""
    if row.get("served_by") is None:
        row = {**row, "served_by": ""}
    if row.get("segments") is None:  # ``segments`` {} (schema 7)
        row = {**row, "segments": {}}
    return [
        _dt(row[c]) if c in _TIME_COLUMNS and row[c] is not None else row[c] for c in PAIR_COLUMNS
    ]


def snapshot_rows(
    experiment: str, worker: str, partition: int, metrics: Any, now: float
) -> list[dict[str, Any]]:
    """One row per (model, metric) of a PairMetrics snapshot, for curves over time."""
    rows = []
    snap = metrics.snapshot()
    n = int(snap.get("pair", {}).get("n", 0))
    for model, values in snap.items():
        for metric, value in values.items():
            if value is None or not math.isfinite(value):
                continue  # e.g. AUC before both classes were seen
            rows.append(
                {
                    "experiment": experiment,
                    "ts": _dt(now).isoformat(),
                    "worker": worker,
                    "partition": partition,
                    "model": model,
                    "metric": metric,
                    "value": float(value),
                    "n": n,
                }
            )
    return rows


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)
