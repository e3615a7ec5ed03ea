"""The join table's held writes: one changelog record per request per batch, each sent to
the partition of the event that made it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from faust.streams import current_event

from agents.tables import JsonTable
from comparators.join import LABELLED, PairJoin


@dataclass
class Message:
    partition: int


class Event:
    def __init__(self, partition: int) -> None:
        self.message = Message(partition)


class RecordingTable(dict):
    """Stands in for a Faust table: records each write with Faust's current event's
    partition, which is where a Faust table sends the changelog record."""

    def __init__(self) -> None:
        super().__init__()
        self.changelog: list[tuple[bytes, int]] = []

    def __setitem__(self, key: bytes, value: bytes) -> None:
        super().__setitem__(key, value)
        self.changelog.append((key, current_event().message.partition))

    def __delitem__(self, key: bytes) -> None:
        super().__delitem__(key)
        self.changelog.append((key, current_event().message.partition))


def test_a_request_joined_within_one_batch_writes_one_changelog_record():
    table = RecordingTable()
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
    assert table == {}  # nothing written before the flush
    assert store.flush() == 2
    assert sorted(table.changelog) == [(b"r1", 3), (b"r2", 1)]
    assert store["r1"]["label"] == 1.0 and store["r2"]["a"] == {"score": 0.2}


def test_an_entry_made_and_forgotten_in_one_batch_leaves_nothing_behind():
    table = RecordingTable()
    store = JsonTable(table)
    store.event = Event(0)
    store["r"] = {"stage": 3}
    del store["r"]
    assert "r" not in store and store.get("r") is None
    store.flush()
    assert table == {} and table.changelog == []


def test_without_an_event_writes_go_straight_to_the_table():
    table: dict = {}
    store = JsonTable(table)
    store["r"] = {"a": 1}
    assert table == {b"r": b'{"a":1}'}
    del store["r"]
    assert table == {}


def test_iterating_with_writes_still_held_is_refused():
    store = JsonTable({})
    store.event = Event(0)
    store["r"] = {"a": 1}
    with pytest.raises(RuntimeError, match="flush"):
        list(store.items())
