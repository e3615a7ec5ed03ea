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
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("abdag.sink")


class ClickHouseSink:
    """Insert rows into one table with retry and exponential backoff.

    The insert context (the table's column types, which clickhouse-connect otherwise asks
    the server for before every insert: as much work again as inserting a few hundred
    rows) is made once per connection.

    >>> calls = []
    >>> class FakeClient:  # clickhouse-connect's create_insert_context() and insert()
    ...     def create_insert_context(self, table, column_names):
    ...         calls.append(("describe", table))
    ...         return table
    ...     def insert(self, data, context):
    ...         calls.append(("insert", context, len(data)))
    >>> sink = ClickHouseSink(lambda: FakeClient(), "pairs", ["x"], on_connect=None)
    >>> sink.write([[1], [2]]), sink.write([[3]])  # nothing refused
    ([], [])
    >>> calls
    [('describe', 'pairs'), ('insert', 'pairs', 2), ('insert', 'pairs', 1)]
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
        self._context: Any = None
        self.max_backoff = max_backoff
        self.stop = stop or threading.Event()
        self.rows_written = 0
        self.failures = 0

    def _insert(self, rows: Sequence[Sequence[Any]]) -> None:
        """One insert on the current connection (made, with its insert context, if none)."""
        if self._client is None:
            client = self._connect()
            if self._on_connect is not None:
                self._on_connect(client)
            self._context = client.create_insert_context(self.table, column_names=self.columns)
            self._client = client
        try:
            self._client.insert(data=rows, context=self._context)
        except BaseException:
            self._client = self._context = None  # a failed insert may leave the context used
            raise

    def write(self, rows: Sequence[Sequence[Any]]) -> list[tuple[Sequence[Any], str]]:
        """Insert ``rows``; block, retrying, until ClickHouse acknowledged them.

        Returns the rows ClickHouse itself refused (bad values), each with the server's
        reason, so the caller can dead-letter them: an outage is waited out, a poison row is
        set aside instead of blocking the stream for ever.
        """
        if not rows:
            return []
        delay = 0.2
        refusals = 0
        while True:
            try:
                self._insert(rows)
            except Exception as exc:  # noqa: BLE001 - network, server and protocol errors
                self.failures += 1
                if _is_refusal(exc):
                    refusals += 1
                    if refusals >= 2:  # the same batch refused twice: find the bad rows
                        rejected = self._set_refused_apart(rows, _first_line(exc))
                        log.error("ClickHouse refused %d rows of %s", len(rejected), self.table)
                        return rejected
                elif self.stop.is_set():
                    raise
                log.warning(
                    "ClickHouse insert of %d rows into %s failed (%s); retrying in %.1f s",
                    len(rows),
                    self.table,
                    _first_line(exc)[:200],
                    delay,
                )
                if self.stop.wait(delay):
                    raise
                delay = min(delay * 2, self.max_backoff)
                continue
            self.rows_written += len(rows)
            return []

    def _set_refused_apart(
        self, rows: Sequence[Sequence[Any]], reason: str
    ) -> list[tuple[Sequence[Any], str]]:
        """Insert what ClickHouse accepts of a batch it refused (for ``reason``) by halving
        it; return the rows refused alone, each with the reason.

        A refused insert commits nothing, so an accepted half is written once; one bad row
        in 5,000 costs about 2 x log2(5,000) = 25 inserts instead of 5,000 one-row ones.
        """
        if len(rows) == 1:
            return [(rows[0], reason[:500])]
        rejected: list[tuple[Sequence[Any], str]] = []
        half = len(rows) // 2
        parts = [rows[half:], rows[:half]]
        while parts:
            part = parts.pop()
            try:
                self._insert(part)
            except Exception as exc:  # noqa: BLE001
                if not _is_refusal(exc):
                    rejected += self.write(part)  # an outage after all: wait it out
                elif len(part) == 1:
                    rejected.append((part[0], _first_line(exc)[:500]))
                else:
                    half = len(part) // 2
                    parts += [part[half:], part[:half]]  # the first half next
                continue
            self.rows_written += len(part)
        return rejected


def _first_line(exc: BaseException) -> str:
    """The first line of an error's message, or its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_refusal(exc: BaseException) -> bool:
    """True when the server answered with an error about the data (not an outage)."""
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

    if isinstance(exc, OperationalError):
        return False
    return isinstance(exc, DatabaseError | TypeError | ValueError)
