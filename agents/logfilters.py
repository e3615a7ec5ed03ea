"""Logging filters that drop two library log lines abdag's ordinary operation triggers.

Each filter sits on the one logger that emits its line and drops exactly that message,
nothing else the logger says. :func:`install_log_filters` is called once per ``abdag``
process (:func:`abdag.cli.main`), so workers, the dashboard and ``abdag sql`` all get them;
filters on a logger survive Faust's logging setup, which configures only the root logger.
"""

from __future__ import annotations

import logging

__all__ = [
    "CLICKHOUSE_HTTP_LOGGER",
    "DroppedMessage",
    "FAUST_CONSUMER_LOGGER",
    "install_log_filters",
]

CLICKHOUSE_HTTP_LOGGER = "clickhouse_connect.driver._backend.http_sync"
CLICKHOUSE_HTTP_FAILED = "Unexpected Http Driver Exception"
"""clickhouse-connect 1.12 logs this WARNING (with a traceback unless
``show_clickhouse_errors``) whenever an HTTP request fails, then raises ``OperationalError``.
Safe to drop: the exception always follows, and abdag handles it where the request was
made (the sink's retry, the dashboard's 503, ``abdag`` commands' one-line error naming
the URL), so the line only repeats, without the URL, an error already reported."""

FAUST_CONSUMER_LOGGER = "faust.transport.drivers.aiokafka"
FAUST_STREAM_IDLE_SINCE_START = "Stream has not started processing %r (started %s)."
"""Faust 0.15's stall detector (``verify_event_path``) logs this ERROR for a partition whose
highwater is past its position while no event of it has reached a stream since the worker
started. It misfires after an ordinary rebalance: the clock is the worker's start, not the
assignment, and a partition with no new records for this worker (or Tansu's highwater,
which can run past the last offset) matches. Safe to drop: a stream that stalls after it
has processed events is still reported ("Stream stopped processing, or is slow"), so are
missing commits and fetches; a stream that never starts shows as no pairs in ClickHouse."""


class DroppedMessage(logging.Filter):
    """Drops records whose message template is, or starts with, ``template``.

    The template (``record.msg``, before ``%`` arguments) is matched, so the partition or
    time in the arguments does not matter; Faust prefixes its service label
    (``[^---AIOKafkaConsumerThread]: ``), which ``prefixed=True`` allows.

    >>> f = DroppedMessage("Unexpected Http Driver Exception")
    >>> f.filter(logging.makeLogRecord({"msg": "Unexpected Http Driver Exception"}))
    False
    >>> f.filter(logging.makeLogRecord({"msg": "Unexpected Http Driver Exception: other"}))
    True
    """

    def __init__(self, template: str, *, prefixed: bool = False) -> None:
        super().__init__()
        self.template = template
        self.prefixed = prefixed

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        if self.prefixed:
            _, sep, rest = msg.partition("]: ")
            msg = rest if sep and msg.startswith("[^") else msg
            return not msg.startswith(self.template)
        return msg != self.template


_FILTERS: dict[str, DroppedMessage] = {
    CLICKHOUSE_HTTP_LOGGER: DroppedMessage(CLICKHOUSE_HTTP_FAILED),
    FAUST_CONSUMER_LOGGER: DroppedMessage(FAUST_STREAM_IDLE_SINCE_START, prefixed=True),
}


def install_log_filters() -> None:
    """Attach the filters to their loggers (idempotent: each filter is added once)."""
    for name, flt in _FILTERS.items():
        logger = logging.getLogger(name)
        if flt not in logger.filters:
            logger.addFilter(flt)
