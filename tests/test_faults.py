"""Fault tests on the full A/B DAG: malformed traffic, and workers joining and leaving."""

from __future__ import annotations

import base64
import uuid
import warnings
from collections import Counter

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import NonInteractiveExampleWarning
from sklearn import metrics as skm

from abdag.clickhouse import connect
from abdag.comparators.report import build_report
from abdag.demo.fraud import FEATURES, generate
from abdag.topics import dead_letter_topic, input_topic, node_topic
from abdag.topics.producer import produce
from tests.experiments import offline_scores, pair_counts, wait_for_counts, write_compare_dag
from tests.workers import produce_raw, read_topic, start_worker, stop_worker

pytestmark = pytest.mark.slow

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
# A 'features' value the model's input builder must refuse: wrong container, wrong types,
# or a feature missing.
bad_features = st.one_of(
    json_scalars,
    st.lists(json_scalars, max_size=5),
    st.dictionaries(st.sampled_from(FEATURES), st.text(max_size=5), min_size=1),
    st.dictionaries(st.sampled_from(FEATURES), st.floats(-5, 5), max_size=len(FEATURES) - 1),
)


def _undecodable(raw: bytes, i: int) -> bytes:
    return raw + b"\x00" + str(i).encode()  # a NUL byte is never valid JSON


@st.composite
def _templates(draw):
    return (
        draw(st.lists(st.binary(max_size=40), min_size=20, max_size=20)),
        draw(st.lists(bad_features, min_size=20, max_size=20)),
    )


def _draw_templates():
    found = []

    @settings(max_examples=1, database=None, suppress_health_check=list(HealthCheck))
    @given(_templates())
    def collect(t):
        found.append(t)

    collect()
    return found[0]


def test_ten_thousand_malformed_events_are_dead_lettered_and_good_ones_compared_once(
    stack, stack_env, tmp_path, fraud_models
):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonInteractiveExampleWarning)
        raw_templates, feature_templates = _draw_templates()
    name = f"f{uuid.uuid4().hex[:8]}"
    dag_file = write_compare_dag(tmp_path / "dag.py", name, fraud_models)
    good, labels = generate(1000, seed=51)
    undecodable = [_undecodable(raw_templates[i % 20], i) for i in range(4000)]
    wrong_types = [
        orjson.dumps({"request_id": f"bad-{i}", "features": feature_templates[i % 20]})
        for i in range(4000)
    ]
    huge = [orjson.dumps({"request_id": f"huge-{i}", "blob": "x" * 600_000}) for i in range(5)]
    bad_labels = [b'{"label": 1}', b'{"request_id": "x", "label": "yes"}'] * 500
    n_bad = len(undecodable) + len(wrong_types) + len(huge) + len(bad_labels)
    assert n_bad >= 9000
    good_raw = [orjson.dumps(e) for e in good]
    duplicated = good_raw[:200]  # the same requests sent twice: compared once
    rng = np.random.default_rng(0)
    traffic = good_raw + duplicated + undecodable + wrong_types + huge
    traffic = [traffic[i] for i in rng.permutation(len(traffic))]
    label_msgs = [
        orjson.dumps({"request_id": e["request_id"], "label": int(y)})
        for e, y in zip(good, labels, strict=True)
    ]
    worker = start_worker(dag_file, stack_env, tmp_path / "worker.log")
    try:
        produce_raw(stack.broker, input_topic(name, "tx"), traffic)
        produce_raw(stack.broker, input_topic(name, "labels"), label_msgs + bad_labels)
        counts = wait_for_counts(stack, f"{name}.ab", paired=1000, labelled=1000, timeout=240)
        expected_dead = len(undecodable) + 2 * len(wrong_types) + len(huge) + len(bad_labels)
        dead = read_topic(stack.broker, dead_letter_topic(name), expect=expected_dead, timeout=240)
    finally:
        stop_worker(worker)
    assert worker.returncode in (0, -15), "the worker crashed"
    assert counts == {
        "paired": 1000,
        "labelled": 1000,
        "missing_a": 0,
        "missing_b": 0,
        "rows": 1000,
    }

    letters = [v for _, _, v in dead]
    reasons = Counter((v["node"], v["reason"]) for v in letters)
    originals = Counter(base64.b64decode(v["original"]) for v in letters if v["node"] == "tx")
    assert all(originals[raw] >= 1 for raw in undecodable), "an undecodable event went missing"
    assert reasons[("tx", "undecodable")] >= len(undecodable)
    assert reasons[("tx", "too large")] == len(huge)
    by_rid = Counter((v["node"], v["request_id"]) for v in letters)
    for i in range(len(wrong_types)):
        assert by_rid[("model_a", f"bad-{i}")] >= 1 and by_rid[("model_b", f"bad-{i}")] >= 1
    label_reasons = Counter(v["reason"] for v in letters if v["node"] == "labels")
    assert sum(label_reasons.values()) >= len(bad_labels)
    assert {"missing request id", "bad label"} <= set(label_reasons)

    report = build_report(connect(stack), f"{name}.ab", n_resamples=100)
    y = labels
    for col, path in enumerate(fraud_models):
        pred = offline_scores(path, good) >= 0.5
        assert report.metrics["accuracy"][col] == pytest.approx(skm.accuracy_score(y, pred))
        assert report.metrics["f1"][col] == pytest.approx(skm.f1_score(y, pred))


def test_workers_joining_and_leaving_mid_stream_lose_and_double_count_nothing(
    stack, stack_env, tmp_path, fraud_models
):
    name = f"j{uuid.uuid4().hex[:8]}"
    dag_file = write_compare_dag(tmp_path / "dag.py", name, fraud_models)
    events, labels = generate(2000, seed=61)
    label_msgs = [
        {"request_id": e["request_id"], "label": int(y)}
        for e, y in zip(events, labels, strict=True)
    ]
    experiment = f"{name}.ab"
    first = start_worker(dag_file, stack_env, tmp_path / "first.log")
    joined = None
    try:
        produce(stack.broker, input_topic(name, "tx"), events[:700], progress=False)
        wait_for_counts(stack, experiment, paired=300)
        joined = start_worker(dag_file, stack_env, tmp_path / "joined.log")  # joins
        produce(stack.broker, input_topic(name, "tx"), events[700:1400], rate=500, progress=False)
        stop_worker(first)  # leaves (SIGTERM) while traffic flows
        produce(stack.broker, input_topic(name, "tx"), events[1400:], progress=False)
        produce(stack.broker, input_topic(name, "labels"), label_msgs, progress=False)
        counts = wait_for_counts(stack, experiment, paired=2000, labelled=2000, timeout=180)
    finally:
        stop_worker(first)
        if joined is not None:
            stop_worker(joined)
    assert counts == {
        "paired": 2000,
        "labelled": 2000,
        "missing_a": 0,
        "missing_b": 0,
        "rows": 2000,
    }
    predictions = read_topic(stack.broker, node_topic(name, "model_a"), expect=2000)
    workers = Counter(v["outputs"]["model_a"]["worker"] for _, _, v in predictions)
    assert len(workers) == 2, f"both workers took part: {workers}"
    report = build_report(connect(stack), experiment, n_resamples=100)
    for col, path in enumerate(fraud_models):
        score = offline_scores(path, events)
        assert report.metrics["accuracy"][col] == pytest.approx(
            skm.accuracy_score(labels, score >= 0.5), rel=1e-12
        )
        assert report.metrics["roc_auc"][col] == pytest.approx(
            skm.roc_auc_score(labels, score), rel=1e-5
        )
    assert pair_counts(stack, experiment)["rows"] == 2000
