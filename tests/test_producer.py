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

from abdag.agents.producer import DeliveryFailed, OutputProducer, OutRecord
from abdag.topics.producer import produce

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


def test_a_record_over_the_size_limit_is_replaced_and_the_commit_gate_still_opens(stack):
    topic, letters = new_topic(stack), new_topic(stack)
    refused: list[tuple[int, str]] = []

    def replace(record: OutRecord, why: str) -> OutRecord:
        refused.append((len(record.value), why))
        return OutRecord(letters, record.key, b"letter for " + record.key)

    producer = OutputProducer(stack.broker, max_record_bytes=100_000, on_refused=replace)

    async def send() -> None:
        await producer.send_all(
            [
                OutRecord(topic, b"small-1", b"v"),
                OutRecord(topic, b"huge", b"x" * 300_000),
                OutRecord(topic, b"small-2", b"v"),
            ]
        )
        await producer.delivered()  # no DeliveryFailed: the huge record's letter went instead

    asyncio.run(send())
    assert producer.failed == 0 and producer.replaced == 1
    assert [size for size, _ in refused] == [300_000]
    assert "over the record size limit of 100000" in refused[0][1]
    assert sorted(m.key() for m in read_all(stack, topic, 2)) == [b"small-1", b"small-2"]
    assert [m.value() for m in read_all(stack, letters, 1)] == [b"letter for huge"]


def test_a_record_the_broker_refuses_for_its_size_is_replaced_under_the_same_sequence(stack):
    # Tansu takes records of any size, so the broker's refusal comes as Kafka reports it:
    # a delivery report with MSG_SIZE_TOO_LARGE for a record still pending.
    from confluent_kafka import KafkaError

    letters = new_topic(stack)
    producer = OutputProducer(
        stack.broker, on_refused=lambda r, why: OutRecord(letters, r.key, why.encode())
    )

    class Refused:  # the message as librdkafka hands it to the delivery callback
        def topic(self):
            return "abdag.x.model_a"

        def key(self):
            return b"r-1"

        def value(self):
            return b"y" * 2_000_000

        def headers(self):
            return None

        def partition(self):
            return 0

    async def send() -> None:
        producer._next, producer._pending = 1, {0}  # record 0 queued before the commit
        producer._on_delivery(0, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), Refused())
        assert 0 in producer._pending  # the gate waits for the replacement
        await producer.delivered()

    asyncio.run(send())
    assert producer.failed == 0 and producer.replaced == 1
    (letter,) = read_all(stack, letters, 1)
    assert letter.key() == b"r-1" and letter.value().startswith(b"2000003 bytes")


def test_without_a_replacement_an_oversized_record_fails_the_commit_gate(stack):
    producer = OutputProducer(stack.broker, max_record_bytes=100_000)

    async def send() -> None:
        await producer.send_all([OutRecord(new_topic(stack), b"huge", b"x" * 300_000)])
        await producer.delivered()

    with pytest.raises(DeliveryFailed, match="not delivered"):
        asyncio.run(send())


def test_the_record_limit_is_the_producers_when_the_broker_reports_none(stack):
    from abdag.agents.producer import DEFAULT_MAX_RECORD_BYTES, record_limit

    # Tansu reports no configs: the worker keeps librdkafka's limit (and dead-letters above)
    assert record_limit(stack.broker, [new_topic(stack)], needed=600_000) == (
        DEFAULT_MAX_RECORD_BYTES
    )


def test_a_broker_limit_under_what_abdag_sends_stops_the_worker_at_start(stack, monkeypatch):
    import abdag.agents.producer as producer_module

    reported = (500_000, "max.message.bytes of topic abdag.x.tx.in")
    monkeypatch.setattr(producer_module, "broker_record_limit", lambda *a, **k: reported)
    with pytest.raises(producer_module.RecordLimitTooSmall) as refused:
        producer_module.record_limit(stack.broker, ["abdag.x.tx.in"], needed=600_000)
    said = str(refused.value)
    assert "at most 500000 bytes (max.message.bytes of topic abdag.x.tx.in)" in said
    assert "raise max.message.bytes to at least 600000" in said
    larger = (2_000_000, "message.max.bytes of broker 1")
    monkeypatch.setattr(producer_module, "broker_record_limit", lambda *a, **k: larger)
    assert producer_module.record_limit(stack.broker, [], needed=600_000) == 1_000_000
