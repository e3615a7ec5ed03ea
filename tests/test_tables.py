"""The join table's held writes: one changelog record per request per batch, each sent to
the partition of the event that made it, in the form Faust writes (raw bytes, None to
delete)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from abdag.agents.faust_compat.tables import JsonTable
from abdag.agents.producer import OutRecord
from abdag.comparators.join import LABELLED, PairJoin

CHANGELOG = "abdag-ab-join-changelog"


@dataclass
class Message:
    partition: int


class Event:
    def __init__(self, partition: int) -> None:
        self.message = Message(partition)


class Topic:
    def get_topic_name(self) -> str:
        return CHANGELOG


class Table(dict):
    """Stands in for a Faust table: its store is ``data``; a write through the table itself
    (Faust's path, which sends its own changelog record) is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[bytes, bytes] = {}
        self.changelog_topic = Topic()
        self.written_through_faust: list[bytes] = []

    def get(self, key, default=None):
        return self.data.get(key, default)

    def __contains__(self, key) -> bool:
        return key in self.data

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.data[key] = value
        self.written_through_faust.append(key)

    def __delitem__(self, key: bytes) -> None:
        del self.data[key]
        self.written_through_faust.append(key)


def test_a_request_joined_within_one_batch_writes_one_changelog_record():
    table = Table()
    store = JsonTable(table)
    join = PairJoin(join_timeout=10, label_timeout=60, store=store)
    for event, offer in [
        (Event(3), lambda: join.offer_label("r1", 1.0, label_ts=0, now=0)),
        (Event(3), lambda: join.offer_prediction("a", "r1", {"score": 0.9}, now=0)),
        (Event(1), lambda: join.offer_prediction("a", "r2", {"score": 0.2}, now=0)),
        (Event(3), lambda: join.offer_prediction("b", "r1", {"score": 0.7}, now=1)),
    ]:
        store.event = event
        emitted = offer()
    assert emitted.stage == LABELLED  # the join saw its own held writes
    assert table.data == {}  # nothing written before the flush
    records = store.flush()
    assert sorted((r.topic, r.key, r.partition) for r in records) == [
        (CHANGELOG, b"r1", 3),
        (CHANGELOG, b"r2", 1),
    ]
    assert {r.key: r.value for r in records} == table.data  # the records carry the values
    assert table.written_through_faust == []  # no second changelog record from Faust
    assert store["r1"]["label"] == 1.0 and store["r2"]["a"] == {"score": 0.2}


def test_a_deleted_key_sends_a_tombstone_to_its_partition():
    table = Table()
    table.data[b"r"] = b'{"stage":3}'
    store = JsonTable(table)
    store.event = Event(2)
    del store["r"]
    assert store.flush() == [OutRecord(CHANGELOG, b"r", None, None, 2)]
    assert table.data == {}


def test_an_entry_made_and_forgotten_in_one_batch_leaves_nothing_behind():
    table = Table()
    store = JsonTable(table)
    store.event = Event(0)
    store["r"] = {"stage": 3}
    del store["r"]
    assert "r" not in store and store.get("r") is None
    assert store.flush() == []
    assert table.data == {}


def test_without_an_event_writes_go_straight_to_the_table():
    table = Table()
    store = JsonTable(table)
    store["r"] = {"a": 1}
    assert table.data == {b"r": b'{"a":1}'} and table.written_through_faust == [b"r"]
    del store["r"]
    assert table.data == {}


def test_iterating_with_writes_still_held_is_refused():
    store = JsonTable(Table())
    store.event = Event(0)
    store["r"] = {"a": 1}
    with pytest.raises(RuntimeError, match="flush"):
        list(store.items())
