"""The model node's hand-over between the agent (reading, decoding) and its inference loop."""

import asyncio

import pytest

from abdag.agents.nodes.model import _hand_over


def test_hand_over_puts_the_batch_when_the_queue_has_room():
    async def scenario():
        queue: asyncio.Queue = asyncio.Queue(maxsize=1)
        consumer = asyncio.ensure_future(asyncio.sleep(10))
        await _hand_over(queue, "batch 1", consumer)
        consumer.cancel()
        return queue.get_nowait()

    assert asyncio.run(scenario()) == "batch 1"


def test_hand_over_waits_for_room_then_puts():
    async def scenario():
        queue: asyncio.Queue = asyncio.Queue(maxsize=1)
        queue.put_nowait("batch 1")
        consumer = asyncio.ensure_future(asyncio.sleep(10))
        handing = asyncio.ensure_future(_hand_over(queue, "batch 2", consumer))
        await asyncio.sleep(0.01)
        waited = not handing.done()
        first = queue.get_nowait()
        await handing
        consumer.cancel()
        return waited, first, queue.get_nowait()

    assert asyncio.run(scenario()) == (True, "batch 1", "batch 2")


def test_a_failed_inference_loop_raises_in_the_agent_instead_of_leaving_it_waiting():
    async def scenario():
        queue: asyncio.Queue = asyncio.Queue(maxsize=1)
        queue.put_nowait("batch 1")  # full: the put waits

        async def failing_loop():
            await asyncio.sleep(0.01)
            raise ConnectionError("output undeliverable")

        consumer = asyncio.ensure_future(failing_loop())
        await asyncio.wait_for(_hand_over(queue, "batch 2", consumer), timeout=5)

    with pytest.raises(ConnectionError, match="output undeliverable"):
        asyncio.run(scenario())


def test_input_agents_may_hold_more_waiting_records_than_node_agents(tmp_path):
    """Input topics carry one request per record and get a deeper agent queue than Faust's
    default; node topics (packs) keep the default. Built offline: no broker is reached."""
    from abdag.agents.app import INPUT_BUFFER, build_app
    from abdag.agents.loader import load_dag
    from abdag.settings import Settings
    from abdag.topics import input_topic, node_topic

    dag_file = tmp_path / "dag.py"
    dag_file.write_text(
        "from abdag import Dag\n"
        "dag = Dag('buffers', partitions=2)\n"
        "tx = dag.source('tx')\n"
        "clean = dag.transform('clean', tx, fn=lambda p: p)\n"
    )
    settings = Settings(
        broker="127.0.0.1:9", clickhouse_url="http://127.0.0.1:9", data_dir=tmp_path / "data"
    )
    app, _ = build_app(load_dag(dag_file), settings)
    depth = {
        agent.channel.get_topic_name(): agent.channel.queue.maxsize for agent in app.agents.values()
    }
    assert depth[input_topic("buffers", "tx")] == INPUT_BUFFER == 16384
    assert depth[node_topic("buffers", "tx")] == app.conf.stream_buffer_maxsize == 4096
