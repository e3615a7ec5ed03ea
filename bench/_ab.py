"""A/B DAG runs shared by bench/comparison.py and bench/end_to_end.py.

Requests are the demo's synthetic fraud transactions (abdag.demo.fraud) with request ids
``<prefix><i>`` and ``ts`` set by the producer at send time; labels are
``{"request_id", "label"}`` messages. Pairs are read back from ClickHouse (``pairs``).
A DAG is warmed up with a few requests (rounds repeat until pairs come from every worker
when several run), then measured.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from abdag.agents.loader import load_dag
from abdag.agents.topology import dag_topics
from abdag.demo.fraud import generate
from abdag.topics import input_topic
from bench._harness import (
    PairStats,
    Record,
    Stack,
    Workers,
    create_topics,
    drain_timeout,
    pair_stats,
    produce,
    unique_name,
    wait_pairs,
)

STAGE_PAIRED, STAGE_LABELLED = 2, 3


class FraudStream:
    """Request and label records built from ``generate(size)`` (indices wrap around)."""

    def __init__(self, size: int = 5000, seed: int = 21) -> None:
        events, labels = generate(size, seed)
        self.bodies = [{"features": e["features"], "amount": e["amount"]} for e in events]
        self.labels = [int(y) for y in labels]

    def request(self, prefix: str, i: int) -> Record:
        rid = f"{prefix}{i}"
        body = {"request_id": rid, "ts": time.time(), **self.bodies[i % len(self.bodies)]}
        return rid.encode(), orjson.dumps(body)

    def label(self, prefix: str, i: int) -> Record:
        rid = f"{prefix}{i}"
        return rid.encode(), orjson.dumps(
            {"request_id": rid, "label": self.labels[i % len(self.labels)]}
        )


class IndexStream(FraudStream):
    """Requests whose payload is only an index (for DAGs whose input builder picks a row of
    a fixed matrix: model-bound runs where JSON parsing must not dominate)."""

    def request(self, prefix: str, i: int) -> Record:
        rid = f"{prefix}{i}"
        return rid.encode(), orjson.dumps({"request_id": rid, "ts": time.time(), "i": i})


@dataclass
class AbDag:
    """A DAG file with a source ``tx``, optionally labels ``labels``, and comparisons."""

    name: str
    file: Path
    comparisons: Sequence[str]
    has_labels: bool = True

    @property
    def experiments(self) -> list[str]:
        return [f"{self.name}.{c}" for c in self.comparisons]

    def create_topics(self, stack: Stack) -> None:
        create_topics(stack, dag_topics(load_dag(self.file)))

    @classmethod
    def fraud(cls, stack: Stack, models: tuple[Path, Path], prefix: str) -> AbDag:
        """A fresh fraud A/B DAG (tests.experiments.COMPARE_DAG, comparison ``ab``) with
        its topics created."""
        from tests.experiments import write_compare_dag

        name = unique_name(prefix)
        dag = cls(name, write_compare_dag(stack.work / f"{name}.py", name, models), ["ab"])
        dag.create_topics(stack)
        return dag


@dataclass
class AbRun:
    stats: PairStats
    wall_s: float  # first produce call -> every expected pair visible in ClickHouse
    requests: int
    visible: int

    @property
    def wall_rate(self) -> float:
        return self.requests / self.wall_s if self.wall_s > 0 else float("nan")


def produce_requests(
    stack: Stack,
    dag: AbDag,
    stream: FraudStream,
    prefix: str,
    n: int,
    *,
    labels: bool,
    rate: float | None = None,
) -> None:
    if labels:
        produce(
            stack.bootstrap,
            input_topic(dag.name, "labels"),
            lambda i: stream.label(prefix, i),
            n,
        )
    produce(
        stack.bootstrap,
        input_topic(dag.name, "tx"),
        lambda i: stream.request(prefix, i),
        n,
        rate=rate,
    )


def warm_up(
    stack: Stack,
    procs: Workers,
    dag: AbDag,
    stream: FraudStream,
    *,
    count: int = 100,
    workers: int = 1,
    labels: bool = True,
    rounds: int = 6,
) -> float:
    """Send ``count`` requests per round until all pair (from ``workers`` distinct workers);
    return seconds from the first warm-up produce to the first round's pairs."""
    started = time.monotonic()
    first = 0.0
    stage = STAGE_LABELLED if labels else STAGE_PAIRED
    for r in range(rounds):
        prefix = f"w{r}-"
        produce_requests(stack, dag, stream, prefix, count, labels=labels)
        expect = count * len(dag.experiments)
        seen, at = wait_pairs(
            stack,
            dag.experiments,
            prefix,
            expect,
            stage=stage,
            timeout=120 + drain_timeout(expect, 20),  # the first round waits for start-up
            procs=procs,
        )
        if seen < expect:
            raise RuntimeError(f"warm-up round {r}: {seen} of {expect} pairs")
        first = first or at - started
        if workers <= 1 or pair_stats(stack, dag.experiments, prefix).workers >= workers:
            return first
        time.sleep(3.0)  # a rebalance is still settling
    raise RuntimeError(f"pairs never came from {workers} workers after {rounds} rounds")


def measure(
    stack: Stack,
    procs: Workers,
    dag: AbDag,
    stream: FraudStream,
    n: int,
    *,
    labels: bool = True,
    rate: float | None = None,
    prefix: str = "m-",
    poll: float = 0.25,
) -> AbRun:
    """Produce ``n`` requests (labels first when ``labels``) and wait for their pairs,
    asking ClickHouse every ``poll`` seconds (the wall time's resolution; each poll is a
    query that takes CPU from the workers)."""
    stage = STAGE_LABELLED if labels else STAGE_PAIRED
    expect = n * len(dag.experiments)
    started = time.monotonic()
    produce_requests(stack, dag, stream, prefix, n, labels=labels, rate=rate)
    seen, at = wait_pairs(
        stack,
        dag.experiments,
        prefix,
        expect,
        stage=stage,
        timeout=drain_timeout(expect, 20),
        interval=poll,
        procs=procs,
    )
    if seen < expect:
        raise RuntimeError(f"only {seen} of {expect} pairs in ClickHouse before the deadline")
    return AbRun(pair_stats(stack, dag.experiments, prefix), at - started, n, seen)
