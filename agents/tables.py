"""The comparison node's join state: a Faust table seen as ``str -> dict``.

Raw bytes keep the changelog readable by any client and recovery free of Faust's model
registry (a ``dict`` value type breaks recovery: Faust looks for ``dict.from_data``).

The comparison agent handles a batch of events at a time. While it does, writes are held
and go to the table (one changelog record each) at :meth:`JsonTable.flush`, so a request
whose A, B and label outputs come in one batch costs one changelog record, not three. A
held write remembers the event that made it: the table sends each changelog record to
that event's partition, the one the key lives in.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import orjson
from faust.streams import _current_event

_DELETED = object()


@contextmanager
def current_event(event: Any) -> Iterator[None]:
    """Make ``event`` Faust's current event, which decides a table write's changelog
    partition (Faust sets it while it iterates a stream; after ``take_events`` it is the
    batch's last event)."""
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


class JsonTable(MutableMapping):
    """A Faust table of raw bytes as ``str -> dict``, writes held per batch.

    Set :attr:`event` to the event being handled before each one; with no event set, writes
    go straight to the table.
    """

    def __init__(self, table: Any) -> None:
        self.table = table
        self.event: Any = None
        self._held: dict[str, Any] = {}  # key -> dict, or _DELETED
        self._origin: dict[str, Any] = {}  # key -> event of its last held write

    def __getitem__(self, key: str) -> dict:
        held = self._held.get(key)
        if held is _DELETED:
            raise KeyError(key)
        if held is not None:
            return held
        raw = self.table.get(key.encode())
        if raw is None:
            raise KeyError(key)
        return orjson.loads(raw)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __setitem__(self, key: str, value: dict) -> None:
        if self.event is None:
            self.table[key.encode()] = orjson.dumps(value)
            return
        self._held[key] = value
        self._origin[key] = self.event

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        if self.event is None:
            del self.table[key.encode()]
            return
        self._held[key] = _DELETED
        self._origin[key] = self.event

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        held = self._held.get(key)
        if held is not None:
            return held is not _DELETED
        return key.encode() in self.table

    def flush(self) -> int:
        """Write the held values to the table; returns how many keys were written."""
        for key, value in self._held.items():
            raw_key = key.encode()
            with current_event(self._origin[key]):
                if value is not _DELETED:
                    self.table[raw_key] = orjson.dumps(value)
                elif raw_key in self.table:  # created and forgotten within the batch
                    del self.table[raw_key]
        written = len(self._held)
        self._held.clear()
        self._origin.clear()
        self.event = None
        return written

    def __iter__(self):
        self._require_flushed()
        return (k.decode() for k in list(self.table.keys()))

    def __len__(self) -> int:
        self._require_flushed()
        return len(self.table)

    def items(self):
        self._require_flushed()
        return [(k.decode(), orjson.loads(v)) for k, v in list(self.table.items())]

    def _require_flushed(self) -> None:
        if self._held:
            raise RuntimeError("JsonTable: flush() the held writes before iterating")
