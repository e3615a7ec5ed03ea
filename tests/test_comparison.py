"""The signal comparison node end to end: real broker, real workers, real ClickHouse.

A synthetic fraud stream with known labels is scored by two real models; the reference
metrics are computed offline with scikit-learn/statsmodels on the same models' scores.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from sklearn import metrics as skm
from statsmodels.stats.contingency_tables import mcnemar

from abdag.clickhouse import connect
from abdag.comparators.report import build_report
from abdag.demo.fraud import generate
from abdag.topics import input_topic
from abdag.topics.producer import produce
from tests.experiments import (
    offline_scores,
    pair_counts,
    snapshot_pairs,
    wait_for_counts,
    wait_for_snapshots,
    write_compare_dag,
)
from tests.workers import start_worker, stop_worker

pytestmark = pytest.mark.slow
N = 2000
DROP_B = 40  # requests model B refuses: they must end as unpaired 'missing_b'
EARLY_LABELS = 300  # labels produced before their requests


@pytest.fixture(scope="module")
def stream():
    events, labels = generate(N, seed=21)
    for e in events[:DROP_B]:
        e["drop_b"] = True
    label_msgs = [
        {"request_id": e["request_id"], "label": int(y)}
        for e, y in zip(events, labels, strict=True)
    ]
    return events, labels, label_msgs


def run(
    stack, env, tmp_path, models, stream, *, workers=1, disrupt=None, snapshots=False
) -> tuple[str, object]:
    """Run the stream through a fresh DAG; return (experiment, report). ``snapshots``: also
    wait (bounded) for the metric snapshots to count every pair before the worker stops."""
    events, _, label_msgs = stream
    name = f"c{uuid.uuid4().hex[:8]}"
    dag_file = write_compare_dag(tmp_path / f"{name}.py", name, models)
    procs = [start_worker(dag_file, env, tmp_path / f"{name}-{i}.log") for i in range(workers)]
    experiment = f"{name}.ab"
    try:
        if workers > 1:
            time.sleep(6)  # let the group settle so both workers own partitions
        produce(
            stack.broker, input_topic(name, "labels"), label_msgs[:EARLY_LABELS], progress=False
        )
        half = len(events) // 2
        produce(stack.broker, input_topic(name, "tx"), events[:half], progress=False)
        if disrupt is not None:
            procs = disrupt(procs, dag_file, experiment) or procs
        produce(stack.broker, input_topic(name, "tx"), events[half:], progress=False)
        produce(
            stack.broker, input_topic(name, "labels"), label_msgs[EARLY_LABELS:], progress=False
        )
        counts = wait_for_counts(
            stack, experiment, paired=N - DROP_B, labelled=N - DROP_B, missing_b=DROP_B
        )
        if snapshots:
            wait_for_snapshots(stack, experiment, N - DROP_B)
    finally:
        for p in procs:
            stop_worker(p)
    assert counts == {
        "paired": N - DROP_B,
        "labelled": N - DROP_B,
        "missing_a": 0,
        "missing_b": DROP_B,
        "rows": N,
    }
    return experiment, build_report(connect(stack), experiment, n_resamples=200)


@pytest.fixture(scope="module")
def clean_run(stack, tmp_path_factory, fraud_models, stream):
    import os

    env = dict(
        os.environ,
        ABDAG_BROKER=stack.broker,
        ABDAG_CLICKHOUSE_URL=stack.clickhouse_url,
        ABDAG_DATA_DIR=str(stack.data_dir),
    )
    return run(stack, env, tmp_path_factory.mktemp("clean"), fraud_models, stream, snapshots=True)


def test_every_metric_in_clickhouse_equals_scikit_learn(clean_run, fraud_models, stream):
    events, labels, _ = stream
    _, report = clean_run
    kept = slice(DROP_B, None)
    y = labels[kept]
    for side, path in zip("ab", fraud_models, strict=True):
        score = offline_scores(path, events)[kept]
        pred = (score >= 0.5).astype(int)
        expected = {
            "accuracy": skm.accuracy_score(y, pred),
            "precision": skm.precision_score(y, pred, zero_division=0),
            "recall": skm.recall_score(y, pred),
            "f1": skm.f1_score(y, pred),
            "roc_auc": skm.roc_auc_score(y, score),
            "pr_auc": skm.average_precision_score(y, score),
            "log_loss": skm.log_loss(y, score),
        }
        col = 0 if side == "a" else 1
        for name, value in expected.items():
            got = report.metrics[name][col]
            # scores travel as float32 model outputs in JSON: agree to float32 precision
            assert got == pytest.approx(value, rel=1e-5, abs=1e-6), (side, name)
    assert report.verdict.label in ("B better", "B not worse")


def test_mcnemar_p_value_equals_statsmodels(clean_run, fraud_models, stream):
    events, labels, _ = stream
    _, report = clean_run
    y = labels[DROP_B:]
    correct = [(offline_scores(p, events)[DROP_B:] >= 0.5).astype(int) == y for p in fraud_models]
    b01 = int(np.sum(~correct[0] & correct[1]))
    b10 = int(np.sum(correct[0] & ~correct[1]))
    table = [[0, b10], [b01, 0]]
    exact = b01 + b10 < 25
    expected = mcnemar(table, exact=exact, correction=True)
    assert (report.mcnemar.b01, report.mcnemar.b10) == (b01, b10)
    assert report.mcnemar.pvalue == pytest.approx(expected.pvalue, rel=1e-9)


def test_early_and_late_labels_both_join_and_refused_requests_are_unpaired(clean_run, stack):
    experiment, report = clean_run
    assert report.counts["labelled"] == N - DROP_B
    assert report.counts["missing_b"] == DROP_B
    early = (
        connect(stack)
        .query(
            "SELECT countIf(label_ts < request_ts), countIf(label_ts >= request_ts) "
            "FROM pairs FINAL WHERE experiment = {e:String} AND stage = 3",
            parameters={"e": experiment},
        )
        .result_rows[0]
    )
    assert early[0] > 0 and early[1] > 0, f"labels before/after requests: {early}"
    assert report.dead_letters.get("bad input", 0) == DROP_B


def test_live_river_snapshots_are_written_per_partition(clean_run, stack):
    experiment, _ = clean_run
    per_partition = snapshot_pairs(stack, experiment)
    assert sorted(per_partition) == [0, 1, 2, 3]
    assert sum(per_partition.values()) == N - DROP_B  # merged over partitions: every pair once


def _same_metrics(report, reference):
    """Counts and count-based metrics exactly; score-based ones to float32 precision, since
    a model's float32 output can differ in the last bits with the batch it ran in."""
    assert report.counts == reference.counts
    for name, values in reference.metrics.items():
        exact = name in ("accuracy", "precision", "recall", "f1")
        tol = {"rel": 1e-12} if exact else {"rel": 1e-6, "abs": 1e-9}
        assert report.metrics[name][:3] == pytest.approx(values[:3], **tol), name


def test_two_workers_give_the_same_metrics_as_one(
    clean_run, stack, stack_env, tmp_path, fraud_models, stream
):
    _, report = run(stack, stack_env, tmp_path, fraud_models, stream, workers=2)
    _same_metrics(report, clean_run[1])


def test_worker_killed_with_9_and_restarted_gives_the_clean_runs_metrics(
    clean_run, stack, stack_env, tmp_path, fraud_models, stream
):
    def kill_and_restart(procs, dag_file, experiment):
        deadline = time.monotonic() + 60
        while pair_counts(stack, experiment)["paired"] < 300 and time.monotonic() < deadline:
            time.sleep(0.2)
        stop_worker(procs[0], kill=True)
        return [start_worker(dag_file, stack_env, tmp_path / "restarted.log")]

    _, report = run(stack, stack_env, tmp_path, fraud_models, stream, disrupt=kill_and_restart)
    _same_metrics(report, clean_run[1])


def test_clickhouse_stopped_for_10_s_mid_run_loses_and_duplicates_nothing(
    clean_run, stack, stack_env, tmp_path, fraud_models, stream
):
    from abdag.stack import LocalStack

    def outage(procs, dag_file, experiment):
        local = LocalStack(stack)
        local.clickhouse.stop(hard=True)
        time.sleep(10)
        local.up()

    experiment, report = run(stack, stack_env, tmp_path, fraud_models, stream, disrupt=outage)
    _same_metrics(report, clean_run[1])
    client = connect(stack)
    client.command("OPTIMIZE TABLE pairs FINAL")
    raw = client.query(
        "SELECT count() FROM pairs WHERE experiment = {e:String}", parameters={"e": experiment}
    ).result_rows[0][0]
    assert raw == N


SPLIT_DAG = """
from abdag.demo.fraud import features_tensor
from abdag import Dag

dag = Dag({name!r}, partitions=4)
tx = dag.source("tx")
labels = dag.labels("labels")


def features(event):
    return features_tensor(event.payload)


def features_b(event):
    if event.payload.get("drop_b"):
        raise ValueError("drop_b is set: model B refuses this request")
    return features_tensor(event.payload)


def amount_bucket(payload):
    return "large" if payload["amount"] >= 100 else "small"


a = dag.model("model_a", tx, path={a!r}, inputs=features)
b = dag.model("model_b", tx, path={b!r}, inputs=features_b)
dag.compare(
    "ab", a=a, b=b, labels=labels, task="binary", join_timeout=3.0, mode="split", split=0.3,
    segments=["country", {{"amount_bucket": amount_bucket}}],
)
"""


def test_a_split_with_segments_records_who_served_and_each_segment_through_a_real_worker(
    stack, stack_env, tmp_path, fraud_models, stream
):
    """Through Kafka, the join table's changelog, the pairs topic and the sink: every row
    says who served it (B's refused requests are served by no one when B's share holds
    them) and carries its segment values; the report checks the split and tests each
    segment value."""
    from abdag.comparators.decisions import served_side

    events, _, label_msgs = stream
    countries = ("FR", "DE", "US")
    events = [dict(e, country=countries[i % 3]) for i, e in enumerate(events)]
    name = f"s{uuid.uuid4().hex[:8]}"
    dag_file = tmp_path / f"{name}.py"
    dag_file.write_text(SPLIT_DAG.format(name=name, a=str(fraud_models[0]), b=str(fraud_models[1])))
    proc = start_worker(dag_file, stack_env, tmp_path / f"{name}.log")
    experiment = f"{name}.ab"
    try:
        produce(stack.broker, input_topic(name, "tx"), events, progress=False)
        produce(stack.broker, input_topic(name, "labels"), label_msgs, progress=False)
        wait_for_counts(stack, experiment, paired=N - DROP_B, labelled=N - DROP_B, missing_b=DROP_B)
    finally:
        stop_worker(proc)
    client = connect(stack)
    rows = client.query(
        "SELECT request_id, served_by, segments FROM pairs FINAL WHERE experiment = {e:String}",
        parameters={"e": experiment},
    ).result_rows
    got = {rid: (served, dict(seg)) for rid, served, seg in rows}
    expected = {}
    for e in events:
        side = served_side(e["request_id"], mode="split", split=0.3, promoted=False)
        served = "" if side == "b" and e.get("drop_b") else side
        bucket = "large" if e["amount"] >= 100 else "small"
        expected[e["request_id"]] = (served, {"country": e["country"], "amount_bucket": bucket})
    assert got == expected
    report = build_report(client, experiment, n_resamples=200)
    n_b = sum(1 for served, _ in expected.values() if served == "b")
    assert (report.srm.n_a, report.srm.n_b) == (N - n_b - report.srm.not_served, n_b)
    assert report.srm.not_served == sum(1 for served, _ in expected.values() if served == "")
    labels_seen = {v.label for v in report.segments.values}
    assert {"country=FR", "country=DE", "country=US", "amount_bucket=small"} <= labels_seen
