"""The join table survives its worker: a new worker recovers it from the changelog the
comparison node wrote (with abdag's own producer, in the records Faust writes) and pairs B
outputs with the A outputs and labels the first worker saw."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner
from confluent_kafka import Consumer, Producer, TopicPartition

from abdag.agents.loader import load_dag
from abdag.agents.topology import dag_topics
from abdag.topics import Event, Label, Prediction, encode, node_topic
from abdag.topics.admin import ensure_topics
from tests.experiments import wait_for_counts
from tests.workers import start_worker, stop_worker

pytestmark = pytest.mark.slow
K = 200  # requests

DAG = """
from abdag import Dag

dag = Dag({name!r}, partitions=4)
tx = dag.source("tx")
labels = dag.labels("labels")
a = dag.model("model_a", tx, path={model!r}, inputs=lambda e: None)
b = dag.model("model_b", tx, path={model!r}, inputs=lambda e: None)
dag.compare("ab", a=a, b=b, labels=labels, task="binary", join_timeout=600.0)
"""


def _prediction(side: str, i: int) -> tuple[bytes, bytes]:
    """What model node ``model_<side>`` publishes for request ``r<i>``."""
    rid, score = f"r{i}", (i % 10) / 10 + (0.05 if side == "a" else 0.02)
    pred = Prediction(
        model=f"model_{side}",
        version="v1",
        output=score,
        score=score,
        label=int(score >= 0.5),
        latency_ms=1.0,
        worker="test",
        batch_size=1,
        ts=time.time(),
    )
    ev = Event(request_id=rid, ts=time.time(), payload={}, outputs={f"model_{side}": asdict(pred)})
    return rid.encode(), encode(ev)


def _send(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
    for key, value in records:
        producer.produce(topic, value, key)
    assert producer.flush(30) == 0


def _newest_records(bootstrap: str, topic: str, *, until_complete: int, timeout: float = 60):
    """key -> (partition, value) of a changelog's newest records, read until that many
    requests have both their A output and their label."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-changelog"})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(4)])
    newest: dict[bytes, tuple[int, dict]] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                newest[msg.key()] = (msg.partition(), orjson.loads(msg.value()))
            complete = sum(1 for _, v in newest.values() if v.get("a") and "label" in v)
            if complete >= until_complete:
                return newest
    finally:
        consumer.close()
    raise AssertionError(f"changelog holds {complete} complete requests of {until_complete}")


def test_a_new_worker_pairs_b_with_the_a_and_labels_it_recovered_from_the_changelog(
    stack, stack_env, tmp_path, fraud_models
):
    name = f"r{uuid.uuid4().hex[:8]}"
    dag_file = tmp_path / f"{name}.py"
    dag_file.write_text(DAG.format(name=name, model=str(fraud_models[0])))
    ensure_topics(stack.broker, dag_topics(load_dag(dag_file)), 4)
    changelog = f"abdag-{name}-ab-join-changelog"

    first = start_worker(dag_file, stack_env, tmp_path / "first.log")
    try:
        _send(stack.broker, node_topic(name, "model_a"), [_prediction("a", i) for i in range(K)])
        labels = [
            (f"r{i}".encode(), encode(Label(f"r{i}", float(i % 2), time.time()))) for i in range(K)
        ]
        _send(stack.broker, node_topic(name, "labels"), labels)
        # the first worker's state, as the changelog holds it: each request's newest record,
        # in its key's partition, with its A output and its label
        newest = _newest_records(stack.broker, changelog, until_complete=K)
        faust_partition = DefaultPartitioner()  # where Faust's own table write would go
        assert all(
            p == faust_partition(key, [0, 1, 2, 3], [0, 1, 2, 3]) for key, (p, _) in newest.items()
        )
    finally:
        stop_worker(first)

    second = start_worker(dag_file, stack_env, tmp_path / "second.log")
    try:
        _send(stack.broker, node_topic(name, "model_b"), [_prediction("b", i) for i in range(K)])
        counts = wait_for_counts(stack, f"{name}.ab", timeout=90, paired=K, labelled=K)
    finally:
        stop_worker(second)
    assert counts == {"paired": K, "labelled": K, "missing_a": 0, "missing_b": 0, "rows": K}
