"""The A/B join by request id: pairing, labels early and late, timeouts, re-deliveries."""

from __future__ import annotations

import pytest

from abdag.comparators.join import LABELLED, PAIRED, UNPAIRED, PairJoin
from abdag.topics.records import BadRecord


def make(join_timeout=10.0, label_timeout=60.0, keep_done=30.0) -> PairJoin:
    return PairJoin(
        join_timeout=join_timeout, label_timeout=label_timeout, keep_done=keep_done, store={}
    )


def test_both_sides_make_a_pair_and_a_late_label_upgrades_it():
    join = make()
    assert join.offer_prediction("b", "r", {"score": 0.2}, now=0) is None
    pair = join.offer_prediction("a", "r", {"score": 0.8}, now=1)
    assert (pair.stage, pair.status, pair.newly_paired, pair.label) == (
        PAIRED,
        "paired",
        True,
        None,
    )
    labelled = join.offer_label("r", 1.0, label_ts=50, now=50)
    assert labelled.stage == LABELLED and labelled.label == 1.0 and labelled.label_ts == 50
    assert labelled.newly_labelled and not labelled.newly_paired


def test_a_label_that_arrives_first_joins_when_the_pair_completes():
    join = make()
    assert join.offer_label("r", 0.0, label_ts=0, now=0) is None
    assert join.offer_prediction("a", "r", {"score": 0.1}, now=1) is None
    done = join.offer_prediction("b", "r", {"score": 0.3}, now=2)
    assert done.stage == LABELLED and done.newly_paired and done.newly_labelled
    assert done.label == 0.0


def test_a_missing_side_is_emitted_unpaired_after_the_join_timeout_and_pairs_if_late():
    join = make(join_timeout=10)
    join.offer_prediction("a", "r", {"score": 0.5}, now=0)
    assert list(join.due(now=9)) == []
    assert list(join.due(now=10)) == ["r"]
    unpaired = join.expire("r", now=10)
    assert (unpaired.stage, unpaired.status) == (UNPAIRED, "missing_b")
    late = join.offer_prediction("b", "r", {"score": 0.4}, now=12)
    assert late.stage == PAIRED and late.newly_paired


def test_redelivered_events_replay_the_same_row_without_counting_again():
    join = make()
    join.offer_prediction("a", "r", {"score": 0.5}, now=0)
    join.offer_prediction("b", "r", {"score": 0.6}, now=0)
    join.offer_label("r", 1.0, label_ts=1, now=1)
    for replay in (
        join.offer_prediction("a", "r", {"score": 0.5}, now=2),
        join.offer_prediction("b", "r", {"score": 0.6}, now=2),
        join.offer_label("r", 1.0, label_ts=1, now=2),
    ):
        assert replay.replay and replay.stage == LABELLED
        assert not replay.newly_paired and not replay.newly_labelled
    # a side seen before the pair completed replays nothing (nothing was emitted yet)
    join.offer_prediction("a", "s", {"score": 0.5}, now=0)
    assert join.offer_prediction("a", "s", {"score": 0.5}, now=1) is None


def test_finished_and_abandoned_entries_are_forgotten():
    join = make(join_timeout=5, label_timeout=60, keep_done=30)
    join.offer_prediction("a", "done", {}, now=0)
    join.offer_prediction("b", "done", {}, now=0)
    join.offer_label("done", 1.0, label_ts=0, now=0)
    join.offer_prediction("a", "nolabel", {}, now=0)
    join.offer_prediction("b", "nolabel", {}, now=0)
    join.offer_label("orphan", 1.0, label_ts=0, now=0)
    assert sorted(join.due(now=30)) == ["done"]
    assert join.expire("done", now=30) is None and "done" not in join.store
    assert sorted(join.due(now=60)) == ["nolabel", "orphan"]
    assert join.expire("nolabel", now=60) is None
    with pytest.raises(BadRecord, match="label without request") as refused:
        join.expire("orphan", now=60)  # forgotten, but said: a label whose request never came
    assert refused.value.request_id == "orphan"
    assert join.store == {}
    assert join.expire("orphan", now=61) is None  # said once


def test_a_second_payload_under_a_known_request_id_is_refused_once_and_the_first_kept():
    join = make(join_timeout=5, label_timeout=60)
    join.offer_prediction("a", "r", {"score": 0.1}, now=0, digest="d1")
    with pytest.raises(BadRecord, match="duplicate request id"):
        join.offer_prediction("a", "r", {"score": 0.9}, now=1, digest="d2")
    # B sees the second event too: one event, refused once
    assert join.offer_prediction("b", "r", {"score": 0.8}, now=1, digest="d2") is None
    paired = join.offer_prediction("b", "r", {"score": 0.2}, now=2, digest="d1")
    assert paired.status == "paired" and (paired.a, paired.b) == ({"score": 0.1}, {"score": 0.2})
    # the first event read again (same payload) is a replay, not a duplicate
    assert join.offer_prediction("a", "r", {"score": 0.1}, now=3, digest="d1").replay


def test_a_different_second_label_is_refused_and_the_same_label_again_is_a_replay():
    join = make(join_timeout=5, label_timeout=60)
    join.offer_prediction("a", "r", {"score": 0.1}, now=0)
    join.offer_prediction("b", "r", {"score": 0.2}, now=0)
    assert join.offer_label("r", 1.0, label_ts=1, now=1).label == 1.0
    assert join.offer_label("r", 1.0, label_ts=2, now=2).replay
    with pytest.raises(BadRecord, match="already has label 1; label 0 not used"):
        join.offer_label("r", 0.0, label_ts=3, now=3)
    assert join.store["r"]["label"] == 1.0
