"""The comparison node's join state: a Faust table seen as ``str -> dict``.

Raw bytes keep the changelog readable by any client and recovery free of Faust's model
registry (a ``dict`` value type breaks recovery: Faust looks for ``dict.from_data``).

The comparison agent handles a batch of events at a time. While it does, writes are held
and go to the table at :meth:`JsonTable.flush`, one changelog record each, so a request
whose A, B and label outputs come in one batch costs one changelog record, not three. A
held write remembers the event that made it: its changelog record goes to that event's
partition, the one the key lives in (where Faust would send it).

The flush returns the changelog records for the agent to send with its other output
(librdkafka, behind the commit gate: ``abdag.agents.producer``) instead of through Faust's
producer, whose Python send path was a large share of a busy comparison worker's time
(docs/design-notes.md). They are
the records Faust writes (raw key, raw value, ``None`` to delete), so Faust recovers the
table from them as ever.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from functools import cached_property
from typing import Any

import orjson

from abdag.agents.producer import OutRecord

_DELETED = object()


class JsonTable(MutableMapping):
    """A Faust table of raw bytes as ``str -> dict``, writes held per batch.

    Set :attr:`event` to the event being handled before each one; with no event set, writes
    go straight to the table (through Faust, which then needs its own current event).
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

    def flush(self) -> list[OutRecord]:
        """Write the held values to the table's store and return their changelog records
        (one per key, to the partition of the event that made the write) for the caller to
        send before the batch's offsets may be committed."""
        data, topic = self.table.data, self.changelog_topic
        records = []
        for key, value in self._held.items():
            raw_key = key.encode()
            partition = self._origin[key].message.partition
            if value is not _DELETED:
                raw = orjson.dumps(value)
                data[raw_key] = raw
                records.append(OutRecord(topic, raw_key, raw, None, partition))
            elif raw_key in data:  # not when created and forgotten within the batch
                del data[raw_key]
                records.append(OutRecord(topic, raw_key, None, None, partition))
        self._held.clear()
        self._origin.clear()
        self.event = None
        return records

    @cached_property
    def changelog_topic(self) -> str:
        return self.table.changelog_topic.get_topic_name()

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
