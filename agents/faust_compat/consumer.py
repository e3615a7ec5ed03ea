"""The Faust consumer abdag workers use: after an assignment, the first event handed to an
agent on each partition with a committed offset is the one at that offset, never a later one.

Why: in faust 0.15.3 a new assignment resumes the flow of events to read table changelogs
before it seeks the stream partitions to their committed offsets, so records of those
partitions reach agents before the seek and can keep arriving after it. Faust then takes
the distance between the committed offset and such a record for a gap in the log (as
left by transaction markers or compaction) and marks the offsets in between as done
without processing them. Measured on the embedded broker: a worker restarted after ``kill -9``
lost 1 to 24 requests of 2,000 in about one run in four.

What this consumer does:

- every assignment stops the flow until recovery has seeked and resumed it (Faust does so
  when partitions are revoked, but a fresh worker has nothing to revoke);
- after the seek to offset ``C``, a record above ``C`` arriving first is dropped and the
  partition fetched again from ``C``. If the log really has no record at ``C`` (a
  transaction marker), the same record comes first again; after ``RESEEKS`` tries it is
  taken as a real gap.

A partition with nothing committed yet had the same problem in another form: the client does
not seek it at all, so records Faust had buffered before the assignment and cleared when the
flow resumed were never read again. Such a partition is now seeked to its first offset.

Last, Faust drops a record it is delivering when the flow stops (and clears the agents'
queues when the flow resumes) but still counts it as read, and commits past one such record
once its neighbours are acknowledged (it allows a hole of one offset at the committed one).
A worker taking over partitions skipped one label or request in about one run in ten that
way. Here a commit never goes past a record that was not acknowledged; if later records
are and the hole stays ``REFETCH_AFTER`` seconds (the partition's agent works in offset
order, so the record was lost on the way), the partition is read again from the hole.
Re-delivered records are harmless downstream (the join recognises them).

On Tansu the consumer also reads a changelog's end from a fetch (see
:func:`fetched_end_offsets`): Tansu's ListOffsets answers the first offset of the last
record batch + 1, so Faust's table recovery stopped short of the end whenever the producer
had batched records.

Last, speed: Faust hands each fetched record to the agents' queues by racing the hand-over
against "flow stopped" with ``wait_first``, which schedules four tasks and cancels three per
record. The hand-over almost never waits (only when an agent's queue is full or the flow is
stopped), so :meth:`ResumeAtCommittedConsumer.wait_first` runs it at once and races only
the rest of one that has to wait. A py-spy profile of a worker reading a backlog put the
race at about a third of its CPU.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Mapping,
)
from dataclasses import replace
from typing import Any

from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.types import TP, Message
from mode.services import WaitResults

from abdag.agents.config import FetchWait

log = logging.getLogger("abdag.consumer")
RESEEKS = 3
REFETCH_AFTER = 5.0  # seconds an unacknowledged record may trail acknowledged ones


class _ConsumerThread(AIOKafkaConsumerThread):
    """Faust's consumer thread with the broker's fetch wait set by abdag, short while
    records flow and long when idle (see :class:`abdag.agents.config.FetchWait`)."""

    fetch_wait: FetchWait | None = None
    _assigned_raw: Any = None
    _assigned: frozenset[TP] = frozenset()

    def assignment(self) -> frozenset[TP]:  # type: ignore[override]
        """The assigned partitions, converted once per assignment.

        Faust converts the client's whole assignment to a new set on every call, and its
        commit calls this once per offset committed: with 50 comparisons in one DAG (~200
        partitions) that was a fifth of a busy worker's CPU (py-spy). The client keeps one
        frozenset per assignment, so its identity says when to convert again."""
        raw = self._ensure_consumer().assignment()
        if raw is not self._assigned_raw:
            self._assigned = frozenset(TP(tp.topic, tp.partition) for tp in raw)
            self._assigned_raw = raw
        return self._assigned

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        if self.fetch_wait is not None:
            # read by the client when it starts its fetcher; Faust hard-codes 1500 ms
            consumer._fetch_max_wait_ms = self.fetch_wait.idle_ms
        return consumer

    async def _fetch_records(self, consumer: Any, *args: Any, **kwargs: Any) -> Any:
        records = await super()._fetch_records(consumer, *args, **kwargs)
        if self.fetch_wait is not None and consumer._fetcher is not None:
            # the fetcher reads it again for every fetch request it builds
            consumer._fetcher._fetch_max_wait_ms = self.fetch_wait.after_fetch(
                bool(records), time.monotonic()
            )
        return records


def start_eagerly(coro: Coroutine[Any, Any, Any]) -> tuple[bool, Any]:
    """Run ``coro`` in the caller's turn of the event loop until it first waits.

    Returns ``(True, result)`` if it finished (its exception propagates), else
    ``(False, rest)``: awaiting ``rest`` (or a task made of it) carries the coroutine on
    from where it waited, cancellation included.

    >>> async def quick():
    ...     return 42
    >>> start_eagerly(quick())
    (True, 42)
    """
    try:
        pending = coro.send(None)
    except StopIteration as done:
        return True, done.value
    return False, _Resumed(coro, pending)


def _close(coros: Iterable[Any]) -> None:
    """Close coroutines that will never run (no "never awaited" warning)."""
    for c in coros:
        if inspect.iscoroutine(c):
            c.close()


class _Resumed:
    """The rest of a coroutine that was stepped by hand until it suspended on ``pending``
    (what it yielded to the event loop): awaiting this resumes it where it stopped."""

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any) -> None:
        self.coro, self.pending = coro, pending

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, out = self.coro, self.pending
        while True:
            try:
                sent = yield out
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - cancellation goes on to the coroutine
                try:
                    out = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    out = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


class ResumeAtCommittedConsumer(AIOKafkaConsumer):
    """An aiokafka-driven Faust consumer that resumes exactly at the committed offsets."""

    fetch_wait: FetchWait | None = None
    end_offsets_from_fetch: bool = False  # the broker's ListOffsets(latest) undercounts
    before_commit: Callable[[], Awaitable[None]] | None = None

    async def _commit(self, offsets: Mapping[TP, int]) -> bool:
        """Commit once ``before_commit`` allows it; if it fails, crash rather than commit
        past events whose output was lost (they are read again from the last commit)."""
        if self.before_commit is not None:
            try:
                await self.before_commit()
            except Exception as exc:  # noqa: BLE001 - any failure: do not commit
                log.error("offsets not committed: %s; stopping the worker", exc)
                await self.crash(exc)
                return False
        return await super()._commit(offsets)

    async def highwaters(self, *partitions: TP) -> Mapping[TP, int]:
        listed = await super().highwaters(*partitions)
        if not self.end_offsets_from_fetch or not listed:
            return listed
        bootstrap = ",".join(f"{url.host}:{url.port}" for url in self.app.conf.broker)
        return await fetched_end_offsets(bootstrap, listed)

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        thread = _ConsumerThread(self, loop=self.loop, beacon=self.beacon)
        thread.fetch_wait = replace(self.fetch_wait) if self.fetch_wait else None
        return thread

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume_at: dict[TP, int] = {}
        self._reseeks: dict[TP, int] = {}
        self._start: dict[TP, int] = {}  # where a partition with no commit was resumed
        self._holes: dict[TP, tuple[int, float]] = {}  # offset not acknowledged, since when
        self._refetches: set[Any] = set()  # seek tasks in flight (the loop keeps weak refs)

    async def wait_first(self, *coros: Any, timeout: Any = None) -> WaitResults:
        """Faust's ``wait_first``, except that a coroutine given first runs at once: if it
        finishes without waiting, nothing is scheduled and the others are never started.

        Faust's consumer calls ``wait_first(deliver(record), suspend_flow.wait())`` per
        record; delivering waits only when an agent's queue is full or the flow is stopped,
        and then the race goes on from where the delivery stopped.
        """
        first = coros[0] if coros else None
        if not inspect.iscoroutine(first):
            return await super().wait_first(*coros, timeout=timeout)
        try:
            finished, outcome = start_eagerly(first)
        except BaseException:
            _close(coros[1:])
            raise
        if finished:
            _close(coros[1:])
            if self._stopped.is_set() or self._crashed.is_set():
                return WaitResults([], [], True)
            return WaitResults([first], [outcome], False)
        won = await super().wait_first(outcome, *coros[1:], timeout=timeout)
        return won._replace(done=[first if w is outcome else w for w in won.done])

    async def on_partitions_assigned(self, assigned: Any, generation_id: int = 0) -> None:
        if self.flow_active:
            self.stop_flow()  # recovery resumes it after seeking to the committed offsets
        await super().on_partitions_assigned(assigned, generation_id)

    async def on_partitions_revoked(self, revoked: Any) -> None:
        for tp in revoked:
            self._resume_at.pop(tp, None)
            self._reseeks.pop(tp, None)
            self._start.pop(tp, None)
            self._holes.pop(tp, None)
        await super().on_partitions_revoked(revoked)

    async def seek_to_committed(self) -> Mapping[TP, int]:
        committed = await super().seek_to_committed()
        acked_topics = self.app.topics.acks_enabled_for
        uncommitted = [
            tp
            for tp, offset in committed.items()
            if not (offset and offset > 0) and acked_topics(tp.topic)
        ]
        first = await self._first_offsets(uncommitted)
        for tp, offset in first.items():
            await self._seek(tp, offset)  # the client seeks only where a commit exists
            self._start[tp] = offset
        for tp, offset in {**committed, **first}.items():
            if offset is not None and offset >= 0 and acked_topics(tp.topic):
                self._resume_at[tp] = offset
                self._reseeks[tp] = 0
        return committed

    async def _first_offsets(self, tps: list[TP]) -> dict[TP, int]:
        if not tps:
            return {}
        try:
            return dict(await self.earliest_offsets(*tps))
        except Exception as exc:  # the fetch position stays where the client put it
            log.warning("could not read first offsets of %d partitions: %s", len(tps), exc)
            return {}

    def _new_offset(self, tp: TP) -> int | None:
        committed = self._committed_offset[tp]
        start = committed if committed is not None else self._start.get(tp)
        acked = self._acked[tp]
        hole = acked and start is not None and min(acked) > start
        if hole and not self._gap[tp].overlaps(start):
            self._refetch_if_lost(tp, start)
            return None  # the record at ``start`` is not done yet
        self._holes.pop(tp, None)
        return super()._new_offset(tp)

    def _refetch_if_lost(self, tp: TP, offset: int) -> None:
        now = time.monotonic()
        hole, since = self._holes.setdefault(tp, (offset, now))
        if hole != offset:
            self._holes[tp] = (offset, now)
        elif now - since >= REFETCH_AFTER and tp not in self._resume_at:
            log.warning(
                "%s: record %d was not processed but later ones were; reading again from it",
                tp,
                offset,
            )
            self._holes[tp] = (offset, now)
            self._resume_at[tp] = offset
            self._reseeks[tp] = 0
            task = self.loop.create_task(self._seek(tp, offset))
            self._refetches.add(task)
            task.add_done_callback(self._refetches.discard)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        reseeked: set[TP] = set()
        async for tp, message in super().getmany(timeout):
            expected = self._resume_at.get(tp)
            if expected is not None and message.offset > expected:
                if self._reseeks[tp] < RESEEKS:
                    if tp not in reseeked:  # once per fetch: the rest of it is stale too
                        reseeked.add(tp)
                        self._reseeks[tp] += 1
                        await self._seek(tp, expected)
                    continue
                log.warning(
                    "%s: no record at committed offset %d, resuming at %d",
                    tp,
                    expected,
                    message.offset,
                )
                self._gap[tp].addi(expected, message.offset)
            if expected is not None and message.offset >= expected:
                del self._resume_at[tp]
                self._read_offset[tp] = message.offset  # Faust drops records below it
            yield tp, message


async def fetched_end_offsets(
    bootstrap: str, listed: Mapping[Any, int | None], timeout: float = 10.0
) -> dict[Any, int | None]:
    """The end offsets of ``listed``'s partitions as a fetch response states them.

    ``listed``: what ListOffsets(latest) answered. On Tansu that is the first offset of the
    partition's last record batch + 1; a fetch from that batch returns the real end (the
    high watermark) with it. Partitions the fetch does not answer within ``timeout`` keep
    the listed value (logged).
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    ends = dict(listed)
    probe = {TopicPartition(tp.topic, tp.partition): tp for tp, end in listed.items() if end}
    if not probe:
        return ends
    client = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100
    )
    await client.start()
    try:
        client.assign(list(probe))
        for tp, key in probe.items():
            client.seek(tp, listed[key] - 1)
        waiting, deadline = set(probe), time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            await client.getmany(*waiting, timeout_ms=200)
            for tp in list(waiting):
                highwater = client.highwater(tp)
                if highwater is not None:
                    ends[probe[tp]] = max(highwater, listed[probe[tp]] or 0)
                    waiting.discard(tp)
        if waiting:
            log.warning("end offsets of %s not fetched: using the broker's listed ones", waiting)
    finally:
        await client.stop()
    return ends


def use_resume_at_committed_consumer(
    app: Any,
    *,
    fetch_wait: FetchWait | None = None,
    end_offsets_from_fetch: bool = False,
    before_commit: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Make ``app`` create :class:`ResumeAtCommittedConsumer` (call before it starts).

    ``fetch_wait``: how long the broker may hold a fetch that finds no new records (Faust
    fixes it at 1500 ms, which on Tansu delayed each hop of the DAG by ~380 ms; see
    :class:`abdag.agents.config.FetchWait`). ``end_offsets_from_fetch``: read
    changelog ends with :func:`fetched_end_offsets` (Tansu). ``before_commit``: awaited
    before every offset commit; if it raises, nothing is committed and the worker crashes
    (``abdag.agents.producer``: the agents' records must be delivered first).
    """
    consumer = type(
        "ResumeAtCommittedConsumer",
        (ResumeAtCommittedConsumer,),
        {
            "fetch_wait": fetch_wait,
            "end_offsets_from_fetch": end_offsets_from_fetch,
            "before_commit": staticmethod(before_commit) if before_commit else None,
        },
    )
    app.transport.Consumer = consumer
