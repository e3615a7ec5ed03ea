"""A two-model DAG on the real broker, run by real `abdag worker` processes."""

from __future__ import annotations

import time
import uuid
from collections import Counter

import pytest

from abdag.demo.fraud import generate
from abdag.topics import dead_letter_topic, input_topic, node_topic
from abdag.topics.packs import partition_for
from abdag.topics.producer import produce
from tests.workers import produce_raw, read_topic, start_worker, stop_worker, write_dag

pytestmark = pytest.mark.slow


def _dag(tmp_path, fraud_models):
    name = f"t{uuid.uuid4().hex[:8]}"
    return name, write_dag(tmp_path / "dag.py", name, fraud_models)


def _outputs(stack, dag_name, node, expect, timeout=90):
    return read_topic(stack.broker, node_topic(dag_name, node), expect=expect, timeout=timeout)


def test_every_request_gets_one_prediction_per_model_in_the_same_partition(
    stack, stack_env, tmp_path, fraud_models
):
    name, dag_file = _dag(tmp_path, fraud_models)
    worker = start_worker(dag_file, stack_env, tmp_path / "worker.log")
    try:
        events, _ = generate(5000, seed=1)
        produce(stack.broker, input_topic(name, "tx"), events, progress=False)
        out_a = _outputs(stack, name, "model_a", 5000)
        out_b = _outputs(stack, name, "model_b", 5000)
    finally:
        stop_worker(worker)
    assert worker.returncode in (0, -15), (tmp_path / "worker.log").read_text()[-3000:]
    sent = {e["request_id"] for e in events}
    for out, model in ((out_a, "model_a"), (out_b, "model_b")):
        ids = Counter(v["request_id"] for _, _, v in out)
        assert set(ids) == sent
        assert max(ids.values()) == 1, "a request was predicted twice"
        assert all(p == partition_for(v["request_id"].encode(), 4) for p, _, v in out), (
            "a request is in its id's partition"
        )
        assert all(v["outputs"][model]["model"] == model for _, _, v in out)
        assert all(0.0 <= v["outputs"][model]["score"] <= 1.0 for _, _, v in out)
    part_a = {v["request_id"]: p for p, _, v in out_a}
    part_b = {v["request_id"]: p for p, _, v in out_b}
    assert part_a == part_b
    # Under load the node fills micro-batches instead of answering one event at a time.
    sizes = [v["outputs"]["model_a"]["batch_size"] for _, _, v in out_a]
    assert max(sizes) > 1
    assert sum(sizes) / len(sizes) > 4, f"mean batch size {sum(sizes) / len(sizes):.1f}"


def test_two_workers_split_partitions_and_cover_every_request(
    stack, stack_env, tmp_path, fraud_models
):
    name, dag_file = _dag(tmp_path, fraud_models)
    workers = [start_worker(dag_file, stack_env, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        time.sleep(6)  # both join the group before traffic starts
        events, _ = generate(2000, seed=2)
        produce(stack.broker, input_topic(name, "tx"), events, progress=False)
        out = _outputs(stack, name, "model_b", 2000)
    finally:
        for w in workers:
            stop_worker(w)
    assert {v["request_id"] for _, _, v in out} == {e["request_id"] for e in events}
    by_worker = Counter(v["outputs"]["model_b"]["worker"] for _, _, v in out)
    assert len(by_worker) == 2, f"one worker did everything: {by_worker}"
    partitions_of = {}
    for p, _, v in out:
        partitions_of.setdefault(v["outputs"]["model_b"]["worker"], set()).add(p)
    a, b = partitions_of.values()
    assert not (a & b), f"two workers processed the same partition: {partitions_of}"


def test_kill_9_of_a_worker_mid_stream_loses_no_request(stack, stack_env, tmp_path, fraud_models):
    name, dag_file = _dag(tmp_path, fraud_models)
    survivor = start_worker(dag_file, stack_env, tmp_path / "survivor.log")
    victim = start_worker(dag_file, stack_env, tmp_path / "victim.log")
    try:
        time.sleep(6)
        events, _ = generate(3000, seed=3)
        produce(stack.broker, input_topic(name, "tx"), events[:1500], progress=False)
        stop_worker(victim, kill=True)
        produce(stack.broker, input_topic(name, "tx"), events[1500:], progress=False)
        out = _outputs(stack, name, "model_a", 3000, timeout=120)
    finally:
        stop_worker(survivor)
        stop_worker(victim, kill=True)
    ids = Counter(v["request_id"] for _, _, v in out)
    missing = {e["request_id"] for e in events} - set(ids)
    redelivered = sum(c - 1 for c in ids.values())
    print(f"\nkill -9: {len(ids)} of 3000 request ids, {redelivered} re-delivered predictions")
    assert not missing, f"{len(missing)} requests lost"


def test_bad_events_go_to_the_dead_letter_topic_with_their_reason(
    stack, stack_env, tmp_path, fraud_models
):
    name, dag_file = _dag(tmp_path, fraud_models)
    good, _ = generate(20, seed=4)
    no_feature = {"request_id": "no-feature", "features": {"amount_log": 1.0}}
    nan_feature = dict(good[0], request_id="nan-feature")
    nan_feature["features"] = dict(good[0]["features"], amount_log=float("nan"))
    bad = [
        b"{not json",
        b"[1, 2, 3]",
        b'{"request_id": {"nested": 1}, "features": {}}',
    ]
    import orjson

    worker = start_worker(dag_file, stack_env, tmp_path / "worker.log")
    try:
        produce_raw(
            stack.broker,
            input_topic(name, "tx"),
            bad
            + [orjson.dumps(no_feature)]
            + [orjson.dumps(nan_feature, option=orjson.OPT_SERIALIZE_NUMPY).replace(b"NaN", b"NaN")]
            + [orjson.dumps(e) for e in good],
        )
        produce_raw(stack.broker, input_topic(name, "labels"), [b'{"label": 1}', b"\xff\xfe"])
        dead = read_topic(stack.broker, dead_letter_topic(name), expect=9, timeout=60)
        out = _outputs(stack, name, "model_a", 20)
    finally:
        stop_worker(worker)
    assert worker.returncode in (0, -15), "the worker crashed"
    assert {v["request_id"] for _, _, v in out} == {e["request_id"] for e in good}
    reasons = Counter((v["node"], v["reason"]) for _, _, v in dead)
    assert reasons[("tx", "undecodable")] == 2
    assert reasons[("tx", "bad request id")] == 1
    assert reasons[("labels", "missing request id")] == 1
    assert reasons[("labels", "undecodable")] == 1
    # orjson writes NaN as null: the feature is then not a number -> refused by the model nodes
    assert reasons[("model_a", "bad input")] == 2 and reasons[("model_b", "bad input")] == 2
    import base64

    originals = {base64.b64decode(v["original"]) for _, _, v in dead}
    assert b"{not json" in originals
    details = " ".join(v["detail"] for _, _, v in dead if v["request_id"] == "no-feature")
    assert "merchant_risk" in details or "missing feature" in details


def test_a_bad_record_in_a_pack_is_dead_lettered_and_its_pack_mates_flow_on(
    stack, stack_env, tmp_path, fraud_models
):
    """A pack on a node topic (as the source sends them) holding 299 good events, a record
    of the wrong kind and a non-object; and a plain one-event record beside it."""
    import base64

    import orjson

    from abdag.topics import encode, request_from_raw
    from abdag.topics.packs import pack

    name, dag_file = _dag(tmp_path, fraud_models)
    good, _ = generate(300, seed=5)
    events = [encode(request_from_raw(orjson.dumps(e), None, 1.0)) for e in good]
    wrong_kind = b'{"v":1,"kind":"label","request_id":"wrong-kind","label":1.0,"ts":1.0}'
    worker = start_worker(dag_file, stack_env, tmp_path / "worker.log")
    try:
        produce_raw(
            stack.broker,
            node_topic(name, "tx"),
            [pack([*events[:299], wrong_kind, b"[1]"]), events[299]],
        )
        dead = read_topic(stack.broker, dead_letter_topic(name), expect=4, timeout=60)
        out = _outputs(stack, name, "model_a", 300)
    finally:
        stop_worker(worker)
    assert worker.returncode in (0, -15), "the worker crashed"
    assert sorted(v["request_id"] for _, _, v in out) == sorted(e["request_id"] for e in good)
    # a pack larger than the model's max_batch is inferred in batches of at most 64
    sizes = Counter(v["outputs"]["model_a"]["batch_size"] for _, _, v in out)
    assert max(sizes) == 64 and sizes[64] >= 4 * 64, sizes
    reasons = Counter((v["node"], v["reason"], v["request_id"]) for _, _, v in dead)
    for model in ("model_a", "model_b"):
        assert reasons[(model, "wrong record kind", "wrong-kind")] == 1
        assert reasons[(model, "undecodable", "")] == 1
    originals = {base64.b64decode(v["original"]) for _, _, v in dead}
    assert orjson.loads(wrong_kind) in [orjson.loads(o) for o in originals]
    assert b"[1]" in originals
    # each names its place in the pack, so two refused records of one pack count as two
    assert sorted(v["index"] for _, _, v in dead) == [299, 299, 300, 300]


def test_an_input_records_headers_reach_its_served_answer_through_the_packs(
    stack, stack_env, tmp_path, fraud_models
):
    """Trace headers a producer set ride in the packs between nodes and come out on the
    served answer of their own request (not a pack-mate's)."""
    import orjson
    from confluent_kafka import Consumer, Producer, TopicPartition

    from abdag.topics import served_topic

    name = f"t{uuid.uuid4().hex[:8]}"
    extra = 'dag.compare("ab", a=a, b=b, labels=labels, task="binary")'
    dag_file = write_dag(tmp_path / "dag.py", name, fraud_models, extra=extra)
    events, _ = generate(200, seed=6)
    worker = start_worker(dag_file, stack_env, tmp_path / "worker.log")
    got: dict[str, list] = {}
    try:
        producer = Producer({"bootstrap.servers": stack.broker, "linger.ms": 20})
        for i, e in enumerate(events):
            headers = [("trace", e["request_id"].encode())] if i % 2 == 0 else None
            producer.produce(input_topic(name, "tx"), orjson.dumps(e), headers=headers)
        assert producer.flush(30) == 0
        consumer = Consumer({"bootstrap.servers": stack.broker, "group.id": "t-served"})
        consumer.assign([TopicPartition(served_topic(name, "ab"), p, 0) for p in range(4)])
        deadline = time.monotonic() + 60
        while len(got) < len(events) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                got[orjson.loads(msg.value())["request_id"]] = msg.headers() or []
        consumer.close()
    finally:
        stop_worker(worker)
    assert worker.returncode in (0, -15), "the worker crashed"
    assert len(got) == len(events)
    for i, e in enumerate(events):
        rid = e["request_id"]
        assert got[rid] == ([("trace", rid.encode())] if i % 2 == 0 else []), rid


def test_a_transform_failing_on_a_record_dead_letters_that_request_only(
    stack, stack_env, tmp_path, fraud_models
):
    import orjson

    name = f"t{uuid.uuid4().hex[:8]}"
    extra = """
def clean(payload):
    if payload.get("boom"):
        raise RuntimeError("boom")
    if payload.get("not_a_dict"):
        return [1]
    return {**payload, "cleaned": True}

cleaned = dag.transform("clean", tx, clean)
"""
    dag_file = write_dag(tmp_path / "dag.py", name, fraud_models, extra=extra)
    good, _ = generate(50, seed=8)
    bad = [dict(good[0], request_id="boom-1", boom=1), dict(good[1], request_id="list-1")]
    bad[1]["not_a_dict"] = 1
    worker = start_worker(dag_file, stack_env, tmp_path / "worker.log")
    try:
        produce_raw(stack.broker, input_topic(name, "tx"), [orjson.dumps(e) for e in good + bad])
        out = _outputs(stack, name, "clean", 50)
        dead = read_topic(stack.broker, dead_letter_topic(name), expect=2, timeout=60)
    finally:
        stop_worker(worker)
    assert worker.returncode in (0, -15), "the worker crashed"
    assert sorted(v["request_id"] for _, _, v in out) == sorted(e["request_id"] for e in good)
    assert all(v["payload"]["cleaned"] for _, _, v in out)
    letters = {v["request_id"]: v for _, _, v in dead if v["node"] == "clean"}
    assert set(letters) == {"boom-1", "list-1"}
    assert all(v["reason"] == "transform error" for v in letters.values())
    assert "RuntimeError: boom" in letters["boom-1"]["detail"]
    assert "not a dict" in letters["list-1"]["detail"]
