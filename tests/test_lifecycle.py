"""Model lifecycle on the real stack: hot swap from the registry, split serving, promote."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter

import pytest
from scipy.stats import binom

from abdag.clickhouse import connect
from abdag.comparators.decisions import PromotionRefused, decide_promotion, latest_decision
from abdag.demo.fraud import generate
from abdag.models.registry import ModelRegistry
from abdag.topics import input_topic, node_topic, served_topic
from abdag.topics.producer import produce
from tests.experiments import wait_for_counts
from tests.workers import read_topic, start_worker, stop_worker

pytestmark = pytest.mark.slow

LIFECYCLE_DAG = """
from abdag.demo.fraud import features_tensor
from abdag import Dag

dag = Dag({name!r}, partitions=4)
tx = dag.source("tx")
labels = dag.labels("labels")


def features(event):
    return features_tensor(event.payload)


a = dag.model("model_a", tx, path={a!r}, inputs=features)
b = dag.model("model_b", tx, path="registry:candidate", inputs=features, reload_interval=0.5)
dag.compare("ab", a=a, b=b, labels=labels, task="binary", join_timeout=3.0, mode="split",
            split=0.3)
"""
SPLIT = 0.3


def _within_binomial(count: int, n: int, p: float) -> bool:
    lo, hi = binom.ppf(0.0005, n, p), binom.ppf(0.9995, n, p)
    return lo <= count <= hi


def test_hot_swap_split_serving_and_promotion(stack, tmp_path, fraud_models):
    path_a, path_b = fraud_models
    registry_dir = tmp_path / "registry"
    registry = ModelRegistry(registry_dir)
    v1 = registry.register("candidate", path_a, task="binary")  # B starts as a copy of A
    name = f"l{uuid.uuid4().hex[:8]}"
    dag_file = tmp_path / "dag.py"
    dag_file.write_text(LIFECYCLE_DAG.format(name=name, a=str(path_a)))
    env = dict(
        os.environ,
        ABDAG_BROKER=stack.broker,
        ABDAG_CLICKHOUSE_URL=stack.clickhouse_url,
        ABDAG_DATA_DIR=str(stack.data_dir),
        ABDAG_MODEL_REGISTRY=str(registry_dir),
    )
    experiment = f"{name}.ab"
    events, labels = generate(3000, seed=31)
    label_msgs = [
        {"request_id": e["request_id"], "label": int(y)}
        for e, y in zip(events, labels, strict=True)
    ]
    worker = start_worker(dag_file, env, tmp_path / "worker.log")
    try:
        # 1. Under load, register a new version: the node swaps without losing a request.
        produce(stack.broker, input_topic(name, "tx"), events[:500], progress=False)
        wait_for_counts(stack, experiment, paired=500)  # v1 is serving

        def swap_midway():
            time.sleep(1.0)
            registry.register("candidate", path_b, task="binary")

        swapper = threading.Thread(target=swap_midway)
        swapper.start()
        produce(stack.broker, input_topic(name, "tx"), events[500:2000], rate=400, progress=False)
        swapper.join()
        produce(stack.broker, input_topic(name, "labels"), label_msgs[:2000], progress=False)
        counts = wait_for_counts(stack, experiment, paired=2000, labelled=2000)
        assert counts["paired"] == 2000 and counts["rows"] == 2000
        outputs = read_topic(stack.broker, node_topic(name, "model_b"), expect=2000)
        versions = Counter(v["outputs"]["model_b"]["version"] for _, _, v in outputs)
        assert len({v["request_id"] for _, _, v in outputs}) == 2000
        assert len(versions) == 2 and all(k.startswith(("v1-", "v2-")) for k in versions), versions
        stored = (
            connect(stack)
            .query(
                "SELECT DISTINCT version_b FROM pairs FINAL WHERE experiment = {e:String}",
                parameters={"e": experiment},
            )
            .result_rows
        )
        assert {r[0] for r in stored} == set(versions)

        # 2. Split serving: a stable 30% of requests are served by B.
        served = read_topic(stack.broker, served_topic(name, "ab"), expect=2000)
        by = Counter(
            v["served_by"]
            for _, _, v in {v["request_id"]: (p, k, v) for p, k, v in served}.values()
        )
        assert by["a"] + by["b"] == 2000
        assert _within_binomial(by["b"], 2000, SPLIT), by

        # 3. Promotion needs the verdict: refused while inconclusive, allowed when forced.
        client = connect(stack)
        try:
            decision = decide_promotion(client, experiment)
            refused = False
        except PromotionRefused as exc:
            refused = True
            assert "--force" in str(exc)
        if refused:
            decision = decide_promotion(client, experiment, force=True, note="test")
            assert decision.forced
        assert latest_decision(client, experiment).served == "b"

        # 4. After promotion B is the champion: it serves the other 70%.
        time.sleep(3)  # workers poll decisions every 2 s
        produce(stack.broker, input_topic(name, "tx"), events[2000:], progress=False)
        served = read_topic(stack.broker, served_topic(name, "ab"), expect=3000)
        late = {v["request_id"]: v["served_by"] for _, _, v in served}
        wave = Counter(late[e["request_id"]] for e in events[2000:])
        assert _within_binomial(wave["b"], 1000, 1 - SPLIT), wave
    finally:
        stop_worker(worker)
    assert v1.version == "v1"


def test_promote_cli_refuses_without_a_verdict_and_records_force(stack, tmp_path):
    import subprocess
    import sys

    from abdag.comparators.rows import PAIR_COLUMNS
    from abdag.comparators.schema import ensure_schema

    experiment = f"p{uuid.uuid4().hex[:6]}.ab"
    client = connect(stack)
    ensure_schema(client)
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    row = dict.fromkeys(PAIR_COLUMNS)
    row.update(
        experiment=experiment,
        request_id="only",
        partition=0,
        status="paired",
        task="binary",
        model_a="a",
        model_b="b",
        version_a="1",
        version_b="1",
        score_a=0.2,
        score_b=0.3,
        pred_a=0,
        pred_b=0,
        label=0.0,
        request_ts=now,
        paired_ts=now,
        label_ts=now,
        stage=3,
        worker="t",
        served_by="a",
        segments={},
    )
    client.insert("pairs", [[row[c] for c in PAIR_COLUMNS]], column_names=PAIR_COLUMNS)
    env = dict(os.environ, ABDAG_BROKER=stack.broker, ABDAG_CLICKHOUSE_URL=stack.clickhouse_url)
    cmd = [sys.executable, "-m", "abdag.cli", "promote", experiment]
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "not enough data" in refused.stderr and "--force" in refused.stderr
    assert latest_decision(client, experiment) is None
    forced = subprocess.run(
        cmd + ["--force", "--note", "hotfix"], env=env, capture_output=True, text=True, timeout=60
    )
    assert forced.returncode == 0, forced.stderr
    assert "forced" in forced.stdout
    d = latest_decision(client, experiment)
    assert (d.served, d.forced, d.note, d.verdict) == ("b", True, "hotfix", "not enough data")


def test_the_newest_decision_of_each_experiment_is_read_in_one_query(stack):
    from datetime import UTC, datetime, timedelta

    from abdag.comparators.decisions import DECISION_COLUMNS, latest_decisions
    from abdag.comparators.schema import ensure_schema

    client = connect(stack)
    ensure_schema(client)
    tag = uuid.uuid4().hex[:6]
    first, second, silent = f"d{tag}.one", f"d{tag}.two", f"d{tag}.none"
    t0 = datetime.now(UTC)
    rows = [
        [first, t0, "promote", "b", 0, "B better", 0.99, "old"],
        [first, t0 + timedelta(seconds=5), "retire", "a", 1, "B worse", 0.97, "new"],
        [second, t0 + timedelta(seconds=1), "promote", "b", 0, "B not worse", 0.95, "only"],
    ]
    client.insert("decisions", rows, column_names=DECISION_COLUMNS)
    got = latest_decisions(client, [first, second, silent])
    assert sorted(got) == [first, second]  # no decision: absent, as latest_decision's None
    assert (got[first].action, got[first].forced, got[first].note) == ("retire", True, "new")
    assert (got[second].action, got[second].served) == ("promote", "b")
    assert latest_decision(client, first) == got[first]


CHALLENGERS_DAG = """
from abdag.demo.fraud import features_tensor
from abdag import Dag

dag = Dag({name!r}, partitions=4)
tx = dag.source("tx")
labels = dag.labels("labels")


def features(event):
    return features_tensor(event.payload)


champion = dag.model("champion", tx, path={a!r}, inputs=features)
retrained = dag.model("retrained", tx, path={b!r}, inputs=features)
broken = dag.model("broken", tx, path={bad!r}, inputs=features)
dag.compare("ab", a=champion, b=[retrained, broken], labels=labels, join_timeout=3.0, margin=0.01)
"""


def test_champion_against_two_challengers_splits_alpha_and_retires_the_worse(
    stack, stack_env, tmp_path, fraud_models
):
    import torch

    from abdag.comparators.decisions import decide_retirement
    from abdag.comparators.report import build_report, group_members

    path_a, path_b = fraud_models
    inverted = torch.jit.script(_Inverted(torch.jit.load(str(path_a))))
    bad = tmp_path / "broken.pt"
    inverted.save(str(bad))
    name = f"g{uuid.uuid4().hex[:8]}"
    dag_file = tmp_path / "dag.py"
    dag_file.write_text(
        CHALLENGERS_DAG.format(name=name, a=str(path_a), b=str(path_b), bad=str(bad))
    )
    events, labels = generate(2000, seed=41)
    label_msgs = [
        {"request_id": e["request_id"], "label": int(y)}
        for e, y in zip(events, labels, strict=True)
    ]
    worker = start_worker(dag_file, stack_env, tmp_path / "worker.log")
    try:
        produce(stack.broker, input_topic(name, "tx"), events, progress=False)
        produce(stack.broker, input_topic(name, "labels"), label_msgs, progress=False)
        for challenger in ("retrained", "broken"):
            wait_for_counts(stack, f"{name}.ab__{challenger}", paired=2000, labelled=2000)
    finally:
        stop_worker(worker)
    client = connect(stack)
    members = group_members(client, f"{name}.ab")
    assert members == [f"{name}.ab__broken", f"{name}.ab__retrained"]
    reports = {m.rsplit("__", 1)[1]: build_report(client, m, n_resamples=200) for m in members}
    assert all(r.alpha == pytest.approx(0.025) for r in reports.values())  # 0.05 over 2
    assert all(r.margin == 0.01 for r in reports.values())  # as declared in the DAG
    assert reports["broken"].verdict.label == "B worse"
    assert reports["retrained"].verdict.label in ("B better", "B not worse")
    with pytest.raises(PromotionRefused):
        decide_retirement(client, f"{name}.ab__retrained")
    retired = decide_retirement(client, f"{name}.ab__broken", note="worse than champion")
    assert (retired.action, retired.forced) == ("retire", False)


class _Inverted(__import__("torch").nn.Module):
    """A challenger that is plainly worse: the champion's logit, negated."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return -self.inner(x)


POLICY_DAG = """
from abdag.demo.fraud import features_tensor
from abdag import Dag, Policy

dag = Dag({name!r}, partitions=4)
tx = dag.source("tx")
labels = dag.labels("labels")


def features(event):
    return features_tensor(event.payload)


def backwards(event):  # a broken feature pipeline: every feature's sign flipped
    return -3.0 * features_tensor(event.payload)


a = dag.model("model_a", tx, path={a!r}, inputs=features)
b = dag.model("model_b", tx, path={a!r}, inputs=backwards)
dag.compare(
    "ab", a=a, b=b, labels=labels, task="binary", mode="split", split={split},
    policy=Policy(rollback_on_worse=True),
)
"""


def test_a_worse_challenger_is_pulled_back_from_split_traffic_by_its_policy(
    stack, stack_env, tmp_path, fraud_models
):
    """On the real stack: B serves its 30% until ``abdag watch`` sees "B worse"; the round
    writes the policy's retire decision, every worker follows it, and the served answers of
    the next requests all come from A."""
    from abdag.watch import Watcher

    name = f"p{uuid.uuid4().hex[:8]}"
    dag_file = tmp_path / "dag.py"
    dag_file.write_text(POLICY_DAG.format(name=name, a=str(fraud_models[0]), split=SPLIT))
    experiment = f"{name}.ab"
    events, labels = generate(2500, seed=37)
    label_msgs = [
        {"request_id": e["request_id"], "label": int(y)}
        for e, y in zip(events, labels, strict=True)
    ]
    worker = start_worker(dag_file, stack_env, tmp_path / "worker.log")
    try:
        produce(stack.broker, input_topic(name, "tx"), events[:1500], progress=False)
        produce(stack.broker, input_topic(name, "labels"), label_msgs[:1500], progress=False)
        wait_for_counts(stack, experiment, paired=1500, labelled=1500)
        served = read_topic(stack.broker, served_topic(name, "ab"), expect=1500)
        first = Counter(v["served_by"] for _, _, v in served)
        assert _within_binomial(first["b"], 1500, SPLIT), first
        client = connect(stack)
        lines: list[str] = []
        watcher = Watcher(client, [experiment], webhook_url="", log=lines.append, n_resamples=50)
        try:
            watcher.run_round()
        finally:
            watcher.close()
        decision = latest_decision(client, experiment)
        assert (decision.action, decision.actor, decision.served) == ("retire", "policy", "a")
        assert decision.verdict == "B worse", decision
        time.sleep(3)  # workers poll decisions every 2 s
        produce(stack.broker, input_topic(name, "tx"), events[1500:], progress=False)
        served = read_topic(stack.broker, served_topic(name, "ab"), expect=2500)
        late = {v["request_id"]: v["served_by"] for _, _, v in served}
        assert Counter(late[e["request_id"]] for e in events[1500:]) == {"a": 1000}
    finally:
        stop_worker(worker)
