"""Faust settings that are correct on the local Tansu broker and on Apache Kafka.

Facts behind each value are in the project's broker notes:
- short session/heartbeat/rebalance timeouts: a joining or dead worker is noticed in
  seconds, not the 30 s the defaults give;
- Tansu's ListOffsets answers the first offset of the last record batch + 1, which made
  table changelogs recover stale; abdag's consumer reads changelog ends from a fetch
  instead (:func:`agents.consumer.fetched_end_offsets`), so the producer batches as usual
  (single-record batches, the earlier workaround, cost about half the throughput);
- at-least-once, never exactly_once (Tansu refuses transactional producers); everything
  downstream tolerates re-delivery, and a short commit interval keeps re-deliveries few;
- no standby replicas: a partition's table is recovered from its changelog when it moves;
- a 0.5 ms GIL switch interval (Python's default is 5 ms): a worker's event loop shares the
  GIL with Faust's consumer thread and the executor's sinks and models, and each hand-over
  could stall it up to the interval (:func:`tune_interpreter`);
- ``stream_wait_empty=False``: a rebalance does not wait for events held in a micro-batch
  buffer (with ``take_events`` that wait can deadlock: seen as a worker stuck in
  "wait_empty" after another was killed). Un-acknowledged events are simply re-delivered,
  which every agent tolerates.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from abdag.settings import Settings

GIL_SWITCH_INTERVAL_S = 0.0005  # the A/B DAG: +7% pairs/s against 5 ms (bench.end_to_end)


def tune_interpreter() -> None:
    """Process-wide interpreter settings of a worker (see the module docstring)."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


def broker_kind(settings: Settings) -> str:
    """'tansu' (the embedded broker) or 'kafka'; env ABDAG_BROKER_KIND, default tansu."""
    kind = os.environ.get("ABDAG_BROKER_KIND", "tansu").lower()
    if kind not in ("tansu", "kafka"):
        raise ValueError(f"ABDAG_BROKER_KIND must be 'tansu' or 'kafka', got {kind!r}")
    return kind


def faust_settings(settings: Settings, *, partitions: int, app_id: str) -> dict[str, Any]:
    datadir = Path(settings.data_dir, "faust").resolve()
    datadir.mkdir(parents=True, exist_ok=True)
    session = float(os.environ.get("ABDAG_SESSION_TIMEOUT", "4"))
    conf: dict[str, Any] = {
        "broker": [f"kafka://{hp.strip()}" for hp in settings.broker.split(",")],
        "store": "memory://",
        "topic_partitions": partitions,
        "topic_replication_factor": int(os.environ.get("ABDAG_REPLICATION", "1")),
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


def fetch_max_wait_ms(settings: Settings) -> int | None:
    """How long the broker may hold a fetch that finds no new records:
    ``ABDAG_FETCH_MAX_WAIT_MS``, default 500 on Tansu, Faust's own 1500 on Kafka.

    Measured on Tansu with one record produced every 0.37 s to an idle topic: produce ->
    consume took ~380 ms at 1500 ms (Faust's fixed value) and 6 ms at 500 ms (aiokafka's
    default), and the A/B DAG has four such hops per request. 50 ms took the A/B DAG's p50
    at 50 requests/s from 0.7-0.86 s to 0.18-0.25 s, but an idle worker and the broker then
    used 21% of a core together (8% at 500 ms)."""
    value = os.environ.get("ABDAG_FETCH_MAX_WAIT_MS")
    if value is not None:
        return int(value)
    return 500 if broker_kind(settings) == "tansu" else None


LOG_LEVELS = {"crit": 50, "error": 40, "warn": 30, "info": 20, "debug": 10}


def hold_log_level(app: Any, loglevel: str) -> None:
    """Keep the worker's loggers at ``loglevel`` once Faust has set logging up.

    Faust's worker (through mode) leaves the root logger at DEBUG and filters in the
    handler, so every ``log.debug`` in aiokafka and Faust built a record only to drop it:
    measured ~6% of a busy worker's CPU (py-spy, comparison node)."""
    level = LOG_LEVELS[loglevel]

    @app.task
    async def set_log_level() -> None:
        logging.getLogger().setLevel(level)
