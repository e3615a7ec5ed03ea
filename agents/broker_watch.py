"""Noticing that the broker lost the DAG's topics and committed offsets, and recovering.

The local broker keeps everything in memory (``abdag.stack.broker``): after a restart it
has no topics, no records and no committed offsets. Measured with faust-streaming 0.15.3,
a worker that simply carries on does not recover. Faust keeps every partition's read,
acknowledged and committed offsets in memory and, after re-joining the group, commits those
old offsets on the new broker, whose recreated topics start again at offset 0. Every
consumer of the group (this worker, and any worker started later) then waits silently until
the new log passes the old offsets: 857 of ~1,700 requests produced after a restart never
reached ClickHouse, and nothing said so. Topics nobody writes to stay missing, and aiokafka
retries the commit of their old offsets every ~100 ms (``UnknownTopicOrPartitionError`` is
retriable to it): ~1,000 ``OffsetCommit failed`` lines a minute, and a worker that no
longer stops on SIGTERM. A worker started next crashed within seconds on such a topic:
Tansu refused its writes there (``Unknown broker error``; ``AlreadyExists`` for the batch at
offset 0 in the broker's log).

So a worker registers :class:`BrokerWatch`. It records the broker's cluster id at start
(``abdag up`` makes it hold the broker's start time; Apache Kafka keeps its id as long as
its data) and checks, every few seconds and before every offset commit that follows a
rebalance, that the cluster id is the same and the DAG's topics are all there. The check
before a commit is what keeps old offsets off a new broker: they can only be committed after
the group is re-joined, and a re-join starts with a rebalance. When the broker lost them:

- one line says so, and what was lost;
- the DAG's topics are created again (as ``abdag topics`` makes them);
- a worker started by ``abdag worker`` restarts itself in place (same PID, same command
  line), so Faust starts fresh on the new broker and its tables are rebuilt there; at most
  :data:`RESUME_LIMIT` times in :data:`RESUME_WINDOW_S` seconds, then it stops;
- any other worker (or with ``ABDAG_ON_BROKER_LOSS=stop``) exits with code
  :data:`EXIT_BROKER_LOST` and that line.

While the broker does not answer, aiokafka logs each failed connection, fetch and commit
(dozens of lines a second): :class:`RepeatLimiter` lets one line per message and minute
through, and the watch says once that the broker is away and once that it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import faust

from abdag.settings import Settings
from abdag.stack.broker import started_at, workers_dir
from abdag.topics.admin import BrokerMetadata, BrokerUnreachable, admin_client, broker_metadata

log = logging.getLogger("abdag.broker")

CHECK_INTERVAL_S = 2.0  # the periodic check: one metadata request
COMMIT_CHECK_FRESH_S = 1.0  # a commit with no rebalance since reuses a check this recent
METADATA_TIMEOUT_S = 2.0
EXIT_BROKER_LOST = 75  # EX_TEMPFAIL: start the worker again
RESUME_LIMIT = 3
RESUME_WINDOW_S = 600.0
ENV_RESUMES = "ABDAG_BROKER_RESUMES"  # when this worker restarted itself (epoch seconds)
LIMITED_LOGGERS = (
    "aiokafka",
    "aiokafka.conn",
    "aiokafka.consumer.fetcher",
    "aiokafka.consumer.group_coordinator",
    "aiokafka.consumer.consumer",
    "aiokafka.producer.sender",
    "faust.transport.drivers.aiokafka",
    "abdag.rdkafka",  # the output producer's librdkafka log (abdag.agents.producer)
)


class RepeatLimiter(logging.Filter):
    """Lets through one record per logger and message template every ``interval`` seconds
    (WARNING and above; lower levels pass); the next one let through says how many were
    held back.

    >>> f = RepeatLimiter(interval=60, clock=lambda: 0.0)
    >>> rec = lambda: logging.makeLogRecord({"msg": "Unable connect to node %s", "args": (1,),
    ...                                      "levelno": logging.ERROR, "name": "aiokafka"})
    >>> [f.filter(rec()) for _ in range(3)]
    [True, False, False]
    """

    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.interval, self.clock = interval, clock
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.msg} [{held} more like this in the last {self.interval:.0f} s]"
        return True


_LIMITER = RepeatLimiter()


def limit_repeated_broker_errors() -> None:
    """Attach :class:`RepeatLimiter` to the loggers that repeat themselves while the broker
    is away (idempotent). Filters on a logger survive Faust's logging setup."""
    for name in LIMITED_LOGGERS:
        logger = logging.getLogger(name)
        if _LIMITER not in logger.filters:
            logger.addFilter(_LIMITER)


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


class BrokerWatch(faust.Service):
    """Checks that the broker still has the DAG's topics and the storage they were made in
    (see the module docstring); ``topics``: the DAG's topics (``abdag.agents.topology``)."""

    def __init__(
        self,
        settings: Settings,
        dag_name: str,
        topics: list[str],
        partitions: int,
        *,
        rebalances: Callable[[], int] = lambda: 0,
        stopping: Callable[[], bool] = lambda: False,
        **kwargs: Any,
    ) -> None:
        self.settings = settings
        self.dag_name = dag_name
        self.topics = list(topics)
        self.partitions = partitions
        self.rebalances = rebalances
        self.stopping = stopping
        self.bootstrap = settings.broker
        self.cluster_id: str | None = None
        self.since = time.time()
        self._admin: Any = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="abdag-broker")
        self._thread_closed = False  # on_stop ran: checks pass (the final commit goes on)
        self._lock = asyncio.Lock()
        self._checked_ok = float("-inf")
        self._checked_rebalances = -1
        self._away_since: float | None = None
        self._resumed_after: float | None = None
        self._record = workers_dir(settings.run_dir()) / f"{os.getpid()}.json"
        limit_repeated_broker_errors()
        super().__init__(**kwargs)

    # -- the checks ------------------------------------------------------------------------
    def _metadata(self) -> BrokerMetadata | None:
        if self._admin is None:
            self._admin = admin_client(self.bootstrap)
        try:
            return broker_metadata(self._admin, self.bootstrap, METADATA_TIMEOUT_S)
        except BrokerUnreachable:
            return None

    def lost_because(self, meta: BrokerMetadata) -> str | None:
        """Why the broker no longer holds what the DAG made on it, or None if it does."""
        if self.cluster_id is not None and meta.cluster_id != self.cluster_id:
            since = started_at(meta.cluster_id)
            if since is not None:
                return f"it restarted at {_clock(since)}; the local broker keeps them in memory"
            return (
                f"its cluster id changed from {self.cluster_id} to {meta.cluster_id}: "
                "a new cluster, or one whose storage was wiped"
            )
        missing = [t for t in self.topics if t not in meta.topics]
        if missing:
            return (
                f"{len(missing)} of the DAG's {len(self.topics)} topics are gone, e.g. "
                f"{missing[0]}; it restarted or they were deleted"
            )
        return None

    async def check(self) -> bool:
        """One metadata request; False if the broker did not answer. Never returns if the
        broker lost the DAG's topics (the worker restarts or stops, see :meth:`on_lost`)."""
        if self._thread_closed:  # a stopping worker's final commit: nothing to check with
            return True
        async with self._lock:
            rebalances = self.rebalances()
            meta = await asyncio.get_running_loop().run_in_executor(self._thread, self._metadata)
            if meta is None:
                if self._away_since is None:
                    self._away_since = time.time()
                    log.warning(
                        "broker at %s does not answer; waiting for it (the local one: "
                        "abdag up). Repeated connection errors are shown once a minute",
                        self.bootstrap,
                    )
                return False
            if self._away_since is not None:
                log.warning(
                    "broker at %s answers again after %.0f s",
                    self.bootstrap,
                    time.time() - self._away_since,
                )
                self._away_since = None
            if self.cluster_id is None:  # the broker was away when the worker started
                self.cluster_id = meta.cluster_id
                self._write_record("running")
            why = self.lost_because(meta)
            if why is not None:
                self.on_lost(why)
            self._checked_ok = time.monotonic()
            self._checked_rebalances = rebalances
            return True

    def guard(
        self, before_commit: Callable[[], Awaitable[None]] | None
    ) -> Callable[[], Awaitable[None]]:
        """``before_commit`` followed by a check of the broker, for the consumer's commit
        gate (``abdag.agents.faust_compat.consumer``): offsets of a lost broker are never
        committed."""

        async def before_commit_then_check() -> None:
            if before_commit is not None:
                await before_commit()
            fresh = time.monotonic() - self._checked_ok < COMMIT_CHECK_FRESH_S
            if fresh and self.rebalances() == self._checked_rebalances:
                return
            # While the broker is away nothing can be committed anyway; once it answers, the
            # check tells whether it is the broker the offsets belong to.
            while not await self.check():
                if self.should_stop or self.stopping():
                    return  # stopping while the broker is away: commit as Faust would
                await asyncio.sleep(0.5)

        return before_commit_then_check

    @faust.Service.task
    async def _check_every_few_seconds(self) -> None:
        # A loop, not a timer: a check can take METADATA_TIMEOUT_S while the broker is away,
        # and an overlapping timer logs a warning every time.
        while not self.should_stop:
            await self.sleep(CHECK_INTERVAL_S)
            if not self.should_stop:
                await self.check()

    # -- start, stop, and what happens when the broker lost the topics --------------------
    async def on_start(self) -> None:
        from abdag.topics.admin import ensure_topics

        loop = asyncio.get_running_loop()
        meta = await loop.run_in_executor(self._thread, self._metadata)
        if meta is not None:
            if any(t not in meta.topics for t in self.topics):  # started without them
                await loop.run_in_executor(
                    self._thread, ensure_topics, self.bootstrap, self.topics, self.partitions
                )
            self.cluster_id = meta.cluster_id
        resumed = os.environ.get(ENV_RESUMES, "").split()
        if resumed:
            self._resumed_after = float(resumed[-1])
            log.warning(
                "resumed on the broker at %s after it lost the DAG's topics (noticed %s)",
                self.bootstrap,
                _clock(self._resumed_after),
            )
        self._write_record("running")

    async def on_stop(self) -> None:
        self._record.unlink(missing_ok=True)
        self._thread_closed = True  # Faust may stop this before the consumer's last commit
        self._thread.shutdown(wait=False)

    def on_lost(self, why: str) -> None:
        """Say once what happened, create the DAG's topics again, then restart this worker
        in place or stop it (never returns)."""
        recreated = self._recreate_topics()
        lost = (
            f"broker at {self.bootstrap} lost the DAG's topics and committed offsets ({why}): "
            f"records not processed before then are lost; {recreated}"
        )
        resumes = self._resumes()
        if self._may_resume(resumes):
            log.error("%s; restarting this worker to resume on it", lost)
            _flush_logs()
            env = dict(os.environ, **{ENV_RESUMES: " ".join(f"{t:.3f}" for t in resumes)})
            os.execve(sys.executable, list(sys.orig_argv), env)
        note = f"{lost}; stopping (exit {EXIT_BROKER_LOST}): start the worker again"
        if len(resumes) > RESUME_LIMIT:
            note += f" (it restarted itself {RESUME_LIMIT} times in {RESUME_WINDOW_S:.0f} s)"
        log.error("%s", note)
        self._write_record("stopped", note=note)
        _flush_logs()
        os._exit(EXIT_BROKER_LOST)

    def _recreate_topics(self) -> str:
        from abdag.topics.admin import ensure_topics

        try:
            ensure_topics(self.bootstrap, self.topics, self.partitions)
        except (BrokerUnreachable, ValueError) as exc:
            return f"could not create the DAG's topics again ({exc})"
        return f"created the DAG's {len(self.topics)} topics again"

    def _resumes(self) -> list[float]:
        """This worker's earlier self-restarts within the window, and now."""
        now = time.time()
        earlier = [float(t) for t in os.environ.get(ENV_RESUMES, "").split()]
        return [t for t in earlier if now - t < RESUME_WINDOW_S] + [now]

    def _may_resume(self, resumes: list[float]) -> bool:
        if self.settings.on_broker_loss == "stop":
            return False
        started_by_cli = sys.argv[:1] == ["abdag worker"]  # set by `abdag worker`
        return (
            started_by_cli
            and bool(getattr(sys, "orig_argv", None))
            and (len(resumes) <= RESUME_LIMIT)
        )

    def _write_record(self, state: str, *, note: str = "") -> None:
        """What ``abdag status`` reads (``abdag.stack.broker.broker_report``)."""
        doc = {
            "pid": os.getpid(),
            "dag": self.dag_name,
            "broker": self.bootstrap,
            "cluster_id": self.cluster_id,
            "started": self.since,
            "topics": self.topics,
            "state": state,
            "resumed_after": self._resumed_after,
            "note": note,
        }
        try:
            self._record.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._record.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc))
            tmp.replace(self._record)
        except OSError as exc:  # a read-only data dir must not stop the worker
            log.debug("worker record not written: %s", exc)


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):  # best effort before exec/exit
            handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()


def register(app: faust.App, settings: Settings, dag: Any) -> BrokerWatch:
    """Create the DAG's :class:`BrokerWatch` and add it to ``app``'s services."""
    from abdag.agents.topology import dag_topics

    watch = BrokerWatch(
        settings,
        dag.name,
        dag_topics(dag),
        dag.partitions,
        rebalances=lambda: app.rebalancing_count,
        stopping=lambda: app.should_stop,
    )
    app.service(watch)
    return watch


__all__ = [
    "EXIT_BROKER_LOST",
    "BrokerWatch",
    "RepeatLimiter",
    "limit_repeated_broker_errors",
    "register",
]
