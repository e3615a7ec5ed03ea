"""How abdag's worker consumer reads the broker where Faust would be misled."""

import asyncio
import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from agents.consumer import fetched_end_offsets


def test_changelog_end_offsets_are_read_from_a_fetch_not_from_list_offsets(stack):
    from aiokafka import AIOKafkaConsumer, TopicPartition

    topic = f"t-ends-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": stack.broker})
    admin.create_topics([NewTopic(topic, 3, 1)])[topic].result(timeout=30)
    # batched like a busy Faust producer: several records per batch, per partition
    producer = Producer({"bootstrap.servers": stack.broker, "linger.ms": 50})
    sizes = {0: 120, 1: 7, 2: 0}
    for partition, n in sizes.items():
        for i in range(n):
            producer.produce(topic, value=b"x%d" % i, partition=partition)
    assert producer.flush(30) == 0

    async def ends() -> tuple[dict, dict]:
        client = AIOKafkaConsumer(bootstrap_servers=stack.broker, enable_auto_commit=False)
        await client.start()
        try:
            tps = [TopicPartition(topic, p) for p in sizes]
            listed = await client.end_offsets(tps)
        finally:
            await client.stop()
        return listed, await fetched_end_offsets(stack.broker, listed)

    listed, fetched = asyncio.run(ends())
    assert {tp.partition: end for tp, end in fetched.items()} == sizes
    # what the fetch corrects: ListOffsets may stop at the last batch's first offset + 1
    assert all(listed[tp] <= fetched[tp] for tp in listed)
