"""One record's content never stops a worker, and nothing a comparison cannot use is dropped
silently: on the real broker and ClickHouse, oversized events and outputs, impossible
labels, duplicate request ids, second labels and labels without a request each become a
dead letter with their reason, while the good requests are compared exactly."""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections import Counter

import orjson
import pytest
from confluent_kafka import Producer
from sklearn import metrics as skm

from abdag.clickhouse import connect
from abdag.comparators.report import build_report
from abdag.comparators.schema import DEAD_LETTER_COUNT
from abdag.demo.fraud import generate
from abdag.topics import dead_letter_topic, input_topic
from abdag.topics.producer import produce
from abdag.topics.records import DEAD_LETTER_ORIGINAL_BYTES
from tests.experiments import offline_scores, wait_for_counts
from tests.workers import read_topic, start_worker, stop_worker

pytestmark = pytest.mark.slow

DAG = """
from abdag.demo.fraud import features_tensor
from abdag import Dag

dag = Dag({name!r}, partitions=4)
tx = dag.source("tx")
labels = dag.labels("labels")


def inflate(payload):
    # an output too large for any Kafka record: the transform's own output is refused
    return {{**payload, "blob": "x" * 1_200_000}} if payload.get("inflate") else payload


wide = dag.transform("inflate", tx, inflate)


def features(event):
    return features_tensor(event.payload)


a = dag.model("model_a", wide, path={a!r}, inputs=features)
b = dag.model("model_b", wide, path={b!r}, inputs=features)
dag.compare("ab", a=a, b=b, labels=labels, task="binary", join_timeout=3.0, label_timeout=8.0)
"""


def _send_large(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 10_000_000})
    for v in values:
        producer.produce(topic, value=v)
    assert producer.flush(30) == 0


def test_bad_content_is_dead_lettered_with_its_reason_and_the_worker_carries_on(
    stack, stack_env, tmp_path, fraud_models
):
    name = f"c{uuid.uuid4().hex[:8]}"
    dag_file = tmp_path / "dag.py"
    dag_file.write_text(DAG.format(name=name, a=str(fraud_models[0]), b=str(fraud_models[1])))
    good, y = generate(40, seed=71)
    inflated, _ = generate(2, seed=72)
    huge = [
        orjson.dumps({"request_id": "huge-800k", "blob": "x" * 800_000}),
        orjson.dumps({"request_id": "huge-5m", "blob": "x" * 5_000_000}),
    ]
    duplicate = {**good[0], "features": {k: v + 1.0 for k, v in good[0]["features"].items()}}
    labels = [
        {"request_id": e["request_id"], "label": int(v)} for e, v in zip(good, y, strict=True)
    ]
    impossible = [{"request_id": good[i]["request_id"], "label": v} for i, v in ((2, 7), (3, -1))]
    impossible.append({"request_id": good[4]["request_id"], "label": 0.5})
    worker = start_worker(dag_file, stack_env, tmp_path / "worker.log")
    try:
        _send_large(stack.broker, input_topic(name, "tx"), huge)
        tx = good + [{**e, "inflate": True} for e in inflated]
        produce(stack.broker, input_topic(name, "tx"), tx, progress=False)
        produce(stack.broker, input_topic(name, "labels"), impossible + labels, progress=False)
        produce(
            stack.broker,
            input_topic(name, "labels"),
            [{"request_id": "never-sent", "label": 1}],
            progress=False,
        )
        counts = wait_for_counts(stack, f"{name}.ab", paired=40, labelled=40, timeout=120)
        produce(stack.broker, input_topic(name, "tx"), [duplicate], progress=False)
        second = {"request_id": good[1]["request_id"], "label": 1 - int(y[1])}
        produce(stack.broker, input_topic(name, "labels"), [second], progress=False)
        dead = read_topic(stack.broker, dead_letter_topic(name), expect=10, timeout=90)
        alive = worker.poll() is None
    finally:
        stop_worker(worker)
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert alive and worker.returncode in (0, -15), f"the worker stopped:\n{log[-3000:]}"
    assert "offsets not committed" not in log
    assert counts["paired"] == 40 and counts["labelled"] == 40 and counts["rows"] == 40

    letters = [v for _, _, v in dead]
    reasons = Counter((v["node"], v["reason"]) for v in letters)
    assert reasons == {
        ("tx", "too large"): 2,
        ("inflate", "too large to send"): 2,
        ("ab", "bad label"): 3,
        ("ab", "label without request"): 1,
        ("ab", "duplicate request id"): 1,
        ("ab", "conflicting label"): 1,
    }, reasons
    for raw in huge:  # a bounded prefix of the original, with the whole one's size and hash
        (letter,) = [v for v in letters if v.get("original_size") == len(raw)]
        assert letter["reason"] == "too large" and f"{len(raw)} bytes" in letter["detail"]
        assert letter["original_sha256"] == hashlib.sha256(raw).hexdigest()
        assert base64.b64decode(letter["original"]) == raw[:DEAD_LETTER_ORIGINAL_BYTES]
    sent_inflated = {e["request_id"] for e in inflated}
    assert {v["request_id"] for v in letters if v["node"] == "inflate"} == sent_inflated
    bad_labels = {v["request_id"] for v in letters if v["reason"] == "bad label"}
    assert bad_labels == {good[i]["request_id"] for i in (2, 3, 4)}
    (dup,) = [v for v in letters if v["reason"] == "duplicate request id"]
    assert dup["request_id"] == good[0]["request_id"]
    (orphan,) = [v for v in letters if v["reason"] == "label without request"]
    assert orphan["request_id"] == "never-sent"

    client = connect(stack)
    rows = client.query(
        f"SELECT reason, {DEAD_LETTER_COUNT}, max(original_size) FROM dead_letters "
        "WHERE dag = {d:String} GROUP BY reason",
        parameters={"d": name},
    ).result_rows
    table = {r: (int(n), int(size)) for r, n, size in rows}
    assert {r: n for r, (n, _) in table.items()} == {
        "too large": 2,
        "too large to send": 2,
        "bad label": 3,
        "label without request": 1,
        "duplicate request id": 1,
        "conflicting label": 1,
    }
    assert table["too large"][1] == max(len(v) for v in huge)

    # the good requests, with their first payload and first label, are compared exactly
    report = build_report(client, f"{name}.ab", n_resamples=100)
    for col, path in enumerate(fraud_models):
        score = offline_scores(path, good)
        assert report.metrics["accuracy"][col] == pytest.approx(
            skm.accuracy_score(y, score >= 0.5), rel=1e-12
        )
        assert report.metrics["log_loss"][col] == pytest.approx(skm.log_loss(y, score), rel=1e-6)
    assert report.dead_letters["duplicate request id"] == 1
    assert "conflicting label 1" in report.render()
