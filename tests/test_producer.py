"""Producers on the real broker: the agents' output producer (Faust's placement, headers,
and a commit gate that opens only once the records queued before it are delivered), and
`abdag produce`'s rate limit."""

import asyncio
import time
import uuid

import pytest
from aiokafka.partitioner import DefaultPartitioner
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from agents.producer import DeliveryFailed, OutputProducer, OutRecord
from topics.producer import produce

PARTITIONS = 4


def new_topic(stack) -> str:
    topic = f"t-out-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": stack.broker})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(timeout=30)
    return topic


def read_all(stack, topic: str, n: int, timeout: float = 30.0) -> list:
    consumer = Consumer(
        {
            "bootstrap.servers": stack.broker,
            "group.id": f"g-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    got = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < n and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=0.5):
                if msg.error() is None:
                    got.append(msg)
    finally:
        consumer.close()
    return got


def test_records_land_in_the_partition_faust_would_choose_with_their_headers(stack):
    topic = new_topic(stack)
    producer = OutputProducer(stack.broker)
    keys = [f"req-{i}".encode() for i in range(200)]

    async def send() -> None:
        await producer.send_all(
            OutRecord(topic, k, b"v" + k, {"trace": b"t" + k} if i % 2 else None)
            for i, k in enumerate(keys)
        )
        await producer.delivered()

    asyncio.run(send())
    assert producer.sent == 200 and producer.failed == 0
    got = read_all(stack, topic, len(keys))
    assert sorted(m.key() for m in got) == sorted(keys)  # each exactly once
    faust_partition = DefaultPartitioner()
    for m in got:
        expected = faust_partition(m.key(), list(range(PARTITIONS)), list(range(PARTITIONS)))
        assert m.partition() == expected, m.key()
        i = keys.index(m.key())
        assert (m.headers() or []) == ([("trace", b"t" + m.key())] if i % 2 else [])
        assert m.value() == b"v" + m.key()


def test_an_undeliverable_record_fails_the_commit_gate(stack):
    topic = new_topic(stack)
    producer = OutputProducer(stack.broker, delivery_timeout=5)

    async def send() -> None:
        await producer.send_all([OutRecord(topic, b"k", b"v")])
        await producer.delivered()  # delivered: the gate opens
        await producer.send_all([OutRecord(topic, b"k", b"v", partition=PARTITIONS + 3)])
        await producer.delivered()

    with pytest.raises(DeliveryFailed, match="not delivered"):
        asyncio.run(send())


def test_produce_with_a_rate_spreads_the_events_over_time(stack):
    topic = new_topic(stack)
    n, rate = 60, 100.0
    events = ({"request_id": f"r{i}"} for i in range(n))
    assert produce(stack.broker, topic, events, rate=rate, progress=False) == n
    stamps = sorted(m.timestamp()[1] for m in read_all(stack, topic, n))
    assert len(stamps) == n
    # the broker's create times: a burst (the rate ignored) spans a few milliseconds
    assert (stamps[-1] - stamps[0]) / 1000 >= 0.95 * (n - 1) / rate
