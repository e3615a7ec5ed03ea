"""Policies (comparators/policy.py): what ``evaluate`` decides and ``apply`` records, on the
real ClickHouse engine (chdb, in-process), with a fake clock (``now``), no Kafka.

A worse challenger in a split is retired at the first evaluation whose verdict is ``B
worse`` and then serves nothing; a better one is promoted only once ``min_pairs`` and
``min_minutes`` have held, never while the SRM check fires; a guardrail retires B with the
figures it saw in the row; a dry run writes ``would_*`` rows that no worker follows;
evaluating again writes nothing; ``undo`` reverses a policy's decision.

One module-scoped chdb path and database (the ``client`` fixture): each test uses its own
experiment names.
"""

from __future__ import annotations

import datetime as dt
import json

import clickhouse_connect
import numpy as np
import pytest

from abdag import Dag, Policy
from abdag.agents.errors import DagError
from abdag.agents.validate import validate
from abdag.comparators.decisions import (
    DECISION_COLUMNS,
    NothingToUndo,
    decision_history,
    latest_decision,
    latest_decisions,
    served_side,
    serving,
    stable_share,
    undo,
)
from abdag.comparators.policy import apply, evaluate, held_state
from abdag.comparators.report import build_report
from abdag.comparators.schema import SCHEMA_VERSION, TABLES, ensure_schema, schema_version
from tests.test_report import COLS, _binary_data, _rows

pytestmark = pytest.mark.timeout(120)

T0 = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC)  # the policy's clock
IDS = [f"req-{i}" for i in range(2000)]  # request ids to ask served_side about
COL = {c: i for i, c in enumerate(COLS)}


def _declare(client, experiment, policy, *, mode="split", split=0.1, model_b="retrained"):
    cols = [c for c, _ in TABLES["experiments"].columns]
    row = dict.fromkeys(cols, "")
    row.update(
        experiment=experiment,
        updated_ts=dt.datetime.now(dt.UTC),
        dag=experiment.split(".")[0],
        comparison=experiment.split(".")[1],
        group_size=1,
        model_a="prod",
        model_b=model_b,
        task="binary",
        mode=mode,
        split=split,
        margin=0.0,
        mirror=1.0,
        policy=policy.to_json() if policy is not None else "",
    )
    client.insert("experiments", [[row[c] for c in cols]], column_names=cols)


def _pairs(experiment, n, *, worse=False, seed=1, split=0.1, served_all_a=False, start=0):
    """``n`` labelled pairs, B better (or ``worse``); ``served_by`` as the split's hash
    gives it (all 'a' with ``served_all_a``: a routing bug the SRM check catches)."""
    y, sa, sb, pa, pb = _binary_data(n, seed=seed, swap=worse)
    rows = _rows(experiment, "binary", y, sa, sb, pa, pb, start=start)
    for r in rows:
        to_b = stable_share(r[COL["request_id"]]) < split
        r[COL["served_by"]] = "b" if to_b and not served_all_a else "a"
    return rows


def _insert(client, rows):
    client.insert("pairs", rows, column_names=COLS)


def _b_share(decision, mode="split", split=0.1) -> int:
    """How many of IDS B answers under the decision in force."""
    flags = serving(decision)
    return sum(served_side(r, mode=mode, split=split, **flags) == "b" for r in IDS)


def _rows_of(client, experiment):
    return decision_history(client, experiment)


# ------------------------------------------------------------------ the declaration
def _dag(**compare):
    dag = Dag("p")
    src = dag.source("q")
    a = dag.model("a", src, path="a.pt", inputs=lambda e: e.payload["x"])
    b = dag.model("b", src, path="b.pt", inputs=lambda e: e.payload["x"])
    dag.compare("ab", a=a, b=b, labels=dag.labels("y"), **compare)
    return dag


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (Policy(promote_on="B better"), r"promote_on must be a tuple of verdicts, e\.g\. promote"),
        (Policy(promote_on=("B great",)), r"promote_on may name"),
        (Policy(max_missing_b_rate=2.0), r"max_missing_b_rate must be None or a rate in \[0, 1\]"),
        (Policy(max_latency_p99_ms=0), r"max_latency_p99_ms must be None or milliseconds > 0"),
        (Policy(min_pairs=-1), r"min_pairs must be an integer >= 0"),
        (Policy(rollback_on_worse=False), r"it does nothing"),
        ({"promote_on": ["B better"]}, r"policy must be abdag\.Policy\(\.\.\.\) or None, got dict"),
    ],
)
def test_a_malformed_policy_is_refused_naming_the_node(policy, message):
    with pytest.raises(DagError, match=rf"node 'ab': (policy: )?.*{message}"):
        validate(_dag(policy=policy), load_models=False)


def test_a_policy_is_checked_recorded_as_json_and_read_back():
    p = Policy(promote_on=["B better", "B not worse"], min_pairs=500, max_latency_p99_ms=250.0)
    dag = _dag(policy=p, margin=0.01)
    validate(dag, load_models=False)
    assert dag.nodes["ab"].policy is p and p.promote_on == ("B better", "B not worse")
    assert Policy.from_json(p.to_json()) == p and Policy.from_json("") is None
    assert json.loads(p.to_json())["max_latency_p99_ms"] == 250.0
    # a newer writer's key is left out, not an error
    assert Policy.from_json(json.dumps({**p.to_dict(), "later": 1})) == p
    # promoting on a verdict needs labels
    dag = Dag("p")
    src = dag.source("q")
    a = dag.model("a", src, path="a.pt", inputs=lambda e: e.payload["x"])
    b = dag.model("b", src, path="b.pt", inputs=lambda e: e.payload["x"])
    dag.compare("ab", a=a, b=b, policy=Policy(promote_on=("B better",)))
    with pytest.raises(DagError, match=r"node 'ab': policy: promote_on=.* needs labels"):
        validate(dag, load_models=False)
    # the worker's experiments row has the column, last
    assert TABLES["experiments"].columns[-1] == ("policy", "String")


def test_the_schema_migrates_to_the_policy_columns(client):
    client.command("CREATE DATABASE IF NOT EXISTS policy_schema")
    c = clickhouse_connect.get_client(interface="chdb", path=client.path, database="policy_schema")
    try:
        ensure_schema(c)
        c.command("ALTER TABLE experiments DROP COLUMN policy")  # before schema 10
        c.command("ALTER TABLE decisions DROP COLUMN actor")
        c.command("ALTER TABLE decisions DROP COLUMN figures")
        c.command("DROP TABLE policy_state")
        ensure_schema(c)
        cols = {r[0]: r[1] for r in c.query("DESCRIBE TABLE experiments").result_rows}
        assert cols["policy"] == "String"
        cols = {r[0]: r[1] for r in c.query("DESCRIBE TABLE decisions").result_rows}
        assert (cols["actor"], cols["figures"]) == ("LowCardinality(String)", "String")
        cols = [r[0] for r in c.query("DESCRIBE TABLE policy_state").result_rows]
        assert cols == [name for name, _ in TABLES["policy_state"].columns]
        assert schema_version(c) == SCHEMA_VERSION >= 10
    finally:
        c.close()


# ------------------------------------------------------------------ pulling B back
def test_a_worse_challenger_in_a_split_is_retired_at_the_first_b_worse_verdict(client):
    e = "pol.worse"
    _declare(client, e, Policy(rollback_on_worse=True))
    rows = _pairs(e, 450, worse=True)
    _insert(client, rows[:150])  # fewer than 200 labelled pairs: not enough data
    assert build_report(client, e, n_resamples=50).verdict.label == "not enough data"
    assert evaluate(client, e, T0) is None
    assert 100 < _b_share(latest_decision(client, e)) < 300  # B serves its 10%
    _insert(client, rows[150:])
    action = evaluate(client, e, T0 + dt.timedelta(minutes=1))
    assert action is not None and (action.action, action.served) == ("retire", "a")
    assert action.verdict == "B worse" and action.reason.startswith("verdict 'B worse'")
    d = apply(client, action)
    assert (d.action, d.actor, d.forced) == ("retire", "policy", False)
    assert d.note.startswith("policy: verdict 'B worse'")
    in_force = latest_decision(client, e)  # what every worker's follower reads
    assert (in_force.action, in_force.actor) == ("retire", "policy")
    assert _b_share(in_force) == 0  # 0 of 2000 request ids served by B
    figures = json.loads(in_force.figures)
    assert figures["verdict"] == "B worse" and figures["labelled"] == 450
    assert figures["requests"] == 450 and figures["policy"]["rollback_on_worse"] is True
    # idempotent: the decision in force already says so
    assert evaluate(client, e, T0 + dt.timedelta(minutes=2)) is None
    assert apply(client, action) is None
    assert len(_rows_of(client, e)) == 1


def test_a_guardrail_retires_b_with_the_figures_it_saw(client):
    # latency: 10 of 300 requests at 900 ms, B better all the same
    e = "pol.slow"
    policy = Policy(promote_on=("B better",), min_pairs=0, min_minutes=0, max_latency_p99_ms=500)
    _declare(client, e, policy, mode="shadow", split=0.0)
    rows = _pairs(e, 300)
    latencies = np.full(300, 6.0)
    latencies[::30] = 900.0
    for r, ms in zip(rows, latencies, strict=True):
        r[COL["latency_b_ms"]] = float(ms)
    _insert(client, rows)
    assert build_report(client, e, n_resamples=50).verdict.label == "B better"
    action = evaluate(client, e, T0)
    assert action is not None and action.action == "retire"  # a guardrail before a promotion
    assert action.reason == "B's latency p99 (ms) 900 > max_latency_p99_ms 500"
    apply(client, action)
    row = client.query(
        "SELECT action, actor, note, figures FROM decisions WHERE experiment = {e:String}",
        parameters={"e": e},
    ).result_rows
    assert len(row) == 1 and row[0][:2] == ("retire", "policy")
    figures = json.loads(row[0][3])
    assert figures["latency_b_p99_ms"] == pytest.approx(np.percentile(latencies, 99))
    assert (figures["latency_n"], figures["requests"], figures["verdict"]) == (300, 300, "B better")

    # dead letters of B's model node over B's requests: 30 of 300; another node's do not count
    e = "pold.ab"
    _declare(client, e, Policy(rollback_on_worse=False, max_dead_letter_rate=0.05))
    _insert(client, _pairs(e, 300))
    letters = [
        ["pold", node, "model error", T0, f"r{i}", "boom", 1, f"t/0/{i}", 10, ""]
        for node, n in (("retrained", 30), ("prod", 100))
        for i in range(n)
    ]
    letters.append(letters[0])  # a re-delivered record counts once
    client.insert(
        "dead_letters", letters, column_names=[c for c, _ in TABLES["dead_letters"].columns]
    )
    action = evaluate(client, e, T0)
    assert action.action == "retire" and action.reason.startswith("B's dead-letter rate 0.1 >")
    f = action.figures
    assert (f["dead_letters_b"], f["dead_letter_rate"]) == (30, 0.1)
    assert f["dead_letters_of"] == "node retrained of DAG pold"

    # missing B: 60 of 300; and below min_requests no guardrail is looked at
    e = "pol.missing"
    _declare(client, e, Policy(rollback_on_worse=False, max_missing_b_rate=0.1, min_requests=400))
    rows = _pairs(e, 300)
    for r in rows[:60]:
        r[COL["status"]], r[COL["stage"]], r[COL["served_by"]] = "missing_b", 1, ""
        for c in ("score_b", "pred_b", "latency_b_ms", "label", "label_ts"):
            r[COL[c]] = None
    _insert(client, rows)
    assert evaluate(client, e, T0) is None  # 300 requests < min_requests 400
    _declare(client, e, Policy(rollback_on_worse=False, max_missing_b_rate=0.1))  # redeployed
    action = evaluate(client, e, T0)
    assert action.reason == "the missing-B rate 0.2 > max_missing_b_rate 0.1"
    assert action.figures["missing_b"] == 60


# ------------------------------------------------------------------ promoting B
def test_a_better_challenger_is_promoted_once_min_pairs_and_min_minutes_held(client):
    e = "pol.better"
    t = dt.timedelta(minutes=30)
    _declare(client, e, Policy(promote_on=("B better",), min_pairs=300, min_minutes=30))
    _insert(client, _pairs(e, 400))
    assert evaluate(client, e, T0) is None  # the verdict is seen: the count starts
    assert held_state(client, e) == ("B better", T0)
    assert evaluate(client, e, T0 + t / 2) is None  # 15 of 30 minutes
    action = evaluate(client, e, T0 + t)  # a new evaluator: the state is in ClickHouse
    assert action is not None and (action.action, action.served) == ("promote", "b")
    assert "held for 30.0 min" in action.reason and "over 400 labelled pairs" in action.reason
    d = apply(client, action)
    assert (d.action, d.served, d.actor) == ("promote", "b", "policy")
    assert _b_share(latest_decision(client, e)) > 1500  # B serves the 90%
    assert evaluate(client, e, T0 + 2 * t) is None and apply(client, action) is None
    assert len(_rows_of(client, e)) == 1

    # min_pairs: 250 labelled pairs say B better, 400 are needed
    e = "pol.few"
    _declare(client, e, Policy(promote_on=("B better",), min_pairs=400, min_minutes=30))
    rows = _pairs(e, 450, seed=2)
    _insert(client, rows[:250])
    assert build_report(client, e, n_resamples=50).verdict.label == "B better"
    assert evaluate(client, e, T0) is None
    assert evaluate(client, e, T0 + t) is None  # held long enough, too few pairs
    _insert(client, rows[250:])
    action = evaluate(client, e, T0 + t + dt.timedelta(minutes=1))
    assert action.action == "promote" and "held for 31.0 min" in action.reason


def test_no_promotion_while_the_srm_check_fires(client):
    e = "pol.srm"
    t = dt.timedelta(minutes=30)
    _declare(client, e, Policy(promote_on=("B better",), min_pairs=300, min_minutes=30))
    _insert(client, _pairs(e, 400))
    assert evaluate(client, e, T0) is None and held_state(client, e)[1] == T0
    # then 1,600 requests all served by A though 10% are B's: the served split mismatches
    _insert(client, _pairs(e, 1600, seed=5, served_all_a=True, start=400))
    report = build_report(client, e, n_resamples=50)
    assert report.srm.any_fired and report.verdict.label == "withheld"
    assert report.statistical_verdict.label == "B better"
    for k in (1, 2, 4):  # long past min_minutes: the verdict is withheld, the count reset
        assert evaluate(client, e, T0 + k * t) is None
        assert held_state(client, e) == ("", None)
    assert _rows_of(client, e) == []


def test_a_promoted_challenger_is_pulled_back_when_a_guardrail_trips(client):
    e = "pol.promoted_slow"
    policy = Policy(promote_on=("B better",), min_pairs=0, min_minutes=0, max_latency_p99_ms=500)
    _declare(client, e, policy)
    _insert(client, _pairs(e, 300))
    promoted = apply(client, evaluate(client, e, T0))
    assert promoted.action == "promote" and _b_share(latest_decision(client, e)) > 1500
    rows = _pairs(e, 100, seed=3, start=300)
    for r in rows:
        r[COL["latency_b_ms"]] = 900.0
    _insert(client, rows)
    retired = apply(client, evaluate(client, e, T0 + dt.timedelta(minutes=1)))
    assert retired.action == "retire" and "latency p99" in retired.note
    assert json.loads(retired.figures)["in_force"] == "promote"
    assert _b_share(latest_decision(client, e)) == 0  # A serves everything again
    assert evaluate(client, e, T0 + dt.timedelta(minutes=2)) is None


# ------------------------------------------------------------------ dry run
def test_a_dry_run_writes_would_rows_which_leave_serving_as_it_is(client):
    e = "pol.dry"
    _declare(client, e, Policy(rollback_on_worse=True, dry_run=True))
    _insert(client, _pairs(e, 400, worse=True))
    before = _b_share(latest_decision(client, e))
    action = evaluate(client, e, T0)
    assert (action.action, action.served, action.dry_run) == ("would_retire", "a", True)
    d = apply(client, action)
    assert (d.action, d.actor) == ("would_retire", "policy")
    assert latest_decision(client, e) is None  # workers read no decision in force
    assert _b_share(latest_decision(client, e)) == before > 100
    srm = build_report(client, e, n_resamples=50).srm  # still checked: who serves is unchanged
    assert srm is not None and srm.status == "ok"
    assert evaluate(client, e, T0 + dt.timedelta(hours=1)) is None  # it said so already
    assert apply(client, action) is None
    assert [r.action for r in _rows_of(client, e)] == ["would_retire"]

    e = "pol.dry_better"
    _declare(client, e, Policy(promote_on=("B better",), min_pairs=0, min_minutes=0, dry_run=True))
    _insert(client, _pairs(e, 400))
    action = evaluate(client, e, T0)
    assert (action.action, action.served) == ("would_promote", "a")
    apply(client, action)
    assert evaluate(client, e, T0 + dt.timedelta(minutes=5)) is None
    assert latest_decision(client, e) is None


def test_workers_ignore_rows_that_are_not_decisions(client):
    """The decisions follower (agents/app.py) reads ``latest_decisions``: a dry run's row
    after a promotion leaves the promotion in force; rows of older writers (no actor,
    no figures) read ''."""
    e = "pol.follow"
    now = dt.datetime.now(dt.UTC)
    client.insert(
        "decisions",
        [[e, now, "promote", "b", 0, "B better", 0.99, "by hand"]],
        column_names=DECISION_COLUMNS,
    )
    client.insert(
        "decisions",
        [
            [
                e,
                now + dt.timedelta(seconds=1),
                "would_retire",
                "b",
                0,
                "B worse",
                0.9,
                "",
                "policy",
                "{}",
            ]
        ],
        column_names=[c for c, _ in TABLES["decisions"].columns],
    )
    got = latest_decisions(client, [e])[e]
    assert (got.action, got.actor, got.figures, got.note) == ("promote", "", "", "by hand")
    assert serving(got) == {"promoted": True, "retired": False}


# ------------------------------------------------------------------ undo
def test_undo_reverses_a_policy_retirement_and_the_policy_stands_down(client):
    e = "pol.undo"
    _declare(client, e, Policy(rollback_on_worse=True))
    _insert(client, _pairs(e, 400, worse=True))
    action = evaluate(client, e, T0)
    retired = apply(client, action)
    assert retired.action == "retire" and _b_share(latest_decision(client, e)) == 0
    d = undo(client, e, note="false alarm")
    assert (d.action, d.served, d.actor) == ("restore", "a", "")
    assert d.note == "undo of retire by a policy: false alarm"
    assert json.loads(d.figures)["undoes"]["action"] == "retire"
    in_force = latest_decision(client, e)
    assert in_force.action == "restore" and in_force.ts > retired.ts
    assert 100 < _b_share(in_force) < 300  # B has its split back
    # a person decided last: the policy does not retire B again on the same verdict
    assert evaluate(client, e, T0 + dt.timedelta(minutes=5)) is None
    assert apply(client, action) is None  # nor does an action evaluated before the undo
    redo = undo(client, e)  # undoing the undo: retired again, by a person
    assert (redo.action, redo.actor) == ("retire", "")
    assert _b_share(latest_decision(client, e)) == 0
    with pytest.raises(NothingToUndo, match="pol.none has no decision in force"):
        undo(client, "pol.none")


def test_undo_of_a_rollback_after_a_promotion_promotes_again(client):
    e = "pol.undo_promoted"
    now = dt.datetime.now(dt.UTC)
    rows = [
        [e, now, "promote", "b", 0, "B better", 0.99, "policy: ...", "policy", "{}"],
        [e, now + dt.timedelta(seconds=1), "retire", "a", 0, "B better", 0.99, "", "policy", "{}"],
    ]
    client.insert("decisions", rows, column_names=[c for c, _ in TABLES["decisions"].columns])
    d = undo(client, e)
    assert (d.action, d.served) == ("promote", "b")
    assert serving(latest_decision(client, e)) == {"promoted": True, "retired": False}


def test_a_watch_round_acts_on_the_policy_and_the_next_announces_it_then_undo_reverses_it(
    client, capsys
):
    """``abdag watch`` judges the declared policy each round: a worse challenger is retired
    by the round that sees "B worse", the next round's alert names the decision, and
    ``abdag undo`` gives B its split back."""
    from abdag import cli
    from abdag.watch import Watcher

    e = "pol.watched"
    _declare(client, e, Policy(rollback_on_worse=True))
    _insert(client, _pairs(e, 450, worse=True, seed=4))
    lines: list[str] = []
    watcher = Watcher(client, [e], webhook_url="", log=lines.append, n_resamples=50)
    try:
        watcher.run_round()
        in_force = latest_decision(client, e)
        assert (in_force.action, in_force.actor) == ("retire", "policy")
        assert any(
            line.startswith(f"policy {e}: retire: policy: verdict 'B worse'") for line in lines
        )
        alerts = watcher.run_round()
        assert [a.kind for a in alerts] == ["decision"]
        assert watcher.run_round() == []  # nothing new: no second decision, no alert
    finally:
        watcher.close()
    assert len(_rows_of(client, e)) == 1
    assert _b_share(latest_decision(client, e)) == 0
    store = ["--clickhouse-url", f"chdb://{client.path}", "--database", "test_policy"]
    assert cli.main([*store, "undo", e, "--note", "not so fast"]) == 0
    assert "undone" in capsys.readouterr().out
    assert 100 < _b_share(latest_decision(client, e)) < 300  # B serves its 10% again
