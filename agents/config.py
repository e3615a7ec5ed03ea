"""Faust settings that are correct on the local Tansu broker and on Apache Kafka.

Facts behind each value are in the project's broker notes:
- short session/heartbeat/rebalance timeouts: a joining or dead worker is noticed in
  seconds, not the 30 s the defaults give;
- Tansu's ListOffsets answers the first offset of the last record batch + 1, which made
  table changelogs recover stale; abdag's consumer reads changelog ends from a fetch
  instead (:func:`abdag.agents.faust_compat.consumer.fetched_end_offsets`), so the producer
  batches as usual (single-record batches, the earlier workaround, halved throughput);
- at-least-once, never exactly_once (Tansu refuses transactional producers); everything
  downstream tolerates re-delivery, and a short commit interval keeps re-deliveries few;
- no standby replicas: a partition's table is recovered from its changelog when it moves;
- a 0.5 ms GIL switch interval (Python's default is 5 ms): a worker's event loop shares the
  GIL with Faust's consumer thread and the executor's sinks and models, and each hand-over
  could stall it up to the interval (:func:`tune_interpreter`);
- a young-generation garbage collection every 50,000 net allocations, not Python's 700:
  Faust allocates several objects per record (events, messages, futures), and the collector
  took a tenth of a busy worker's CPU (docs/design-notes.md); what starts with the worker
  (modules, models) is frozen out of collections (:func:`freeze_startup_heap`);
- ``stream_wait_empty=False``: a rebalance does not wait for events held in a micro-batch
  buffer (with ``take_events`` that wait can deadlock: seen as a worker stuck in
  "wait_empty" after another was killed). Un-acknowledged events are simply re-delivered,
  which every agent tolerates.
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abdag.settings import Settings

GIL_SWITCH_INTERVAL_S = 0.0005  # faster than Python's 5 ms (docs/design-notes.md)
GC_THRESHOLDS = (50_000, 20, 50)  # young, middle, old (Python's: 700, 10, 10)
BUSY_FETCH_WAIT_MS = 100  # Tansu, while records flow (see FetchWait)
IDLE_FETCH_WAIT_MS = 500  # Tansu, after 2 s without records


def tune_interpreter() -> None:
    """Process-wide interpreter settings of a worker (see the module docstring)."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    gc.set_threshold(*GC_THRESHOLDS)


def freeze_startup_heap() -> None:
    """Keep what exists once a worker has started (modules, models, the app) out of every
    later garbage collection: it lives as long as the worker, and scanning it made each
    full collection cost more the bigger the models."""
    gc.collect()
    gc.freeze()


def faust_settings(settings: Settings, *, partitions: int, app_id: str) -> dict[str, Any]:
    datadir = Path(settings.data_dir, "faust").resolve()
    datadir.mkdir(parents=True, exist_ok=True)
    session = settings.session_timeout
    conf: dict[str, Any] = {
        "broker": [f"kafka://{hp.strip()}" for hp in settings.broker.split(",")],
        "store": "memory://",
        "topic_partitions": partitions,
        "topic_replication_factor": settings.replication,
        "topic_allow_declare": True,
        "consumer_auto_offset_reset": "earliest",
        "broker_session_timeout": session,
        "broker_heartbeat_interval": min(0.5, session / 4),
        "broker_rebalance_timeout": session,
        "broker_commit_interval": 0.2,
        "table_standby_replicas": 0,
        "stream_wait_empty": False,
        "web_enabled": False,
        "key_serializer": "raw",
        "value_serializer": "raw",
        "datadir": str(datadir / f"{app_id}-{os.getpid()}"),
        "processing_guarantee": "at_least_once",
    }
    return conf


@dataclass
class FetchWait:
    """How long the broker may hold a fetch that finds no new records: ``busy_ms`` while
    records flow, ``idle_ms`` once none came for ``idle_after_s`` seconds.

    Why both: Tansu re-reads the log of a held fetch only a few times during the wait (at
    its end when under 250 ms remain), so under traffic each hop of a DAG costs up to
    ``busy_ms``; a short wait when idle keeps the worker and the broker busy answering
    empty fetches.

    >>> wait = FetchWait(busy_ms=100, idle_ms=500, idle_after_s=2.0)
    >>> wait.after_fetch(got_records=True, now=10.0)
    100
    >>> wait.after_fetch(got_records=False, now=11.0)
    100
    >>> wait.after_fetch(got_records=False, now=12.5)
    500
    """

    busy_ms: int
    idle_ms: int
    idle_after_s: float = 2.0
    last_records: float = float("-inf")

    def after_fetch(self, got_records: bool, now: float) -> int:
        """The wait for the next fetch, given whether this one returned records."""
        if got_records:
            self.last_records = now
        return self.busy_ms if now - self.last_records < self.idle_after_s else self.idle_ms


def fetch_wait(settings: Settings) -> FetchWait | None:
    """The workers' fetch wait: ``ABDAG_FETCH_MAX_WAIT_MS`` fixes it; by default on Tansu it
    is 100 ms while records flow and 500 ms when idle (the measurements behind both are in
    docs/design-notes.md); on Kafka it is Faust's own (1500 ms: Kafka answers a held fetch
    as soon as records arrive)."""
    ms = settings.fetch_max_wait_ms
    if ms is not None:
        return FetchWait(busy_ms=ms, idle_ms=ms)
    if settings.broker_kind == "tansu":
        return FetchWait(busy_ms=BUSY_FETCH_WAIT_MS, idle_ms=IDLE_FETCH_WAIT_MS)
    return None


LOG_LEVELS = {"crit": 50, "error": 40, "warn": 30, "info": 20, "debug": 10}

WORKER_READY = "abdag worker ready"
"""How the line a worker logs once it has started begins: ``abdag worker ready (DAG
<name>)``, at WARNING so that the default ``--loglevel warn`` shows it
(:class:`abdag.agents.faust_compat.streams.PlainTextWorker`)."""
