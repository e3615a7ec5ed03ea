"""Packs on node topics: what goes in comes out, in order, with headers, placed like keys."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from abdag.agents.producer import OutputProducer, OutRecord
from abdag.topics import BadRecord, DeadLetter, Event, decode_dead_letter, encode, event_from
from abdag.topics.packs import is_pack, pack, packs_by_partition, partition_for, unpack
from tests.test_producer import PARTITIONS, new_topic, read_all


def _events(n: int, start: int = 0) -> list[bytes]:
    return [encode(Event(f"r{i}", float(i), {"i": i})) for i in range(start, start + n)]


def test_a_pack_gives_back_its_records_in_order_with_their_headers():
    bodies = _events(3)
    headers = [[("trace", b"\x00t0")], None, [("trace", b"t2"), ("tenant", b"")]]
    records = unpack(pack(bodies, headers))
    assert [event_from(r.body) for r in records] == [
        Event("r0", 0.0, {"i": 0}),
        Event("r1", 1.0, {"i": 1}),
        Event("r2", 2.0, {"i": 2}),
    ]
    assert [r.headers for r in records] == headers
    assert [orjson.loads(r.original()) for r in records] == [orjson.loads(b) for b in bodies]


def test_a_plain_record_reads_as_a_pack_of_one_with_the_record_headers():
    assert is_pack(pack(_events(2))) and not is_pack(_events(1)[0]) and not is_pack(None)
    (record,) = unpack(_events(1)[0], [("trace", b"x")])
    assert event_from(record.body).request_id == "r0"
    assert record.headers == [("trace", b"x")]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "undecodable"),
        (b"{not json", "undecodable"),
        (b'{"v": 99, "kind": "pack", "records": []}', "unknown schema version"),
        (b'{"v": 1, "kind": "pack", "records": {"a": 1}}', "undecodable"),
    ],
)
def test_an_unreadable_pack_is_refused_with_its_reason(value, reason):
    with pytest.raises(BadRecord) as err:
        unpack(value)
    assert err.value.reason == reason


def test_a_bad_record_in_a_pack_is_refused_alone():
    raw = pack([_events(1)[0], b"[1, 2]", b'{"v": 1, "kind": "label", "request_id": "x"}'])
    outcomes = []
    for record in unpack(raw):
        try:
            outcomes.append(event_from(record.body).request_id)
        except BadRecord as err:
            outcomes.append(err.reason)
    assert outcomes == ["r0", "undecodable", "wrong record kind"]


def test_packs_split_by_partition_size_and_count_keeping_order():
    entries = [(i % 2, body, None) for i, body in enumerate(_events(50))]
    one_body = len(entries[0][1])
    packs = list(packs_by_partition(entries, max_bytes=10 * one_body, max_records=7))
    for partition in (0, 1):
        mine = [unpack(v) for p, v in packs if p == partition]
        assert all(1 <= len(m) <= 7 for m in mine)
        ids = [event_from(r.body).request_id for m in mine for r in m]
        assert ids == [f"r{i}" for i in range(partition, 50, 2)]
    # A record larger than the budget still goes, alone.
    big = [(0, encode(Event("big", 0.0, {"x": "y" * 5000})), None), *entries[:1]]
    assert [len(unpack(v)) for _, v in packs_by_partition(big, max_bytes=1000)] == [1, 1]


def test_partition_for_matches_where_the_producer_places_keyed_records(stack):
    """Packs of a request must land where its keyed records (the join table's changelog,
    the served answers) land: librdkafka's murmur2 partitioner is the reference."""
    topic = new_topic(stack)
    producer = OutputProducer(stack.broker)
    keys = [f"req-{i}".encode() for i in range(300)]

    async def send() -> None:
        await producer.send_all(OutRecord(topic, k, b"{}") for k in keys)
        await producer.delivered()

    asyncio.run(send())
    got = read_all(stack, topic, len(keys))
    assert sorted(m.key() for m in got) == sorted(keys)
    assert {m.partition() for m in got} == set(range(PARTITIONS))
    for m in got:
        assert partition_for(m.key(), PARTITIONS) == m.partition(), m.key()


def test_dead_letters_of_one_pack_have_distinct_sources_and_old_letters_still_decode():
    letters = [
        DeadLetter("d", "m", "bad input", "", f"r{i}", "t", 2, 17, b"x", 1.0, index=i)
        for i in range(2)
    ]
    assert [decode_dead_letter(encode(d)).source for d in letters] == ["t/2/17#0", "t/2/17#1"]
    old = orjson.loads(encode(letters[0]))
    del old["index"]  # written before packs
    assert decode_dead_letter(orjson.dumps(old)).source == "t/2/17"
