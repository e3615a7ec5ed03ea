"""Helpers for tests that run real `abdag worker` processes against the session stack."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from abdag.topics.packs import unpack

TWO_MODEL_DAG = """
from abdag.demo.fraud import features_tensor, generate
from abdag import Dag

dag = Dag({name!r}, partitions=4)
tx = dag.source("tx", sampler=lambda n, seed: generate(n, seed)[0])
labels = dag.labels("labels")

def features(event):
    return features_tensor(event.payload)

a = dag.model("model_a", tx, path={a!r}, inputs=features, max_batch=64, max_wait=0.02)
b = dag.model("model_b", tx, path={b!r}, inputs=features, max_batch=64, max_wait=0.02)
{extra}
"""


def write_dag(path: Path, name: str, models: tuple[Path, Path], extra: str = "") -> Path:
    path.write_text(
        TWO_MODEL_DAG.format(name=name, a=str(models[0]), b=str(models[1]), extra=extra)
    )
    return path


def start_worker(dag_file: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    fh = open(log, "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [sys.executable, "-m", "abdag.cli", "worker", str(dag_file), "--loglevel", "warn"],
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=fh,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_worker(proc: subprocess.Popen, *, kill: bool = False, timeout: float = 20) -> None:
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def read_topic(
    bootstrap: str, topic: str, *, expect: int, partitions: int = 4, timeout: float = 60
) -> list[tuple[int, bytes | None, dict]]:
    """Read a topic from the start (assign, no group) until ``expect`` records or timeout;
    the records of a pack (``abdag.topics.packs``) count one by one."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "test-reader", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out: list[tuple[int, bytes | None, dict]] = []
    deadline = time.monotonic() + timeout
    idle_after_expect = 0
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                if len(out) >= expect:
                    idle_after_expect += 1
                    if idle_after_expect >= 3:  # 1.5 s quiet after reaching the count
                        break
                continue
            if msg.error():
                continue
            for record in unpack(msg.value()):  # a node topic's packs: their records
                out.append((msg.partition(), msg.key(), record.body))
    finally:
        consumer.close()
    return out


def produce_raw(bootstrap: str, topic: str, values: list[bytes]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for v in values:
        producer.produce(topic, value=v)
    assert producer.flush(30) == 0
