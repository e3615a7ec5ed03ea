"""ClickHouse tables that hold the A/B comparison, and how to read them.

Eight tables live in the client's current database:

``pairs``
    One row per request and experiment. A request is written more than once as knowledge
    grows (``stage`` 1 unpaired -> 2 paired -> 3 paired with a label), and Kafka may deliver
    the same row twice. The table is a ``ReplacingMergeTree(stage)`` ordered by
    ``(experiment, request_id)``: the row with the highest stage wins. Merges happen in
    the background, so **every read must deduplicate**: read ``PAIRS_DEDUP``
    (``pairs FINAL``) or the ``argMax`` form from :func:`pairs_source`.
``metric_snapshots``
    Live values from the comparison node (river metrics), for curves over time.
``dead_letters``
    Messages a DAG node could not process, with a reason and a count.
``experiments``
    What each DAG declares about its comparisons (models, task, mode, margin, group,
    mirror, policy).
``decisions``
    Promotions and retirements, newest first per experiment (``abdag.comparators.decisions``),
    a person's or a policy's (``abdag.comparators.policy``: ``actor`` 'policy').
``policy_state``
    Since when a policy has seen the verdict it promotes on, so that a restarted evaluator
    goes on counting (``abdag.comparators.policy``).
``alerts``
    What ``abdag watch`` announced (verdict, SRM and decision changes) and whether its
    webhook took it (``abdag.watch``): a ``ReplacingMergeTree(attempts)``, read it ``FINAL``.
``schema_version``
    The migrations applied.

``ensure_schema`` is idempotent: ``CREATE TABLE IF NOT EXISTS`` for every table, then
``ALTER TABLE ... ADD COLUMN IF NOT EXISTS`` for declared columns that an older table
lacks (migrations are additive only), then the version lands in ``schema_version``.
Columns are declared once, in ``TABLES``; the DDL and the migrations are both made from it.

>>> print(create_table_sql("dead_letters"))  # doctest: +NORMALIZE_WHITESPACE
CREATE TABLE IF NOT EXISTS dead_letters (
    dag LowCardinality(String),
    node LowCardinality(String),
    reason LowCardinality(String),
    ts DateTime64(3, 'UTC'),
    request_id String,
    detail String,
    count UInt64,
    source String,
    original_size UInt64,
    original_sha256 String
) ENGINE = MergeTree ORDER BY (dag, ts)

"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "PAIRS_COLUMNS",
    "PAIRS_DEDUP",
    "SCHEMA_VERSION",
    "TABLES",
    "Table",
    "columns",
    "create_table_sql",
    "ensure_schema",
    "pairs_source",
    "schema_version",
]

SCHEMA_VERSION = 10  # 4: dead_letters.original_size, original_sha256; 5: experiments.metrics;
# 6: pairs.served_by; 7: pairs.segments; 8: experiments.mirror; 9: alerts;
# 10: experiments.policy, decisions.actor and figures, policy_state
"""Bump when a column is added to ``TABLES``; ``ensure_schema`` records it."""

PAIRS_DEDUP = "pairs FINAL"
"""Source for every read of ``pairs``: one row per (experiment, request_id), highest stage."""

TS = "DateTime64(3, 'UTC')"


@dataclass(frozen=True)
class Table:
    """A table's declared columns, engine and sort key."""

    name: str
    columns: tuple[tuple[str, str], ...]
    engine: str
    order_by: str


PAIRS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("experiment", "LowCardinality(String)"),
    ("request_id", "String"),
    ("partition", "UInt16"),
    ("status", "LowCardinality(String)"),  # 'paired' | 'missing_a' | 'missing_b'
    ("task", "LowCardinality(String)"),  # 'binary' | 'multiclass' | 'regression'
    ("model_a", "LowCardinality(String)"),
    ("model_b", "LowCardinality(String)"),
    ("version_a", "String"),
    ("version_b", "String"),
    # binary: P(class 1); regression: predicted value; multiclass: prob of predicted class
    ("score_a", "Nullable(Float64)"),
    ("score_b", "Nullable(Float64)"),
    ("pred_a", "Nullable(Int32)"),  # predicted class (binary / multiclass)
    ("pred_b", "Nullable(Int32)"),
    ("label", "Nullable(Float64)"),  # binary 0/1, multiclass class id, regression value
    ("latency_a_ms", "Nullable(Float32)"),
    ("latency_b_ms", "Nullable(Float32)"),
    ("request_ts", TS),
    ("paired_ts", TS),
    ("label_ts", f"Nullable({TS})"),
    ("stage", "UInt8"),  # 1 unpaired, 2 paired without label, 3 paired with label
    ("worker", "LowCardinality(String)"),
    # whose answer the comparison node served: 'a' | 'b'; '' none (the serving side's
    # prediction never came) or a row from before schema 6. The SRM check counts it.
    ("served_by", "LowCardinality(String)"),
    # dag.compare(segments=...): segment name -> the request's value ('' when its payload
    # lacks the field); {} when none are declared or on rows from before schema 7
    ("segments", "Map(LowCardinality(String), String)"),
)

TABLES: dict[str, Table] = {
    "pairs": Table("pairs", PAIRS_COLUMNS, "ReplacingMergeTree(stage)", "(experiment, request_id)"),
    "metric_snapshots": Table(
        "metric_snapshots",
        (
            ("experiment", "LowCardinality(String)"),
            ("ts", TS),
            ("worker", "LowCardinality(String)"),
            ("partition", "UInt16"),
            ("model", "LowCardinality(String)"),  # 'a' | 'b' | 'pair'
            ("metric", "LowCardinality(String)"),
            ("value", "Float64"),
            ("n", "UInt64"),
        ),
        "MergeTree",
        "(experiment, ts)",
    ),
    "dead_letters": Table(
        "dead_letters",
        (
            ("dag", "LowCardinality(String)"),
            ("node", "LowCardinality(String)"),
            ("reason", "LowCardinality(String)"),
            ("ts", TS),
            ("request_id", "String"),
            ("detail", "String"),
            ("count", "UInt64"),
            ("source", "String"),
            ("original_size", "UInt64"),  # bytes of the refused record (its dead letter may
            ("original_sha256", "String"),  # keep only the start of it: abdag.topics.records)
        ),
        "MergeTree",
        "(dag, ts)",
    ),
    "experiments": Table(
        "experiments",
        (
            ("experiment", "String"),
            ("updated_ts", TS),
            ("dag", "LowCardinality(String)"),
            ("comparison", "String"),
            ("grp", "String"),  # champion-and-challengers group ('' when alone)
            ("group_size", "UInt16"),  # challengers in the group: alpha is split over them
            ("model_a", "String"),
            ("model_b", "String"),
            ("task", "LowCardinality(String)"),
            ("mode", "LowCardinality(String)"),
            ("split", "Float64"),
            ("margin", "Float64"),
            ("metrics", "String"),  # dag.compare(metrics=...), comma-separated; '' = defaults
            # dag.compare(mirror=...): the share of requests B scores; rows written before
            # schema 8 read 1 (every request)
            ("mirror", "Float64 DEFAULT 1"),
            # dag.compare(policy=...) as JSON (abdag.comparators.policy.Policy); '' none
            ("policy", "String"),
        ),
        "ReplacingMergeTree(updated_ts)",
        "experiment",
    ),
    "decisions": Table(
        "decisions",
        (
            ("experiment", "LowCardinality(String)"),
            ("ts", TS),
            # 'promote' | 'retire' | 'restore' (an undo: A serves, the declared split);
            # a dry-run policy's 'would_promote' | 'would_retire', which workers ignore
            ("action", "LowCardinality(String)"),
            ("served", "LowCardinality(String)"),  # the side served after it: 'a' | 'b'
            ("forced", "UInt8"),
            ("verdict", "String"),
            ("confidence", "Float64"),
            ("note", "String"),
            ("actor", "LowCardinality(String)"),  # 'policy' (automatic); '' a person
            ("figures", "String"),  # JSON: what a policy saw (or what an undo undid)
        ),
        "MergeTree",
        "(experiment, ts)",
    ),
    "policy_state": Table(
        "policy_state",
        (
            ("experiment", "String"),
            ("updated_ts", TS),  # when it was written (the newest wins)
            ("verdict", "String"),  # the promote_on verdict seen; '' none
            # since when (the policy clock) it has been seen at every evaluation; NULL none
            ("held_since", f"Nullable({TS})"),
        ),
        "ReplacingMergeTree(updated_ts)",
        "experiment",
    ),
    "alerts": Table(
        "alerts",
        (
            ("event_id", "String"),  # sha256 of the change (abdag.watch.event_id)
            ("experiment", "LowCardinality(String)"),
            # verdict_changed | srm_fired | srm_cleared | decision
            ("kind", "LowCardinality(String)"),
            ("ts", TS),  # when the watcher saw the change
            ("before", "String"),
            ("after", "String"),
            ("body", "String"),  # the webhook's JSON body
            ("delivered", "UInt8"),  # 1 once the webhook answered 2xx
            ("attempts", "UInt16"),  # POSTs tried (0: none yet, or no webhook)
        ),
        # one row per event: the row written when its delivery ended replaces the first
        "ReplacingMergeTree(attempts)",
        "(experiment, event_id)",
    ),
    "schema_version": Table(
        "schema_version",
        (("version", "UInt32"), ("applied_ts", TS), ("note", "String")),
        "ReplacingMergeTree",
        "version",
    ),
}


def create_table_sql(name: str) -> str:
    """``CREATE TABLE IF NOT EXISTS`` for one declared table."""
    t = TABLES[name]
    cols = ",\n".join(f"    {c} {typ}" for c, typ in t.columns)
    return (
        f"CREATE TABLE IF NOT EXISTS {t.name} (\n{cols}\n) "
        f"ENGINE = {t.engine} ORDER BY {t.order_by}"
    )


def _existing_columns(client: Any, table: str) -> set[str]:
    rows = client.query(
        "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {t:String}",
        parameters={"t": table},
    ).result_rows
    return {r[0] for r in rows}


def schema_version(client: Any) -> int:
    """The highest schema version recorded in the current database (0 when none)."""
    if not _existing_columns(client, "schema_version"):
        return 0
    rows = client.query("SELECT max(version) FROM schema_version").result_rows
    return int(rows[0][0] or 0)


def columns(table: str) -> list[str]:
    """The column names of ``table`` in declared order: what its writers insert.

    >>> columns("metric_snapshots")
    ['experiment', 'ts', 'worker', 'partition', 'model', 'metric', 'value', 'n']
    """
    return [name for name, _ in TABLES[table].columns]


def ensure_schema(client: Any) -> None:
    """Create or migrate (additively) every table; safe to call from each worker at start."""
    for name, table in TABLES.items():
        client.command(create_table_sql(name))
        missing = [(c, t) for c, t in table.columns if c not in _existing_columns(client, name)]
        for col, typ in missing:
            client.command(f"ALTER TABLE {name} ADD COLUMN IF NOT EXISTS {col} {typ}")
    if schema_version(client) < SCHEMA_VERSION:
        client.command(
            "INSERT INTO schema_version (version, applied_ts, note) "
            f"VALUES ({SCHEMA_VERSION}, now64(3), 'ensure_schema')"
        )


DEAD_LETTER_COUNT = "uniqExactIf((node, source), source != '') + sumIf(count, source = '')"
"""How many events were dead-lettered, in SQL: a consumed event read twice (a re-delivery
after a rebalance or crash) is dead-lettered twice with the same ``source`` (topic/
partition/offset, and ``#index`` for a record of a pack) and counts once; a letter with no
source (a refused sink row) counts as written."""


def pairs_source(final: bool = True) -> str:
    """A deduplicated ``pairs`` source to put after ``FROM``.

    ``final=True`` gives ``pairs FINAL``. ``final=False`` gives a ``GROUP BY`` subquery that
    keeps, per (experiment, request_id), the row with the highest ``(stage, paired_ts)``
    (``argMax``): useful where ``FINAL`` is not wanted, e.g. inside a materialised view.

    >>> pairs_source()
    'pairs FINAL'
    >>> "argMax(label, _v) AS label" in pairs_source(final=False)
    True
    """
    if final:
        return PAIRS_DEDUP
    keys = ("experiment", "request_id")
    cols = ", ".join(f"argMax({c}, _v) AS {c}" for c, _ in PAIRS_COLUMNS if c not in keys)
    # The version key is a column of an inner query: an alias would be substituted into
    # the other argMax calls and nest aggregates (ILLEGAL_AGGREGATION).
    return (
        f"(SELECT experiment, request_id, {cols} FROM "
        "(SELECT *, (stage, paired_ts) AS _v FROM pairs) GROUP BY experiment, request_id)"
    )
