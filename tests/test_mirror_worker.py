"""Fractional mirroring through a real worker: broker, models, comparison, ClickHouse.

B mirrors 10% of the requests: its model node scores only those (its topic holds nothing
else), the pairs table holds exactly those (the set computed here by the hash, apart from
the worker), A's served answers cover every request, and the report states the share.
"""

from __future__ import annotations

import uuid

import pytest

from abdag.clickhouse import connect
from abdag.comparators.decisions import mirrored
from abdag.comparators.report import build_report
from abdag.demo.fraud import generate
from abdag.topics import input_topic, node_topic, served_topic
from abdag.topics.producer import produce
from tests.experiments import wait_for_counts
from tests.workers import read_topic, start_worker, stop_worker

pytestmark = pytest.mark.slow
N = 1500
MIRROR = 0.1

MIRROR_DAG = """
from abdag.demo.fraud import features_tensor
from abdag import Dag

dag = Dag({name!r}, partitions=4)
tx = dag.source("tx")
labels = dag.labels("labels")


def features(event):
    return features_tensor(event.payload)


a = dag.model("model_a", tx, path={a!r}, inputs=features)
b = dag.model("model_b", tx, path={b!r}, inputs=features)
dag.compare("ab", a=a, b=b, labels=labels, task="binary", join_timeout=3.0, mirror={mirror!r})
"""


def test_b_scores_and_the_pairs_hold_only_the_mirrored_requests_and_a_serves_all(
    stack, stack_env, tmp_path, fraud_models
):
    events, labels = generate(N, seed=33)
    ids = [e["request_id"] for e in events]
    expected = {r for r in ids if mirrored(r, MIRROR)}  # the hash, apart from the worker
    m = len(expected)
    assert 0.06 * N < m < 0.14 * N
    name = f"m{uuid.uuid4().hex[:8]}"
    dag_file = tmp_path / f"{name}.py"
    dag_file.write_text(
        MIRROR_DAG.format(name=name, a=str(fraud_models[0]), b=str(fraud_models[1]), mirror=MIRROR)
    )
    proc = start_worker(dag_file, stack_env, tmp_path / f"{name}.log")
    experiment = f"{name}.ab"
    label_msgs = [{"request_id": r, "label": int(y)} for r, y in zip(ids, labels, strict=True)]
    try:
        produce(stack.broker, input_topic(name, "tx"), events, progress=False)
        produce(stack.broker, input_topic(name, "labels"), label_msgs, progress=False)
        counts = wait_for_counts(stack, experiment, paired=m, labelled=m)
        served = read_topic(stack.broker, served_topic(name, "ab"), expect=N, timeout=60)
        scored_b = read_topic(stack.broker, node_topic(name, "model_b"), expect=m, timeout=30)
    finally:
        stop_worker(proc)
    # only the mirrored requests were joined: nothing missing, nothing else
    assert counts == {"paired": m, "labelled": m, "missing_a": 0, "missing_b": 0, "rows": m}
    client = connect(stack)
    rows = client.query(
        "SELECT request_id, served_by FROM pairs FINAL WHERE experiment = {e:String}",
        parameters={"e": experiment},
    ).result_rows
    assert {r for r, _ in rows} == expected and {s for _, s in rows} == {"a"}
    # B's model node scored the mirrored requests and sent nothing for the others
    assert {body["request_id"] for _, _, body in scored_b} == expected
    # A's answer was served for every request
    assert {body["request_id"] for _, _, body in served} == set(ids)
    assert {body["served_by"] for _, _, body in served} == {"a"}
    report = build_report(client, experiment, n_resamples=200)
    assert report.mirror == MIRROR and report.counts["dead_letters"] == 0
    assert f"B mirrors 10% of requests: {m:,} compared of about {round(m / MIRROR):,}" in (
        report.render()
    )
    assert report.to_dict()["mirror"]["compared"] == m
