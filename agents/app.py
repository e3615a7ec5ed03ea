"""Turning a :class:`~abdag.agents.dag.Dag` into a Faust app: one agent per node.

Data flows one way: input topic -> source agent (assigns the request id) -> node topics,
each request in the partition its id hashes to -> model agents -> comparison agent (join
table) -> pairs topic -> ClickHouse sink agent. Between nodes, what an agent sends from one
batch goes as one pack per partition (``abdag.topics.packs``): a Faust worker pays per Kafka
record, and at load a pack carries tens to hundreds of requests. Every agent sends what it
cannot process to the DAG's dead-letter topic with the reason, the node and the original
bytes (of the one refused record of a pack), counts it, and carries on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
import orjson

from abdag.agents.config import faust_settings, fetch_wait
from abdag.agents.dag import Dag
from abdag.agents.faust_compat import (
    Batches,
    raw_topic,
    use_resume_at_committed_consumer,
)
from abdag.agents.producer import DEFAULT_MAX_RECORD_BYTES, OutputProducer, OutRecord
from abdag.clickhouse import connect
from abdag.comparators.rows import (
    PAIR_COLUMNS,
    SNAPSHOT_COLUMNS,
    to_insert_values,
)
from abdag.comparators.schema import columns
from abdag.comparators.sink import ClickHouseSink
from abdag.settings import Settings
from abdag.topics import (
    BadRecord,
    DeadLetter,
    Event,
    Label,
    dead_letter_topic,
    decode_dead_letter,
    encode,
    input_topic,
    node_topic,
    pairs_topic,
    snapshots_topic,
)
from abdag.topics.packs import Headers, Packed, is_pack, packs_by_partition, partition_for, unpack
from abdag.topics.records import MAX_EVENT_BYTES

log = logging.getLogger("abdag.worker")
INLINE_BELOW_MS = 2.0  # a model node infers a batch this quick on the event loop
TAKE_MAX = 500
TAKE_WITHIN = 0.05
# Records an input agent may have waiting (Faust's default is 4096 per agent). Input topics
# carry one request or label per record; Faust stops fetching a partition at 80% of this and
# resumes at 40%, and with 4096 the fetcher stalled between pauses on a backlog
# (docs/design-notes.md). Node topics carry packs of up to 1000 records: Faust's default.
INPUT_BUFFER = 16384
# The pairs topic carries lists of rows (one record per partition and batch, not per pair:
# it only feeds the ClickHouse sink); 200 rows stay well under Kafka's 1 MB record limit.
PAIR_ROWS_PER_RECORD = 200
# The largest record abdag sends by design: one event of up to MAX_EVENT_BYTES, alone in its
# pack, with the outputs of the models before it. A broker that takes less is refused at
# start-up (abdag.agents.producer.record_limit); anything larger is dead-lettered.
REQUIRED_RECORD_BYTES = MAX_EVENT_BYTES + 64 * 1024
EXPERIMENT_COLUMNS = columns("experiments")
DEAD_LETTER_COLUMNS = columns("dead_letters")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class DagRuntime:
    """Holds what the agents of one DAG share: topics, dead-letter counts, the sinks."""

    def __init__(
        self, dag: Dag, settings: Settings, *, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    ) -> None:
        self.dag = dag
        self.settings = settings
        self.app_id = f"abdag-{dag.name}"
        self.app = faust.App(
            self.app_id, **faust_settings(settings, partitions=dag.partitions, app_id=self.app_id)
        )
        self.worker = worker_name()
        self.dead_counts: Counter[tuple[str, str]] = Counter()
        self.stop = threading.Event()
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="abdag")
        self.dead_topic = self.topic(dead_letter_topic(dag.name))
        self.output = OutputProducer(
            settings.broker,
            max_record_bytes=max_record_bytes,
            on_refused=self._too_large,
            # librdkafka logs through Python (not straight to stderr), so the broker watch
            # can hold back its repeats while a broker is away
            config={"logger": logging.getLogger("abdag.rdkafka")},
        )
        # experiment -> who serves ({"promoted": bool, "retired": bool}), per decisions
        self.controls: dict[str, dict[str, bool]] = {}
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        # -- broker restarts (agents/broker_watch.py): no offsets of a lost broker committed
        from abdag.agents.broker_watch import register as watch_broker

        self.broker_watch = watch_broker(self.app, settings, dag)
        # --
        use_resume_at_committed_consumer(
            self.app,
            fetch_wait=fetch_wait(settings),
            end_offsets_from_fetch=settings.broker_kind == "tansu",
            before_commit=self.broker_watch.guard(self.output.delivered),
        )
        self.app.service(_Stopper(self))

    async def send(self, topic: str, items: Iterable[tuple[bytes, bytes, Any]]) -> None:
        """Queue ``(key, value, headers)`` records for ``topic`` (see abdag.agents.producer)."""
        await self.output.send_all(OutRecord(topic, k, v, h) for k, v, h in items)

    async def send_packed(self, topic: str, entries: Iterable[tuple[int, bytes, Headers]]) -> None:
        """Queue ``(partition, encoded record, headers)`` entries for a node topic, as one
        pack per partition (``abdag.topics.packs``)."""
        await self.output.send_all(
            OutRecord(topic, None, value, None, partition)
            for partition, value in packs_by_partition(entries)
        )

    def input_agent(
        self, node: Any, read: Callable[[Any, float], Event | Label], agent: str
    ) -> None:
        """The agent of an input topic (a source's, a label source's): ``read(event, now)``
        turns each record users wrote into a record of the DAG (or raises BadRecord: a dead
        letter); the records go on to the node's topic, each placed by its request id."""
        out = node_topic(self.dag.name, node.name)
        inputs = self.topic(input_topic(self.dag.name, node.name), buffer=INPUT_BUFFER)

        @self.app.agent(inputs, name=agent)
        async def read_input(stream):
            async for events in Batches(stream, TAKE_MAX, TAKE_WITHIN):
                now = time.time()
                ready = []
                for e in events:
                    try:
                        record = read(e, now)
                    except BadRecord as err:
                        await self.dead(node.name, err, e)
                        continue
                    ready.append((self.partition_of(record.request_id), encode(record), e.headers))
                await self.send_packed(out, ready)

    def partition_of(self, request_id: str) -> int:
        """The partition of a request on every topic of the DAG."""
        return partition_for(request_id.encode(), self.dag.partitions)

    async def records(self, node: str, event: Any) -> list[Packed]:
        """The records a consumed event carries (a pack's, or the event's own); an event
        that is not even JSON is dead-lettered here and carries none."""
        try:
            return unpack(event.value, event.headers)
        except BadRecord as err:
            await self.dead(node, err, event)
            return []

    def topic(self, name: str, *, buffer: int | None = None) -> faust.TopicT:
        """The DAG's topic ``name`` as raw bytes; ``buffer``: how many of its records an
        agent may have waiting (Faust's ``stream_buffer_maxsize`` if None)
        (``abdag.agents.faust_compat.raw_topic``: ``app.topic`` would drop ``buffer``).
        """
        return raw_topic(self.app, name, partitions=self.dag.partitions, buffer=buffer)

    # -- dead letters ---------------------------------------------------------------------
    async def dead(
        self, node: str, err: BadRecord, event: Any, record: Packed | None = None
    ) -> None:
        """Dead-letter one consumed event (or one ``record`` of the pack it carried) with the
        reason; count it; never raise."""
        msg = event.message
        if record is None or record.index < 0:  # the whole Kafka record
            original = event.value if isinstance(event.value, bytes) else b""
            index = -1
        else:
            original, index = record.original(), record.index
        await self.dead_letter(node, err, original, msg.topic, msg.partition, msg.offset, index)

    async def dead_letter(
        self,
        node: str,
        err: BadRecord,
        original: bytes,
        topic: str = "",
        partition: int = -1,
        offset: int = -1,
        index: int = -1,
    ) -> None:
        letter = DeadLetter.of(
            self.dag.name,
            node,
            err.reason,
            err.detail[:2000],
            err.request_id,
            original=original,
            topic=topic,
            partition=partition,
            offset=offset,
            index=index,
            ts=time.time(),
        )
        self._count_dead(node, err.reason, err.detail)
        key = (err.request_id or "").encode()
        await self.send(self.dead_topic.get_topic_name(), [(key, encode(letter), None)])

    def _count_dead(self, node: str, reason: str, detail: str) -> None:
        count = self.dead_counts[(node, reason)] = self.dead_counts[(node, reason)] + 1
        if count in (1, 10, 100, 1000, 10000):
            log.warning(
                "node %s: %s (%s); %d so far, see topic %s",
                node,
                reason,
                detail[:200],
                count,
                self.dead_topic.get_topic_name(),
            )

    def _too_large(self, record: OutRecord, why: str) -> OutRecord | None:
        """The dead letter sent instead of an output record too large for the broker: one
        record's content must never stop the worker (see abdag.agents.producer)."""
        dead = self.dead_topic.get_topic_name()
        if record.topic == dead:
            return None  # cannot happen (letters are bounded); a failure if it does
        original = record.value or b""
        request_id = (record.key or b"").decode("utf-8", errors="replace")
        if not request_id and is_pack(original):
            try:
                ids = [str(r.body.get("request_id", "")) for r in unpack(original)]
            except (BadRecord, AttributeError):
                ids = []
            request_id = ids[0] if len(ids) == 1 else ""
            why += f"; a pack of {len(ids)} records" if len(ids) > 1 else ""
        node = record.topic.removeprefix(f"abdag.{self.dag.name}.")
        detail = f"output for {record.topic}: {why}"
        self._count_dead(node, "too large to send", detail)
        letter = DeadLetter.of(
            self.dag.name,
            node,
            "too large to send",
            detail,
            request_id,
            original=original,
            ts=time.time(),
        )
        return OutRecord(dead, request_id.encode(), encode(letter))

    async def write_rows(
        self, sink: ClickHouseSink, rows: list, origins: list[tuple[str, bytes]]
    ) -> None:
        """Insert rows; dead-letter the ones ClickHouse refuses (with its reason), each under
        the node and the record it came from (``origins``, one per row)."""
        rejected = await self.in_thread(sink.write, rows)
        index = {id(r): i for i, r in enumerate(rows)}
        for row, reason in rejected:
            i = index.get(id(row))
            node, original = origins[i] if i is not None else (sink.table, b"")
            err = BadRecord("sink refused", f"{sink.table}: {reason}")
            await self.dead_letter(node, err, original)

    def sink(self, table: str, columns: list[str]) -> ClickHouseSink:
        return ClickHouseSink(
            lambda: connect(self.settings),
            table,
            columns,
            on_connect=self.ensure_schema,
            stop=self.stop,
        )

    def ensure_schema(self, client: Any) -> None:
        """Create or migrate the tables once per worker (and again after a failure)."""
        from abdag.comparators.schema import ensure_schema

        with self._schema_lock:
            if not self._schema_ready:
                ensure_schema(client)
                self._schema_ready = True

    async def in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


class _Stopper(faust.Service):
    """When the worker stops: ends blocking sink retries, delivers the queued output."""

    def __init__(self, runtime: DagRuntime, **kwargs: Any) -> None:
        self.runtime = runtime
        super().__init__(**kwargs)

    async def on_stop(self) -> None:
        self.runtime.stop.set()
        self.runtime.output.close()


def build_app(
    dag: Dag, settings: Settings, *, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> tuple[faust.App, DagRuntime]:
    """Create the Faust app with one agent per node of ``dag`` (validated beforehand);
    ``max_record_bytes``: the largest output record (see abdag.agents.producer.record_limit)."""
    rt = DagRuntime(dag, settings, max_record_bytes=max_record_bytes)
    nodes = dag.topological()
    for node in nodes:
        node.build(rt)  # its kind's agents (abdag.agents.nodes)
    if any(node.writes_pairs for node in nodes):
        _result_sinks(rt)
        _decisions_follower(rt)
    _dead_letter_sink(rt)
    return rt.app, rt


def _result_sinks(rt: DagRuntime) -> None:
    """One pairs sink and one snapshots sink for all the DAG's comparisons, each reading the
    DAG's one topic of such rows (rows carry their experiment): with a sink per comparison,
    50 comparisons made ~100 small inserts/s."""
    dag = rt.dag.name
    pair_sink = rt.sink("pairs", PAIR_COLUMNS)
    snap_sink = rt.sink("metric_snapshots", SNAPSHOT_COLUMNS)

    def topic(name: str) -> Any:
        return rt.app.topic(name, key_type=bytes, value_type=bytes, partitions=rt.dag.partitions)

    def comparison(row: dict, sink: str) -> str:
        """The node a refused row came from, for its dead letter."""
        return str(row.get("experiment", "")).removeprefix(f"{dag}.") or sink

    @rt.app.agent(topic(pairs_topic(dag)), name="pairs-sink")
    async def write_pairs(stream):
        async for events in Batches(stream, 5000, 0.5):
            rows, origins = [], []
            for e in events:
                packed = orjson.loads(e.value)
                for r in packed if isinstance(packed, list) else [packed]:
                    rows.append(to_insert_values(r))
                    origins.append((comparison(r, "pairs-sink"), e.value))
            await rt.write_rows(pair_sink, rows, origins)

    @rt.app.agent(topic(snapshots_topic(dag)), name="snapshot-sink")
    async def write_snapshots(stream):
        async for events in Batches(stream, 1000, 1.0):
            rows, origins = [], []
            for e in events:
                for r in orjson.loads(e.value):
                    rows.append([r[c] for c in SNAPSHOT_COLUMNS])
                    origins.append((comparison(r, "snapshot-sink"), e.value))
            await rt.write_rows(snap_sink, rows, origins)


def _decisions_follower(rt: DagRuntime) -> None:
    """Follow promote/retire decisions of every comparison with one query every 2 s."""
    clients: dict[str, Any] = {}

    @rt.app.timer(interval=2.0, name="decisions")
    async def follow_decisions() -> None:
        try:
            decisions = await rt.in_thread(_latest_decisions, rt, list(rt.controls), clients)
        except Exception as exc:  # noqa: BLE001 - ClickHouse away: keep the last decisions
            log.debug("decisions not read: %s", exc)
            return
        for experiment, control in rt.controls.items():
            decision = decisions.get(experiment)
            promoted = decision is not None and decision.action == "promote"
            retired = decision is not None and decision.action == "retire"
            if (promoted, retired) != (control["promoted"], control["retired"]):
                state = "B serves" if promoted else ("B retired" if retired else "A serves")
                log.warning("%s: %s", experiment, state)
                control.update(promoted=promoted, retired=retired)


def _latest_decisions(rt: DagRuntime, experiments: list[str], clients: dict[str, Any]):
    """Read the newest decisions with the follower's own client (a ClickHouse session
    serves one query at a time; the sinks insert meanwhile)."""
    from abdag.comparators.decisions import latest_decisions

    client = clients.get("client")
    if client is None:
        client = connect(rt.settings)
        rt.ensure_schema(client)
        clients["client"] = client
    try:
        return latest_decisions(client, experiments)
    except Exception:
        clients.pop("client", None)
        raise


def _dead_letter_sink(rt: DagRuntime) -> None:
    sink = rt.sink("dead_letters", DEAD_LETTER_COLUMNS)

    @rt.app.agent(rt.dead_topic, name="dead-letter-sink")
    async def write_dead_letters(stream):
        async for events in Batches(stream, 1000, 1.0):
            values = [e.value for e in events]
            rows = []
            for v in values:
                try:
                    d = decode_dead_letter(v)
                except (BadRecord, KeyError, ValueError) as exc:
                    log.error("unreadable dead letter skipped: %s", exc)
                    continue
                row = [d.dag, d.node, d.reason, _dt(d.ts), d.request_id, d.detail, 1, d.source]
                row += [max(d.original_size, len(d.original)), d.original_sha256]
                rows.append(row)
            for row, reason in await rt.in_thread(sink.write, rows):
                log.error("ClickHouse refused a dead-letter row (%s): %s", reason, row)


def _dt(ts: float):
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, tz=UTC)
