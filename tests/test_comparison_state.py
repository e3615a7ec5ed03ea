"""The comparison node's logic without Faust or Kafka: a dict for its store, a number for
its clock. Pairing, labels early and late, expiries and their ticks, every refusal that
becomes a dead letter, who serves, snapshot cadence, and metrics that replays leave alone
(checked against scikit-learn)."""

from __future__ import annotations

import math

import orjson
import pytest
from sklearn import metrics as skm

from abdag.agents.dag import Comparison
from abdag.comparators import comparison
from abdag.comparators.comparison import (
    EXPIRY_CHECK_EVERY,
    LABEL,
    TICK,
    TICK_RESEND_AFTER,
    A,
    B,
    ComparisonState,
    Incoming,
)
from abdag.comparators.decisions import mirrored, stable_share
from abdag.topics.packs import Packed
from abdag.topics.records import Event, Label, Prediction, encode, fields_of


def spec(**kw) -> Comparison:
    kw = {"a": "m_a", "b": "m_b", "labels": "y", "task": "binary", **kw}
    kw.setdefault("join_timeout", 10.0)
    kw.setdefault("label_timeout", 60.0)
    return Comparison("ab", ("m_a", "m_b", "y"), **kw)


def make(store: dict | None = None, **kw) -> ComparisonState:
    return ComparisonState(
        spec(**kw), {} if store is None else store, experiment="d.ab", worker="w1"
    )


def prediction(model: str, rid: str, score, *, digest: str = "p0", label=None) -> Packed:
    """What model node ``model`` sends on for request ``rid`` (as read from a pack)."""
    if label is None and not isinstance(score, list):
        label = int(score >= 0.5)
    p = Prediction(model, "v1", score, score, label, 2.0, "w", 1, 0.0)
    ev = Event(rid, 100.0, {"x": 1}, {model: fields_of(p)}, digest=digest)
    return Packed(orjson.loads(encode(ev)), [("trace", rid.encode())])


def label(rid: str, y: float, ts: float = 0.0) -> Packed:
    return Packed(orjson.loads(encode(Label(rid, float(y), ts))), None)


def tick(rid: str) -> Packed:
    return Packed(rid, None)


def a(*records: Packed, partition: int = 0) -> Incoming:
    return Incoming(A, partition, list(records), source=f"a@{partition}")


def b(*records: Packed, partition: int = 0) -> Incoming:
    return Incoming(B, partition, list(records), source=f"b@{partition}")


def labels(*records: Packed, partition: int = 0) -> Incoming:
    return Incoming(LABEL, partition, list(records), source=f"label@{partition}")


def ticks(*rids: str, partition: int = 0) -> Incoming:
    return Incoming(TICK, partition, [tick(r) for r in rids], source="tick")


def reasons(out) -> list[tuple[str, str]]:
    return [(r.error.reason, r.error.request_id) for r in out.refused]


# -- pairing and labels ---------------------------------------------------------------------
def test_a_and_b_make_a_pair_row_and_a_late_label_upgrades_it():
    state = make()
    out = state.process([a(prediction("m_a", "r1", 0.9))], now=1.0)
    assert out.pairs == {} and out.refused == []
    out = state.process([b(prediction("m_b", "r1", 0.3))], now=2.0)
    partition, row = out.pairs["r1"]
    assert partition == 0
    assert (row["status"], row["stage"], row["label"]) == ("paired", 2, None)
    assert (row["experiment"], row["worker"], row["paired_ts"]) == ("d.ab", "w1", 2.0)
    assert (row["score_a"], row["score_b"], row["pred_a"], row["pred_b"]) == (0.9, 0.3, 1, 0)
    assert row["request_ts"] == 100.0

    late = state.process([labels(label("r1", 1, ts=50.0))], now=50.0)
    row = late.pairs["r1"][1]
    assert (row["stage"], row["label"], row["label_ts"]) == (3, 1.0, 50.0)
    m = state.metrics[0]
    assert (m.n_pairs, m.n_labelled) == (1, 1)


def test_a_label_first_joins_when_the_pair_completes_and_a_batch_gives_the_newest_row():
    state = make()
    assert state.process([labels(label("r1", 0))], now=0.0).pairs == {}
    out = state.process([a(prediction("m_a", "r1", 0.2)), b(prediction("m_b", "r1", 0.6))], 1.0)
    assert out.pairs["r1"][1]["stage"] == 3
    # A, B and the label of another request in one batch: one row, the labelled one
    out = state.process(
        [a(prediction("m_a", "r2", 0.7)), b(prediction("m_b", "r2", 0.8)), labels(label("r2", 1))],
        now=2.0,
    )
    assert list(out.pairs) == ["r2"] and out.pairs["r2"][1]["stage"] == 3
    m = state.metrics[0]
    assert (m.n_pairs, m.n_labelled) == (2, 2)


def test_rows_keep_the_partition_the_records_came_from():
    state = make()
    out = state.process(
        [a(prediction("m_a", "r", 0.5), partition=3), b(prediction("m_b", "r", 0.5), partition=3)],
        now=0.0,
    )
    assert out.pairs["r"][0] == 3 and out.pairs["r"][1]["partition"] == 3
    assert list(state.metrics) == [3]


def test_on_incoming_is_told_each_incoming_before_its_records_are_handled():
    seen: list[tuple[str, int]] = []

    class Store(dict):
        def __setitem__(self, key, value):
            seen.append(("write", key))
            super().__setitem__(key, value)

    state = ComparisonState(
        spec(),
        Store(),
        experiment="d.ab",
        worker="w",
        on_incoming=lambda i: seen.append(("incoming", i.source)),
    )
    state.process([a(prediction("m_a", "r", 0.5)), b(prediction("m_b", "r", 0.5))], now=0.0)
    assert seen == [("incoming", "a@0"), ("write", "r"), ("incoming", "b@0"), ("write", "r")]


def test_a_clock_is_read_as_each_incoming_is_handled():
    times = iter([5.0, 7.0])
    state = make()
    out = state.process(
        [a(prediction("m_a", "r", 0.5)), b(prediction("m_b", "r", 0.5))], now=lambda: next(times)
    )
    assert out.pairs["r"][1]["paired_ts"] == 7.0  # when B's pack was handled
    assert state.join.store["r"]["first"] == 5.0


# -- expiries ----------------------------------------------------------------------------
def test_a_missing_side_expires_as_missing_b_after_the_join_timeout_and_pairs_if_late():
    state = make(join_timeout=10.0)
    state.process([a(prediction("m_a", "r", 0.5))], now=0.0)
    assert state.next_deadline() == 10.0
    assert state.next_check(0.0) == EXPIRY_CHECK_EVERY  # a new request may be due sooner
    assert state.next_check(9.5) == 10.0  # the join's deadline is the sooner
    assert state.ticks_due(9.9) == []
    assert state.ticks_due(10.0) == ["r"]
    # the tick is on its way to the partition's owner: not sent again meanwhile
    assert state.ticks_due(10.5) == []
    assert state.next_check(10.5) == 10.5 + EXPIRY_CHECK_EVERY

    out = state.process([ticks("r")], now=10.6)
    row = out.pairs["r"][1]
    assert (row["status"], row["stage"], row["score_b"]) == ("missing_b", 1, None)
    assert state.next_deadline() == 10.6 + 60.0  # now it waits for B or a label
    late = state.process([b(prediction("m_b", "r", 0.4))], now=12.0)
    assert (late.pairs["r"][1]["status"], late.pairs["r"][1]["stage"]) == ("paired", 2)
    assert state.metrics[0].n_pairs == 1


def test_a_tick_that_never_comes_back_is_sent_again_and_ticks_per_look_are_bounded(
    monkeypatch,
):
    state = make(join_timeout=1.0)
    state.process([a(*(prediction("m_a", f"r{i}", 0.5) for i in range(5)))], now=0.0)
    monkeypatch.setattr(comparison, "TICKS_PER_ROUND", 3)
    first = state.ticks_due(1.0)
    assert len(first) == 3
    second = state.ticks_due(1.1)
    assert len(second) == 2 and not set(first) & set(second)
    assert state.ticks_due(1.0 + TICK_RESEND_AFTER - 0.01) == []
    # the partition moved, say: nobody here expired them, so they go out again
    assert sorted(state.ticks_due(1.0 + TICK_RESEND_AFTER)) == sorted(first)


def test_a_tick_for_a_request_not_due_or_unknown_changes_nothing():
    state = make(join_timeout=10.0)
    state.process([a(prediction("m_a", "r", 0.5))], now=0.0)
    out = state.process([ticks("r", "never-seen")], now=5.0)
    assert out.pairs == {} and out.refused == []
    assert state.ticks_due(10.0) == ["r"]


def test_a_quiet_look_does_not_go_through_the_store():
    class Counting(dict):
        scans = 0

        def items(self):
            Counting.scans += 1
            return super().items()

    state = make(Counting(), join_timeout=10.0)
    state.process([a(prediction("m_a", "r", 0.5))], now=0.0)
    state.ticks_due(0.0)  # the first look rescans the store (entries recovered meanwhile)
    assert Counting.scans == 1
    for t in range(1, 10):
        assert state.ticks_due(float(t)) == []
    assert Counting.scans == 1
    assert state.ticks_due(30.0) == ["r"] and Counting.scans == 2  # the join's rescan


def test_entries_recovered_from_the_changelog_expire_after_the_rescan():
    store: dict = {}
    state = make(store, join_timeout=10.0)
    assert state.ticks_due(0.0) == []
    # the partition moved here: its entries came in by recovery, not through the state
    store["moved"] = {"first": 0.0, "stage": 0, "a": {"score": 0.5}, "touched": 0.0}
    assert state.ticks_due(20.0) == []  # not known before the join's next rescan
    assert state.ticks_due(30.0) == ["moved"]
    out = state.process([ticks("moved")], now=30.0)
    assert out.pairs["moved"][1]["status"] == "missing_b"


def test_a_label_whose_request_never_came_is_refused_after_the_label_timeout():
    state = make(label_timeout=60.0)
    state.process([labels(label("orphan", 1))], now=0.0)
    assert state.ticks_due(59.0) == []
    assert state.ticks_due(60.0) == ["orphan"]
    incoming = ticks("orphan", partition=2)
    out = state.process([incoming], now=60.0)
    (refused,) = out.refused
    assert refused.error.reason == "label without request"
    assert refused.error.request_id == "orphan" and "60 s" in refused.error.detail
    assert refused.incoming is incoming and refused.record.body == "orphan"
    assert out.pairs == {} and "orphan" not in state.join.store


# -- refusals ----------------------------------------------------------------------------
def test_a_second_payload_under_a_known_request_id_is_refused_once_and_counts_nothing():
    state = make()
    state.process([a(prediction("m_a", "r", 0.9)), b(prediction("m_b", "r", 0.2))], now=0.0)
    before = state.metrics[0].snapshot()
    dup_a = prediction("m_a", "r", 0.1, digest="p1")
    dup_b = prediction("m_b", "r", 0.1, digest="p1")
    incoming = a(dup_a)
    out = state.process([incoming, b(dup_b)], now=1.0)
    assert reasons(out) == [("duplicate request id", "r")]  # one event, both sides saw it
    assert out.refused[0].incoming is incoming and out.refused[0].record is dup_a
    assert out.pairs == {}
    assert _same(state.metrics[0].snapshot(), before)


def test_a_different_second_label_is_refused_and_the_same_label_again_replays():
    state = make()
    state.process([a(prediction("m_a", "r", 0.9)), b(prediction("m_b", "r", 0.2))], now=0.0)
    state.process([labels(label("r", 1))], now=1.0)
    out = state.process([labels(label("r", 0))], now=2.0)
    assert reasons(out) == [("conflicting label", "r")]
    assert "already has label 1; label 0 not used" in out.refused[0].error.detail
    again = state.process([labels(label("r", 1))], now=3.0)
    assert again.refused == [] and again.pairs["r"][1]["stage"] == 3
    assert state.metrics[0].n_labelled == 1


def test_impossible_labels_are_refused_before_the_join():
    state = make()
    out = state.process([labels(label("r1", 7), label("r2", 0.5), label("r3", 1))], now=0.0)
    assert reasons(out) == [("bad label", "r1"), ("bad label", "r2")]
    assert "r1" not in state.join.store and "r3" in state.join.store


def test_a_multiclass_label_the_models_do_not_know_is_refused_once_their_width_is_seen():
    state = make(task="multiclass")
    assert state.process([labels(label("early", 5))], now=0.0).refused == []  # width unknown
    probs = [0.2, 0.5, 0.3]
    state.process([a(prediction("m_a", "r", probs, label=1))], now=1.0)
    out = state.process([labels(label("r", 3), label("s", 2))], now=2.0)
    assert reasons(out) == [("bad label", "r")]
    assert "they output 3 classes" in out.refused[0].error.detail


def test_records_that_are_not_what_the_side_reads_are_refused_with_their_record():
    state = make()
    not_an_event = Packed({"v": 1, "kind": "label", "request_id": "x", "label": 1, "ts": 0}, None)
    other_model = prediction("m_b", "r", 0.5)  # on A's input: no output of m_a
    out = state.process([a(not_an_event, other_model)], now=0.0)
    assert reasons(out) == [("wrong record kind", "x"), ("missing output", "r")]
    assert [r.record for r in out.refused] == [not_an_event, other_model]
    with pytest.raises(ValueError, match="unknown side"):
        state.process([Incoming("c", 0, [])], now=0.0)


# -- serving -------------------------------------------------------------------------------
def served_by(state: ComparisonState, rids: list[str], now: float = 0.0) -> dict[str, str]:
    out = state.process(
        [
            a(*(prediction("m_a", r, 0.6) for r in rids)),
            b(*(prediction("m_b", r, 0.4) for r in rids)),
        ],
        now,
    )
    answers = [orjson.loads(v) for _, v, _ in out.served]
    by = {x["request_id"]: x["served_by"] for x in answers}
    assert len(answers) == len(by) == len(rids)  # each request answered once
    assert [k for k, _, _ in out.served] == [x["request_id"].encode() for x in answers]
    return by


def test_shadow_serves_the_champion_with_its_headers_and_b_once_promoted():
    state = make()
    out = state.process([a(prediction("m_a", "r", 0.6)), b(prediction("m_b", "r", 0.4))], 0.0)
    ((key, value, headers),) = out.served
    answer = orjson.loads(value)
    assert key == b"r" and headers == [("trace", b"r")]
    assert (answer["served_by"], answer["model"], answer["score"]) == ("a", "m_a", 0.6)
    state.serve(promoted=True)
    assert set(served_by(state, ["s1", "s2"]).values()) == {"b"}


def test_split_serves_a_stable_share_by_b_and_follows_promote_and_retire():
    rids = [f"req-{i}" for i in range(2000)]
    to_b = {r for r in rids if stable_share(r) < 0.3}
    state = make(mode="split", split=0.3)
    by = served_by(state, rids)
    assert {r for r, side in by.items() if side == "b"} == to_b
    assert 0.25 < len(to_b) / len(rids) < 0.35
    # the same requests again (a replay) are answered by the same side
    assert served_by(state, rids[:100], now=1.0) == {r: by[r] for r in rids[:100]}

    promoted = make(mode="split", split=0.3)
    promoted.serve(promoted=True)  # B is the champion: A answers the share
    by = served_by(promoted, rids)
    assert {r for r, side in by.items() if side == "a"} == to_b

    retired = make(mode="split", split=0.3)
    retired.serve(promoted=False, retired=True)
    assert set(served_by(retired, rids).values()) == {"a"}


def test_control_is_a_dict_a_decisions_follower_may_update_in_place():
    state = make()
    state.control.update(promoted=True, retired=False)
    assert served_by(state, ["r"]) == {"r": "b"}


def test_pair_rows_say_whose_answer_was_served():
    """served_by, for the SRM check: the side whose served answer went out, on every row
    of the request; '' when the serving side's prediction never came (none went out)."""
    rids = [f"req-{i}" for i in range(400)]
    state = make(mode="split", split=0.3)
    out = state.process([a(*(prediction("m_a", r, 0.6) for r in rids))], now=0.0)
    served = {orjson.loads(v)["request_id"]: orjson.loads(v)["served_by"] for _, v, _ in out.served}
    to_b = [r for r in rids if stable_share(r) < 0.3]
    assert set(served) == set(rids) - set(to_b) and set(served.values()) == {"a"}
    # B answers half of its requests; the other half of its predictions are dead letters
    late = to_b[::2]
    out = state.process([b(*(prediction("m_b", r, 0.4) for r in late))], now=1.0)
    assert {orjson.loads(v)["request_id"] for _, v, _ in out.served} == set(late)
    assert {r: row["served_by"] for r, (_, row) in out.pairs.items()} == dict.fromkeys(late, "b")
    expired = state.process([ticks(*rids)], now=20.0).pairs  # join_timeout passed
    rows = {r: row for r, (_, row) in expired.items()}
    assert set(rows) == set(rids) - set(late)  # the unpaired ones
    for r, row in rows.items():
        assert row["status"] == "missing_b" and row["stage"] == 1
        assert row["served_by"] == ("" if r in to_b else "a")
    # a label later (and a replay) keep who served, even after a promotion changed it
    state.serve(promoted=True)
    r = late[0]
    assert state.process([labels(label(r, 1))], now=21.0).pairs[r][1]["served_by"] == "b"
    replay = state.process([a(prediction("m_a", r, 0.6))], now=22.0)
    assert replay.pairs[r][1]["served_by"] == "b"
    assert [orjson.loads(v)["served_by"] for _, v, _ in replay.served] == ["a"]  # promoted now


def test_served_by_survives_the_store_and_a_label_that_came_first():
    store: dict = {}
    first = make(store, mode="split", split=1.0)  # B serves every request
    assert first.process([labels(label("r", 0)), b(prediction("m_b", "r", 0.2))], 0.0).pairs == {}
    second = make(store, mode="split", split=1.0)  # another worker took the partition
    _, row = second.process([a(prediction("m_a", "r", 0.7))], 1.0).pairs["r"]
    assert (row["stage"], row["served_by"]) == (3, "b")


# -- snapshots ---------------------------------------------------------------------------
def pair(rid: str, y: int | None = None) -> list[Incoming]:
    batch = [a(prediction("m_a", rid, 0.8)), b(prediction("m_b", rid, 0.3))]
    return [*batch, labels(label(rid, y))] if y is not None else batch


def test_a_snapshot_every_n_counted_updates_per_partition():
    state = make(snapshot_every=3, snapshot_interval=1000.0)
    assert state.process(pair("r1") + pair("r2"), now=0.0).snapshots == []
    out = state.process(pair("r3"), now=1.0)  # the third update
    ((partition, rows),) = out.snapshots
    assert partition == 0
    metrics = {(r["model"], r["metric"]) for r in rows}
    assert {("a", "latency_p50_ms"), ("pair", "n_pairs")} <= metrics  # no label yet
    assert all(r["n"] == 3 and r["worker"] == "w1" and r["experiment"] == "d.ab" for r in rows)
    assert not any(math.isnan(r["value"]) for r in rows)
    # a label after its pair is one more update; replays are none
    state.process([labels(label("r1", 1)), labels(label("r2", 0))], now=2.0)
    assert state.process(pair("r1") + [labels(label("r1", 1))], now=3.0).snapshots == []
    assert len(state.process([labels(label("r3", 1))], now=4.0).snapshots) == 1


def test_a_snapshot_every_interval_for_partitions_with_updates():
    state = make(snapshot_every=1000, snapshot_interval=5.0)
    assert state.snapshots_due(100.0) == []  # nothing counted yet
    state.process(pair("r1"), now=0.0)
    state.process([a(prediction("m_a", "q", 0.5), partition=1)], now=0.0)  # no pair: no update
    ((partition, rows),) = state.snapshots_due(5.0)
    assert partition == 0 and {r["ts"] for r in rows} == {"1970-01-01T00:00:05+00:00"}
    assert state.snapshots_due(20.0) == []  # no update since
    state.process(pair("r2"), now=21.0)
    assert [p for p, _ in state.snapshots_due(21.0)] == [0]
    state.process(pair("r3"), now=22.0)
    assert state.snapshots_due(25.9) == []  # the last one is not 5 s old
    assert [p for p, _ in state.snapshots_due(26.0)] == [0]


# -- metrics -------------------------------------------------------------------------------
def test_metrics_equal_scikit_learn_and_replays_count_nothing():
    scores_a = [0.91, 0.12, 0.67, 0.38, 0.83, 0.26, 0.55, 0.04, 0.71, 0.47]
    scores_b = [0.72, 0.33, 0.48, 0.15, 0.94, 0.61, 0.86, 0.21, 0.58, 0.09]
    y = [1, 0, 1, 0, 1, 0, 0, 0, 1, 1]
    rids = [f"r{i}" for i in range(len(y))]
    first_half = [
        a(*(prediction("m_a", r, s) for r, s in zip(rids, scores_a, strict=True))),
        b(*(prediction("m_b", r, s) for r, s in zip(rids[:5], scores_b[:5], strict=True))),
        labels(*(label(r, v) for r, v in zip(rids[:3], y[:3], strict=True))),
    ]
    second_half = [
        b(*(prediction("m_b", r, s) for r, s in zip(rids[5:], scores_b[5:], strict=True))),
        labels(*(label(r, v) for r, v in zip(rids[3:], y[3:], strict=True))),
    ]
    state = make()
    state.process(first_half, now=1.0)
    rows = state.process(second_half, now=2.0).pairs
    assert {rid: row["stage"] for rid, (_, row) in rows.items()} == dict.fromkeys(rids[3:], 3)

    def values():
        snap = state.metrics[0].snapshot()
        return {
            side: {k: v for k, v in snap[side].items() if k != "roc_auc_err_bound"}
            for side in ("a", "b", "pair")
        }

    measured = values()
    # every record again, as after a kill -9 or a rebalance: the same rows, no new counts
    replay = state.process(first_half + second_half, now=3.0)
    assert {r: (row["stage"], row["label"]) for r, (_, row) in replay.pairs.items()} == {
        r: (3, float(v)) for r, v in zip(rids, y, strict=True)
    }
    assert replay.refused == [] and replay.snapshots == []
    assert values() == measured

    for side, scores in (("a", scores_a), ("b", scores_b)):
        pred = [int(s >= 0.5) for s in scores]
        got = measured[side]
        assert got["n"] == len(y)
        assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), rel=1e-12)
        assert got["precision"] == pytest.approx(skm.precision_score(y, pred), rel=1e-12)
        assert got["recall"] == pytest.approx(skm.recall_score(y, pred), rel=1e-12)
        assert got["f1"] == pytest.approx(skm.f1_score(y, pred), rel=1e-12)
        assert got["log_loss"] == pytest.approx(skm.log_loss(y, scores), rel=1e-9)
        # scores in distinct bins of the 1000-bin histogram: its AUCs are exact
        assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(y, scores), rel=1e-12)
        assert got["pr_auc"] == pytest.approx(skm.average_precision_score(y, scores), rel=1e-9)
    agree = sum(int(sa >= 0.5) == int(sb >= 0.5) for sa, sb in zip(scores_a, scores_b, strict=True))
    assert measured["pair"]["n_pairs"] == len(y)
    assert measured["pair"]["agreement"] == pytest.approx(agree / len(y))


# -- mirroring (dag.compare(mirror=...)) ----------------------------------------------------
def test_a_mirrored_comparison_pairs_only_the_mirrored_requests_and_a_serves_all():
    rids = [f"req-{i}" for i in range(400)]
    kept = {r for r in rids if mirrored(r, 0.25)}
    assert 60 < len(kept) < 140
    state = make(mirror=0.25, join_timeout=10.0)
    # B's node sends nothing for an unmirrored request: only A's answers and the labels come
    out = state.process(
        [
            a(*(prediction("m_a", r, 0.6) for r in rids)),
            b(*(prediction("m_b", r, 0.3) for r in rids if r in kept)),
            labels(*(label(r, 1) for r in rids)),
        ],
        now=0.0,
    )
    answers = [orjson.loads(v) for _, v, _ in out.served]
    assert sorted(x["request_id"] for x in answers) == sorted(rids)  # A answers every one
    assert {x["served_by"] for x in answers} == {"a"}
    assert set(out.pairs) == kept and out.refused == []
    assert {row["status"] for _, row in out.pairs.values()} == {"paired"}
    assert {row["stage"] for _, row in out.pairs.values()} == {3}
    assert set(state.join.store) == kept  # nothing of the others waits in the join
    m = state.metrics[0]
    assert (m.n_pairs, m.n_labelled) == (len(kept), len(kept))
    # no deadline ever comes for the others: no missing_b, no 'label without request'
    late = state.process([ticks(*state.ticks_due(1e6))], now=1e6)
    assert late.pairs == {} and late.refused == []


def test_an_unmirrored_request_is_served_by_a_even_once_b_is_promoted():
    rids = [f"p-{i}" for i in range(200)]
    state = make(mirror=0.5)
    state.serve(promoted=True)
    out = state.process(
        [
            a(*(prediction("m_a", r, 0.6) for r in rids)),
            b(*(prediction("m_b", r, 0.3) for r in rids if mirrored(r, 0.5))),
        ],
        now=0.0,
    )
    by = {orjson.loads(v)["request_id"]: orjson.loads(v)["served_by"] for _, v, _ in out.served}
    assert by == {r: "b" if mirrored(r, 0.5) else "a" for r in rids}


def test_a_b_record_for_an_unmirrored_request_is_not_joined_and_bad_labels_still_refused():
    rids = [f"x-{i}" for i in range(100)]
    skipped = [r for r in rids if not mirrored(r, 0.2)]
    state = make(mirror=0.2)
    # a B node that mirrored more (during a redeploy, say) sent one: not served, not joined
    out = state.process([b(prediction("m_b", skipped[0], 0.3))], now=0.0)
    assert out.served == [] and out.pairs == {} and skipped[0] not in state.join.store
    out = state.process([labels(label(skipped[1], 7))], now=0.0)
    assert reasons(out) == [("bad label", skipped[1])]


def _same(x: dict, y: dict) -> bool:
    """Snapshots equal, NaN equal to NaN (a metric not defined yet)."""
    same = x.keys() == y.keys() and all(x[k].keys() == y[k].keys() for k in x)
    return same and all(
        a == b or (math.isnan(a) and math.isnan(b))
        for k in x
        for a, b in zip(x[k].values(), y[k].values(), strict=True)
    )
