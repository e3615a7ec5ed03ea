"""Writing rows to ClickHouse in batches, and waiting (not dropping) when it is away.

The sink is called from a Faust agent with a batch taken from a topic. It returns only
once ClickHouse acknowledged the insert: until then the agent does not move on, its
events are not acknowledged and their offsets are not committed, so a ClickHouse outage
stops consumption instead of growing memory, and a crash replays the batch. Replays are
harmless: the pairs table is a ReplacingMergeTree keyed by (experiment, request_id) and
every read deduplicates.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("abdag.sink")


class ClickHouseSink:
    """Insert rows into one table with retry and exponential backoff.

    >>> calls = []
    >>> class FakeClient:  # any object with clickhouse-connect's insert() signature
    ...     def insert(self, table, rows, column_names):
    ...         calls.append((table, len(rows)))
    >>> sink = ClickHouseSink(lambda: FakeClient(), "pairs", ["x"], on_connect=None)
    >>> sink.write([[1], [2]])
    2
    >>> calls
    [('pairs', 2)]
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        table: str,
        columns: Sequence[str],
        *,
        on_connect: Callable[[Any], None] | None,
        max_backoff: float = 10.0,
        stop: threading.Event | None = None,
    ) -> None:
        self._connect = connect
        self.table = table
        self.columns = list(columns)
        self._on_connect = on_connect
        self._client: Any = None
        self.max_backoff = max_backoff
        self.stop = stop or threading.Event()
        self.rows_written = 0
        self.failures = 0

    def _client_or_connect(self) -> Any:
        if self._client is None:
            client = self._connect()
            if self._on_connect is not None:
                self._on_connect(client)
            self._client = client
        return self._client

    def write(self, rows: Sequence[Sequence[Any]]) -> int:
        """Insert ``rows``; blocks, retrying, until acknowledged (or ``stop`` is set)."""
        if not rows:
            return 0
        delay = 0.2
        while True:
            try:
                self._client_or_connect().insert(self.table, rows, column_names=self.columns)
            except Exception as exc:  # noqa: BLE001 - network, server and protocol errors
                self.failures += 1
                self._client = None
                if self.stop.is_set():
                    raise
                log.warning(
                    "ClickHouse insert of %d rows into %s failed (%s); retrying in %.1f s",
                    len(rows),
                    self.table,
                    str(exc).splitlines()[0][:200],
                    delay,
                )
                if self.stop.wait(delay):
                    raise
                delay = min(delay * 2, self.max_backoff)
                continue
            self.rows_written += len(rows)
            return len(rows)


def wait_for_clickhouse(connect: Callable[[], Any], *, timeout: float) -> Any:
    """Connect, retrying until ``timeout``; raise the last error with a clear message."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return connect()
        except Exception as exc:  # noqa: BLE001
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"ClickHouse did not answer within {timeout:.0f} s: {exc}"
                ) from exc
            time.sleep(0.5)
