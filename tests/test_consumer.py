"""How abdag's worker consumer reads the broker where Faust would be misled, and how long
it lets the broker hold a fetch."""

import asyncio
import uuid
from pathlib import Path

import faust
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from abdag.agents.config import FetchWait, fetch_wait
from abdag.agents.faust_compat.consumer import (
    fetched_end_offsets,
    start_eagerly,
    use_resume_at_committed_consumer,
)
from abdag.settings import Settings


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


GATED_APP = """
import sys

import faust

from abdag.settings import Settings
from abdag.agents.config import faust_settings
from abdag.agents.faust_compat.consumer import use_resume_at_committed_consumer

app_id, topic = sys.argv[1], sys.argv[2]
app = faust.App(app_id, **faust_settings(Settings.from_env(), partitions=2, app_id=app_id))


async def output_lost() -> None:
    raise RuntimeError("3 output records not delivered (test)")


use_resume_at_committed_consumer(app, before_commit=output_lost)


@app.agent(app.topic(topic, key_type=bytes, value_type=bytes, partitions=2))
async def consume(stream):
    async for _ in stream.events():
        pass


sys.argv = ["gated", "worker", "--loglevel", "warn", "--without-web"]
app.main()
"""


def test_a_failed_delivery_gate_commits_nothing_and_stops_the_worker(stack, stack_env, tmp_path):
    import subprocess
    import sys

    from confluent_kafka import Consumer, TopicPartition

    topic, app_id = f"t-gate-{uuid.uuid4().hex[:8]}", f"gate-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": stack.broker})
    admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(timeout=30)
    producer = Producer({"bootstrap.servers": stack.broker})
    for i in range(40):
        producer.produce(topic, value=b"x", key=b"k%d" % i)
    assert producer.flush(30) == 0
    app = tmp_path / "gated.py"
    app.write_text(GATED_APP)
    proc = subprocess.Popen(
        [sys.executable, str(app), app_id, topic],
        env=stack_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "offsets not committed: 3 output records not delivered (test)" in out
    reader = Consumer({"bootstrap.servers": stack.broker, "group.id": app_id})
    try:
        committed = reader.committed([TopicPartition(topic, p) for p in (0, 1)], timeout=10)
    finally:
        reader.close()
    assert [tp.offset for tp in committed] == [-1001, -1001]  # nothing committed


def test_fetch_wait_is_short_while_records_flow_on_tansu_and_fixed_by_the_environment():
    wait = fetch_wait(Settings.from_env({"ABDAG_BROKER_KIND": "tansu"}))
    assert (wait.busy_ms, wait.idle_ms) == (100, 500)
    assert wait.after_fetch(got_records=False, now=0.0) == 500  # nothing seen yet: idle
    assert wait.after_fetch(got_records=True, now=1.0) == 100
    assert wait.after_fetch(got_records=False, now=2.9) == 100
    assert wait.after_fetch(got_records=False, now=3.1) == 500

    kafka = Settings.from_env({"ABDAG_BROKER_KIND": "kafka"})  # Kafka answers held fetches
    assert fetch_wait(kafka) is None

    fixed = Settings.from_env({"ABDAG_FETCH_MAX_WAIT_MS": "50"})
    assert fetch_wait(fixed) == FetchWait(busy_ms=50, idle_ms=50)
    with pytest.raises(ValueError, match="ABDAG_FETCH_MAX_WAIT_MS must be a whole number"):
        Settings.from_env({"ABDAG_FETCH_MAX_WAIT_MS": "fast"})


def test_a_coroutine_that_never_waits_finishes_in_the_callers_turn():
    steps = []

    async def deliver():
        steps.append("delivered")
        return 7

    async def main():
        before = len(asyncio.all_tasks())
        finished, result = start_eagerly(deliver())
        return finished, result, list(steps), len(asyncio.all_tasks()) - before

    assert asyncio.run(main()) == (True, 7, ["delivered"], 0)


def test_a_coroutine_that_waits_goes_on_from_where_it_stopped_when_awaited():
    steps = []

    async def main():
        gate = asyncio.Event()

        async def deliver():
            steps.append("before the wait")
            await gate.wait()
            steps.append("after the wait")
            return "late"

        finished, rest = start_eagerly(deliver())
        assert (finished, steps) == (False, ["before the wait"])
        asyncio.get_running_loop().call_later(0.01, gate.set)
        return await rest

    assert asyncio.run(main()) == "late"
    assert steps == ["before the wait", "after the wait"]


def test_cancelling_the_rest_of_an_eager_coroutine_cancels_the_coroutine():
    steps = []

    async def main():
        async def deliver():
            try:
                await asyncio.sleep(10)
            finally:
                steps.append("cleaned up")

        _, rest = start_eagerly(deliver())
        task = asyncio.ensure_future(rest)
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert steps == ["cleaned up"]


def test_consumer_delivers_at_once_and_a_blocked_delivery_loses_to_a_stopped_flow():
    """The consumer's per-record race (deliver vs flow stopped): a delivery that does not
    wait wins without scheduling anything; one blocked on a full agent queue is abandoned
    when the flow stops, leaving the queue as it was."""

    async def main():
        app = faust.App("abdag-test-eager", broker="kafka://127.0.0.1:9", web_enabled=False)
        use_resume_at_committed_consumer(app)
        consumer = app.consumer  # created, never started: no broker is needed
        flow_stopped = asyncio.Event()
        queue: asyncio.Queue[int] = asyncio.Queue(maxsize=1)

        async def deliver(n):
            await queue.put(n)
            return n

        quick = await consumer.wait_first(deliver(1), flow_stopped.wait())
        asyncio.get_running_loop().call_later(0.02, flow_stopped.set)
        blocked = await consumer.wait_first(deliver(2), flow_stopped.wait())
        return quick, blocked, queue.qsize(), queue.get_nowait()

    quick, blocked, size, queued = asyncio.run(main())
    assert quick.results == [1] and not quick.stopped
    assert blocked.results == [True] and not blocked.stopped  # the flow event won
    assert (size, queued) == (1, 1)  # record 2 was never put


def test_another_faust_version_is_refused_with_what_to_install():
    from abdag.agents.faust_compat import FAUST_VERSION, FaustVersionError, check_faust_version

    check_faust_version()  # the pinned one is installed
    with pytest.raises(FaustVersionError) as refused:
        check_faust_version("0.16.0")
    said = str(refused.value)
    assert "faust-streaming 0.16.0 is installed" in said
    assert f"install faust-streaming=={FAUST_VERSION}" in said
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert f'"faust-streaming=={FAUST_VERSION}"' in pyproject  # the pin is the version checked
