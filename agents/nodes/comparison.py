"""The comparison kind (the signal comparison node): A against B on the same requests.

It joins A's and B's outputs by request id, attaches the label whenever it comes, keeps the
live metrics and writes one pair row per request (``abdag.comparators.comparison``); its
served answers go to ``abdag.<dag>.<comparison>.served``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from abdag.agents.nodes.base import Node
from abdag.comparators.comparison import LABEL, TICK, A, B, ComparisonState, Incoming
from abdag.comparators.rows import experiment_name
from abdag.comparators.tasks import DEFAULT_THRESHOLD, TASK_SPECS, TASKS
from abdag.topics import node_topic, pairs_topic, served_topic, snapshots_topic
from abdag.topics.packs import Packed

if TYPE_CHECKING:
    from abdag.agents.app import DagRuntime
    from abdag.agents.dag import Dag
    from abdag.topics import Event


@dataclass(eq=False)
class Comparison(Node):
    """The signal comparison node: A against B on the same requests, with labels if any."""

    a: str = ""
    b: str = ""
    labels: str | None = None
    task: str = "binary"
    metrics: list[str] | None = None
    join_timeout: float = 30.0
    label_timeout: float = 3600.0
    margin: float = 0.0
    snapshot_every: int = 1000
    snapshot_interval: float = 5.0
    mode: str = "shadow"  # 'shadow' | 'split': who serves, see abdag.comparators.decisions
    split: float = 0.0
    # shadow mode: B scores only this stable share of the requests (mirror_consumers, and
    # abdag.comparators.decisions.mirrored); the others are served by A and not compared
    mirror: float = 1.0
    group: str = ""  # champion-and-challengers group this comparison belongs to
    group_size: int = 1
    # payload fields (names) and bucketed features ({name: fn(payload)}) each pair row
    # records in its ``segments`` map; see segment_specs and abdag.comparators.segments
    segments: list[str | dict[str, Callable[[dict], Any]]] | dict | None = None
    # when B is promoted or pulled back automatically (abdag.comparators.policy.Policy)
    policy: Any = None

    kind = "comparison"
    writes_pairs = True

    def ticks_topic(self, dag_name: str) -> str:
        """Where the node's expiry ticks travel to the owner of a request's partition."""
        return f"abdag.{dag_name}.{self.name}.ticks"

    def topics(self, dag: Dag) -> list[str]:
        return [self.ticks_topic(dag.name), served_topic(dag.name, self.name)]

    def check(self, dag: Dag) -> None:
        if self.a == self.b:
            raise self.fail(dag, "a and b are the same node")
        for side in (self.a, self.b):
            if dag.nodes[side].kind != "model":
                raise self.fail(dag, f"{side!r} is not a model node")
        if self.labels and dag.nodes[self.labels].kind != "labels":
            raise self.fail(dag, f"labels {self.labels!r} is not a label source (dag.labels)")
        if self.task not in TASKS:
            raise self.fail(dag, f"task must be one of {TASKS}, got {self.task!r}")
        if self.metrics is not None:
            from abdag.comparators.metric_specs import specs_for

            try:
                specs_for(self.task, self.metrics)
            except ValueError as exc:
                raise self.fail(dag, str(exc)) from None
        if not (self.join_timeout > 0 and self.label_timeout > 0):
            raise self.fail(dag, "join_timeout and label_timeout must be > 0 seconds")
        if self.mode not in ("shadow", "split"):
            raise self.fail(dag, f"mode must be 'shadow' or 'split', got {self.mode!r}")
        if not 0.0 <= self.split <= 1.0:
            raise self.fail(dag, f"split must be a share in [0, 1], got {self.split!r}")
        if self.margin < 0:
            raise self.fail(dag, f"margin must be >= 0, got {self.margin}")
        self._check_mirror(dag)
        self._check_policy(dag)
        try:
            self.segment_specs()
        except ValueError as exc:
            raise self.fail(dag, str(exc)) from None
        expected = TASK_SPECS[self.task].outputs
        for side in (self.a, self.b):
            out = dag.nodes[side].output
            if out not in expected:
                raise self.fail(
                    dag,
                    f"task {self.task!r} needs {side!r} to output one of {expected}, it "
                    f"outputs {out!r}",
                )

    def _check_policy(self, dag: Dag) -> None:
        """``policy``: None or a valid :class:`abdag.comparators.policy.Policy`."""
        from abdag.comparators.policy import Policy

        p = self.policy
        if p is None:
            return
        if not isinstance(p, Policy):
            raise self.fail(
                dag, f"policy must be abdag.Policy(...) or None, got {type(p).__name__}"
            )
        problems = p.problems()
        if problems:
            raise self.fail(dag, "policy: " + "; ".join(problems))
        if p.promote_on and not self.labels:
            raise self.fail(
                dag,
                f"policy: promote_on={p.promote_on!r} needs a verdict, which needs labels "
                "(dag.compare(labels=...))",
            )

    def _check_mirror(self, dag: Dag) -> None:
        """``mirror``: a share in (0, 1]; below 1, shadow mode only, and B feeds nothing
        but this comparison (it skips the other requests, which no other node could use)."""
        m = self.mirror
        if isinstance(m, bool) or not isinstance(m, int | float) or not 0.0 < m <= 1.0:
            raise self.fail(dag, f"mirror must be a share in (0, 1], got {m!r}")
        if m == 1.0:
            return
        if self.mode != "shadow":
            raise self.fail(
                dag,
                f"mirror={m:g} needs mode='shadow': in a split, B serves a share of the "
                "requests and must score every one it may serve",
            )
        others = mirror_consumers(dag, self.b, self.name)
        if others:
            raise self.fail(
                dag,
                f"mirror={m:g}: model {self.b!r} scores only {100 * m:.4g}% of the requests, so it "
                f"can feed only this comparison, and it also feeds {others}; compare a "
                "separate copy of the model, or use mirror=1.0",
            )

    def segment_specs(self) -> tuple[tuple[str, Callable[[dict], Any] | None], ...]:
        """The declared segments as ``(name, bucket function or None)``, in order: None
        for a payload field (the row records ``str(payload[name])``). Raises ValueError
        saying what is wrong with ``segments``."""
        return segment_specs(self.segments)

    def dry_run(self, dag: Dag, events: dict[str, Event | None]) -> None:
        """Try each bucket function on the sample event's payload, as A's event brings it."""
        sample = events.get(self.a) or events.get(self.b)
        if sample is None:
            return None
        for name, fn in self.segment_specs():
            if fn is None:
                continue
            try:
                fn(sample.payload)
            except Exception as exc:  # noqa: BLE001 - any error of the user's function
                raise self.fail(
                    dag,
                    f"segment {name!r} failed on the sample event: {type(exc).__name__}: {exc}",
                ) from None
        return None

    def build(self, rt: DagRuntime) -> None:
        _comparison_agents(rt, self)


def mirror_consumers(dag: Dag, model: str, comparison: str) -> list[str]:
    """The nodes other than ``comparison`` that read ``model`` (sorted)."""
    return sorted(n.name for n in dag.nodes.values() if n.name != comparison and model in n.inputs)


SEGMENT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")
"""A segment's name: a payload field or a bucket's name (a key of the rows' ``segments``)."""


def segment_specs(segments: Any) -> tuple[tuple[str, Callable[[dict], Any] | None], ...]:
    """``dag.compare(segments=...)`` as ``(name, fn or None)`` pairs; ValueError if malformed.

    ``segments``: a list whose items are payload field names (``"country"``) or dicts of
    bucketed features (``{"amount_bucket": fn}``, ``fn(payload) -> str``); a dict alone is
    taken as a list of one.

    >>> [name for name, _ in segment_specs(["country", {"big": lambda p: p["amount"] > 100}])]
    ['country', 'big']
    >>> segment_specs("country")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: segments must be a list ... (write segments=['country'])
    """
    if segments is None:
        return ()
    if isinstance(segments, str):
        raise ValueError(
            "segments must be a list of payload field names and/or {name: function} dicts, "
            f"got the string {segments!r} (write segments=[{segments!r}])"
        )
    items = [segments] if isinstance(segments, dict) else segments
    if not isinstance(items, list | tuple):
        raise ValueError(
            "segments must be a list of payload field names and/or {name: function} dicts, "
            f"got {type(segments).__name__}"
        )
    out: list[tuple[str, Callable[[dict], Any] | None]] = []
    for item in items:
        if isinstance(item, str):
            pairs: list[tuple[Any, Any]] = [(item, None)]
        elif isinstance(item, dict):
            pairs = list(item.items())
            for name, fn in pairs:
                if not callable(fn):
                    raise ValueError(
                        f"segment {name!r}: a bucketed segment needs a function of the payload "
                        f"(fn(payload) -> str), got {type(fn).__name__}"
                    )
        else:
            raise ValueError(
                "segments: each item is a payload field name or a {name: function} dict, "
                f"got {item!r} ({type(item).__name__})"
            )
        for name, fn in pairs:
            if not isinstance(name, str) or not SEGMENT_NAME.match(name):
                raise ValueError(
                    f"segment name {name!r} is not allowed: use letters, digits, '_', '.' or "
                    "'-' (at most 64 characters, not starting with '.' or '-')"
                )
            if any(name == seen for seen, _ in out):
                raise ValueError(f"segment {name!r} is declared twice")
            out.append((name, fn))
    return tuple(out)


# -- the worker side: the Faust agents of this kind -------------------------------------


def _threshold(rt: DagRuntime, model: str) -> float:
    """A model node's class threshold (a binary pair without a class gets one with it)."""
    return getattr(rt.dag.nodes[model], "threshold", DEFAULT_THRESHOLD)


def _packed(rows: Iterable[tuple[int, dict]], per_record: int) -> Iterator[tuple[int, list]]:
    """Rows grouped by partition, at most ``per_record`` to a list."""
    by_partition: dict[int, list[dict]] = {}
    for partition, row in rows:
        by_partition.setdefault(partition, []).append(row)
    for partition, group in by_partition.items():
        for k in range(0, len(group), per_record):
            yield partition, group[k : k + per_record]


def _comparison_agents(rt: DagRuntime, node: Comparison) -> None:
    """The comparison node: an agent that feeds its topics' records to a ComparisonState
    (abdag.comparators.comparison: the join, serving, metrics, snapshots) and sends what it
    gives back; a task that sends the expiry ticks it asks for; the periodic snapshots."""
    from abdag.agents.app import EXPERIMENT_COLUMNS, PAIR_ROWS_PER_RECORD, TAKE_MAX, TAKE_WITHIN
    from abdag.agents.faust_compat import Batches, JsonTable
    from abdag.agents.producer import OutRecord

    dag = rt.dag.name
    experiment = experiment_name(dag, node.name)
    sides = {node_topic(dag, node.a): A, node_topic(dag, node.b): B}
    if node.labels:
        sides[node_topic(dag, node.labels)] = LABEL
    tick_topic = f"abdag.{dag}.{node.name}.ticks"
    names = [*sides, tick_topic]
    source = rt.app.topic(*names, key_type=bytes, value_type=bytes, partitions=rt.dag.partitions)
    pairs_name, served_name = pairs_topic(dag), served_topic(dag, node.name)
    snaps_name = snapshots_topic(dag)
    table = rt.app.Table(
        f"{node.name}-join",
        partitions=rt.dag.partitions,
        key_type=bytes,
        value_type=bytes,
    )
    store = JsonTable(table)

    def route_writes(incoming: Incoming) -> None:
        store.event = incoming.source  # each held write goes to its event's partition

    state = ComparisonState(
        node,
        store,
        experiment=experiment,
        worker=rt.worker,
        thresholds=(_threshold(rt, node.a), _threshold(rt, node.b)),
        on_incoming=route_writes,
    )
    rt.controls[experiment] = state.control  # the decisions follower updates it

    def snapshot_records(due: list[tuple[int, list[dict]]]) -> list[tuple[bytes, bytes, None]]:
        return [(str(p).encode(), orjson.dumps(rows), None) for p, rows in due]

    @rt.app.agent(source, name=f"{node.name}-join")
    async def compare(stream):
        # A batch at a time: every record is decoded first (a dead letter for one that is not
        # JSON waits on the producer), then the state handles the batch with no await, so no
        # other task sees the table's writes held; they are one changelog record per request,
        # and the batch's sends (changelog first) are queued together. The batch is
        # acknowledged once its sends are queued (see Batches).
        async for events in Batches(stream, TAKE_MAX, TAKE_WITHIN):
            batch = []
            for e in events:
                msg = e.message
                if msg.topic == tick_topic:
                    rid = (e.key or b"").decode("utf-8", errors="replace")
                    batch.append(Incoming(TICK, msg.partition, (Packed(rid, None),), e))
                else:
                    records = await rt.records(node.name, e)
                    batch.append(Incoming(sides[msg.topic], msg.partition, records, e))
            out = state.process(batch, time.time)
            await rt.output.send_all(store.flush())
            for refused in out.refused:
                await rt.dead(node.name, refused.error, refused.incoming.source, refused.record)
            await rt.send(served_name, out.served)
            await rt.output.send_all(
                OutRecord(pairs_name, str(p).encode(), orjson.dumps(rows), None, p)
                for p, rows in _packed(out.pairs.values(), PAIR_ROWS_PER_RECORD)
            )
            await rt.send(snaps_name, snapshot_records(out.snapshots))

    @rt.app.task
    async def expiry_ticks() -> None:
        """Send a tick for each request the state says is due, to the owner of its
        partition (the agent above, there, expires it); look again when the state says."""
        while not rt.app.should_stop:
            due = state.ticks_due(time.time())
            if due:
                await rt.send(tick_topic, [(rid.encode(), b"{}", None) for rid in due])
            now = time.time()
            await rt.app.sleep(state.next_check(now) - now)

    @rt.app.timer(interval=node.snapshot_interval, name=f"{node.name}-snapshots")
    async def periodic_snapshots() -> None:
        due = state.snapshots_due(time.time())
        if due:
            await rt.send(snaps_name, snapshot_records(due))

    experiments_sink = rt.sink("experiments", EXPERIMENT_COLUMNS)

    @rt.app.task
    async def declare_experiment() -> None:
        """Record what the DAG says about this experiment (margin, group, mode, mirror,
        policy) for reports and policy evaluators."""
        from datetime import UTC, datetime

        row = [
            experiment,
            datetime.now(UTC),
            dag,
            node.name,
            node.group,
            node.group_size,
            node.a,
            node.b,
            node.task,
            node.mode,
            node.split,
            node.margin,
            ",".join(node.metrics or ()),  # what the report shows ('' = the task's defaults)
            float(node.mirror),  # the share of requests B scores (the report says it)
            node.policy.to_json() if node.policy is not None else "",  # for evaluators
        ]
        await rt.in_thread(experiments_sink.write, [row])
