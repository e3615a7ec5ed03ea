"""Schema and report on the real ClickHouse engine (chdb, in-process), against scikit-learn.

chdb allows one engine path per process while a client is open: every test here shares one
module-scoped path and database and uses its own experiment names; the client is closed at
the end of the module so other test modules may open their own path.
"""

from __future__ import annotations

import datetime as dt
import json

import clickhouse_connect
import numpy as np
import pytest
from sklearn import metrics as skm
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

from abdag.comparators.report import (
    METRICS_SQL,
    OVERVIEW_SQL,
    REPORT_METRICS,
    ROWS_SQL,
    build_report,
    list_experiments,
    timeline,
)
from abdag.comparators.schema import (
    PAIRS_COLUMNS,
    SCHEMA_VERSION,
    TABLES,
    ensure_schema,
    pairs_source,
    schema_version,
)
from abdag.comparators.statistics import per_request_loss, sequential_test

REL = 1e-9
COLS = [c for c, _ in PAIRS_COLUMNS]
T0 = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)


def _rows(experiment, task, y, sa, sb, pa, pb, *, stage=3, start=0, labelled=True):
    out = []
    for i in range(len(y)):
        ts = T0 + dt.timedelta(seconds=i)
        row = {
            "experiment": experiment,
            "request_id": f"r{start + i}",
            "partition": i % 4,
            "status": "paired",
            "task": task,
            "model_a": "prod",
            "model_b": "retrained",
            "version_a": "1",
            "version_b": "2",
            "score_a": None if sa is None else float(sa[i]),
            "score_b": None if sb is None else float(sb[i]),
            "pred_a": None if pa is None else int(pa[i]),
            "pred_b": None if pb is None else int(pb[i]),
            "label": float(y[i]) if labelled else None,
            "latency_a_ms": 5.0,
            "latency_b_ms": 6.0,
            "request_ts": ts,
            "paired_ts": ts + dt.timedelta(milliseconds=50),
            "label_ts": ts + dt.timedelta(seconds=30) if labelled else None,
            "stage": stage,
            "worker": "w1",
            "served_by": "a",
            "segments": {},
        }
        out.append([row[c] for c in COLS])
    return out


def _insert(client, rows):
    client.insert("pairs", rows, column_names=COLS)


def _binary_data(n=3000, seed=0, swap=False):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    na = rng.normal(size=n)
    nb = 0.6 * na + 0.8 * rng.normal(size=n)
    sa = 1 / (1 + np.exp(-(1.0 * y + na - 0.5)))
    sb = 1 / (1 + np.exp(-(1.8 * y + nb - 0.9)))
    sa, sb = np.round(sa, 3), np.round(sb, 3)  # ties, as real scores have
    if swap:
        sa, sb = sb, sa
    return y, sa, sb, (sa >= 0.5).astype(int), (sb >= 0.5).astype(int)


# --------------------------------------------------------------------- schema
def test_schema_is_idempotent_and_migrates(client):
    client.command("CREATE DATABASE IF NOT EXISTS schema_test")
    c = clickhouse_connect.get_client(interface="chdb", path=client.path, database="schema_test")
    try:
        ensure_schema(c)
        ensure_schema(c)
        assert schema_version(c) == SCHEMA_VERSION
        tables = {r[0] for r in c.query("SHOW TABLES").result_rows}
        assert tables == set(TABLES)
        c.command("ALTER TABLE pairs DROP COLUMN worker")  # an older pairs table
        ensure_schema(c)
        c.command("ALTER TABLE experiments DROP COLUMN metrics")  # before schema 5
        c.command("ALTER TABLE pairs DROP COLUMN served_by")  # before schema 6
        c.command("ALTER TABLE pairs DROP COLUMN segments")  # before schema 7
        ensure_schema(c)
        cols = {r[0]: r[1] for r in c.query("DESCRIBE TABLE experiments").result_rows}
        assert cols["metrics"] == "String"
        cols = {r[0]: r[1] for r in c.query("DESCRIBE TABLE pairs").result_rows}
        assert cols["worker"] == "LowCardinality(String)"
        assert cols["served_by"] == "LowCardinality(String)"
        assert cols["segments"] == "Map(LowCardinality(String), String)"
        assert list(cols) == COLS  # a migrated table has the declared columns, in order
        assert cols["label_ts"] == "Nullable(DateTime64(3, 'UTC'))"
        engine = c.query(
            "SELECT engine_full FROM system.tables WHERE database = currentDatabase() "
            "AND name = 'pairs'"
        ).result_rows[0][0]
        assert engine.startswith("ReplacingMergeTree(stage)")
        assert c.query("SELECT count() FROM schema_version").result_rows[0][0] == 1
    finally:
        c.close()


def test_argmax_source_equals_final(client):
    y, sa, sb, pa, pb = _binary_data(300, seed=11)
    _insert(client, _rows("src", "binary", y, sa, sb, pa, pb, stage=2, labelled=False))
    _insert(client, _rows("src", "binary", y, sa, sb, pa, pb, stage=3))
    q = "SELECT request_id, stage, label FROM {src} WHERE experiment = 'src' ORDER BY request_id"
    final = client.query(q.format(src=pairs_source())).result_rows
    argmax = client.query(q.format(src=pairs_source(final=False))).result_rows
    assert final == argmax and len(final) == 300 and all(r[1] == 3 for r in final)


# --------------------------------------------------------------------- binary
@pytest.fixture(scope="module")
def binary_report(client):
    y, sa, sb, pa, pb = _binary_data()
    rows = _rows("dag1.binary", "binary", y, sa, sb, pa, pb)
    # a few requests where one model never answered
    miss = _rows("dag1.binary", "binary", y[:7], sa[:7], sb[:7], pa[:7], pb[:7], start=10**6)
    for r in miss[:4]:
        r[COLS.index("status")] = "missing_b"
        r[COLS.index("stage")] = 1
    for r in miss[4:]:
        r[COLS.index("status")] = "missing_a"
        r[COLS.index("stage")] = 1
    _insert(client, rows + miss)
    dead = [
        ["dag1", "model_b", "timeout", T0, "x1", "", 3, ""],
        ["dag1", "join", "bad_json", T0, "", "", 2, ""],
        ["dag9", "join", "bad_json", T0, "", "", 7, ""],  # another DAG's
        # one event read twice (re-delivered) is dead-lettered twice and counts once
        ["dag1", "model_b", "timeout", T0, "x2", "", 1, "abdag.dag1.tx/3/41"],
        ["dag1", "model_b", "timeout", T0, "x2", "", 1, "abdag.dag1.tx/3/41"],
        ["dag1", "model_a", "timeout", T0, "x2", "", 1, "abdag.dag1.tx/3/41"],
    ]
    dead = [row + [0, ""] for row in dead]  # original_size, original_sha256
    client.insert("dead_letters", dead, column_names=[c for c, _ in TABLES["dead_letters"].columns])
    rep = build_report(client, "dag1.binary", n_resamples=500, seed=1)
    return rep, (y, sa, sb, pa, pb)


def test_binary_metrics_equal_sklearn(binary_report):
    rep, (y, sa, sb, pa, pb) = binary_report
    assert rep.task == "binary"
    assert (rep.model_a, rep.model_b, rep.version_a, rep.version_b) == (
        "prod",
        "retrained",
        "1",
        "2",
    )
    refs = {
        "accuracy": (skm.accuracy_score, pa, pb),
        "precision": (skm.precision_score, pa, pb),
        "recall": (skm.recall_score, pa, pb),
        "f1": (skm.f1_score, pa, pb),
        "roc_auc": (skm.roc_auc_score, sa, sb),  # exact: arrayROCAUC in SQL
        "pr_auc": (skm.average_precision_score, sa, sb),  # AP, step-wise: arrayAUCPR
        "log_loss": (skm.log_loss, sa, sb),
    }
    assert list(rep.metrics) == list(refs)
    for name, (f, xa, xb) in refs.items():
        a, b, diff, lo, hi = rep.metrics[name]
        assert a == pytest.approx(f(y, xa), rel=REL), name
        assert b == pytest.approx(f(y, xb), rel=REL), name
        assert diff == pytest.approx(b - a, rel=REL)
        assert lo <= diff <= hi, name
    assert rep.metrics["roc_auc"][3] > 0  # B better on AUC, interval excludes 0
    assert rep.metrics["log_loss"][4] < 0  # and lower log loss


def test_binary_counts_tests_and_verdict(binary_report):
    rep, (y, sa, sb, pa, pb) = binary_report
    assert rep.counts == {
        "paired": 3000,
        "missing_a": 3,
        "missing_b": 4,
        "labelled": 3000,
        "dead_letters": 5 + 2,
        "scored": 3000,
    }
    assert rep.dead_letters == {"bad_json": 2, "timeout": 3 + 1 + 1}
    ca, cb = pa == y, pb == y
    table = [[np.sum(ca & cb), np.sum(ca & ~cb)], [np.sum(~ca & cb), np.sum(~ca & ~cb)]]
    ref = sm_mcnemar(table, exact=False, correction=True)
    assert (rep.mcnemar.b01, rep.mcnemar.b10) == (table[1][0], table[0][1])
    assert rep.mcnemar.pvalue == pytest.approx(ref.pvalue, rel=1e-12)
    # the sequential test saw the per-request log loss differences in label order
    d = per_request_loss("binary", y, sa) - per_request_loss("binary", y, sb)
    ref_seq = sequential_test(d, 0.05)
    assert rep.sequential.n == 3000
    assert rep.sequential.mean == pytest.approx(d.mean(), rel=1e-9)
    assert rep.sequential.lower == pytest.approx(ref_seq.lower, rel=1e-6)
    assert rep.verdict.label == "B better" and rep.verdict.confidence > 0.99


def test_report_serialises_and_renders(binary_report):
    rep, _ = binary_report
    d = rep.to_dict()
    text = json.dumps(d, allow_nan=False)  # strict JSON: no NaN / Infinity
    assert '"verdict"' in text and d["metrics"]["roc_auc"]["higher_is_better"] is True
    assert d["sql"][0] == OVERVIEW_SQL and METRICS_SQL["binary"] in d["sql"]
    assert all("{experiment:String}" in s or "{dag:String}" in s for s in d["sql"])
    assert d["first_request_ts"].startswith("2025-03-01T00:00:00")
    out = rep.render()
    for s in ("dag1.binary", "roc_auc", "McNemar", "Verdict: B better", "always valid"):
        assert s in out


def test_timeline_is_cumulative(client, binary_report):
    rep, (y, sa, sb, pa, pb) = binary_report
    tl = timeline(client, "dag1.binary", bucket_seconds=600)
    assert len(tl) == 5  # 3000 s of requests in 10-minute buckets
    assert [t["labelled"] for t in tl] == [600, 1200, 1800, 2400, 3000]
    last = tl[-1]
    assert last["accuracy_a"] == pytest.approx(rep.metrics["accuracy"][0], rel=REL)
    assert last["log_loss_b"] == pytest.approx(rep.metrics["log_loss"][1], rel=REL)
    assert tl[0]["accuracy_b"] == pytest.approx(np.mean(pb[:600] == y[:600]), rel=REL)
    assert tl[0]["ts"].startswith("2025-03-01T00:00:00")
    json.dumps(tl, allow_nan=False)
    assert timeline(client, "no.such", 60) == []


def test_list_experiments(client, binary_report):
    names = list_experiments(client)
    assert "dag1.binary" in names and names == sorted(names)


# --------------------------------------------------- deduplication and stages
def test_redelivery_and_stage_upgrade_count_once(client):
    y, sa, sb, pa, pb = _binary_data(800, seed=5)
    clean = "dup.clean"
    _insert(client, _rows(clean, "binary", y, sa, sb, pa, pb))
    ref = build_report(client, clean, n_resamples=50)

    exp = "dup.messy"
    # paired rows first, no label (stage 2), delivered twice
    unlabelled = _rows(exp, "binary", y, sa, sb, pa, pb, stage=2, labelled=False)
    _insert(client, unlabelled)
    _insert(client, unlabelled[:300])
    half = build_report(client, exp, n_resamples=50)
    assert half.counts["paired"] == 800 and half.counts["labelled"] == 0
    assert half.verdict.label == "not enough data" and not half.metrics["accuracy"][0] >= 0
    # labels arrive (stage 3), again partly re-delivered; then a stale stage-2 replay
    labelled = _rows(exp, "binary", y, sa, sb, pa, pb, stage=3)
    _insert(client, labelled)
    _insert(client, labelled[100:400])
    _insert(client, unlabelled[:200])
    raw = client.query(
        "SELECT count() FROM pairs WHERE experiment = {e:String}", parameters={"e": exp}
    )
    # background merges may already have collapsed some duplicates: reads must not care
    assert 800 <= raw.result_rows[0][0] <= 800 + 300 + 800 + 300 + 200
    for when in ("before merge", "after merge"):
        rep = build_report(client, exp, n_resamples=50)
        assert rep.counts["paired"] == 800 and rep.counts["labelled"] == 800, when
        for name, v in ref.metrics.items():
            assert rep.metrics[name][:3] == pytest.approx(v[:3], rel=1e-12), (when, name)
        assert rep.mcnemar == ref.mcnemar
        assert rep.sequential.n == 800 and rep.sequential.mean == pytest.approx(ref.sequential.mean)
        client.command("OPTIMIZE TABLE pairs FINAL")  # a forced merge keeps the labelled row


# ------------------------------------------------------ multiclass, regression
def test_multiclass_report(client):
    rng = np.random.default_rng(3)
    n, k = 2500, 4
    y = rng.integers(0, k, n)
    pa = np.where(rng.random(n) < 0.55, y, rng.integers(0, k, n))
    pb = np.where(rng.random(n) < 0.70, y, rng.integers(0, k, n))
    pb[:3] = 9  # a class only B predicts
    sa, sb = rng.random(n), rng.random(n)
    _insert(client, _rows("dag2.multi", "multiclass", y, sa, sb, pa, pb))
    rep = build_report(client, "dag2.multi", n_resamples=300)
    assert rep.task == "multiclass" and rep.counts["labelled"] == n
    for p, side in ((pa, 0), (pb, 1)):
        assert rep.metrics["accuracy"][side] == pytest.approx(skm.accuracy_score(y, p), rel=REL)
        assert rep.metrics["macro_f1"][side] == pytest.approx(
            skm.f1_score(y, p, average="macro"), rel=REL
        )
        assert rep.metrics["micro_f1"][side] == pytest.approx(
            skm.f1_score(y, p, average="micro"), rel=REL
        )
    ca, cb = pa == y, pb == y
    ref = sm_mcnemar([[np.sum(ca & cb), np.sum(ca & ~cb)], [np.sum(~ca & cb), 0]], exact=False)
    assert rep.mcnemar.pvalue == pytest.approx(ref.pvalue, rel=1e-12)
    assert rep.metrics["accuracy"][3] > 0
    # class 9 (3 rows, F1 0) is one of B's five classes: macro F1 punishes it, as sklearn does
    lo, hi = rep.metrics["macro_f1"][3:]
    assert lo <= rep.metrics["macro_f1"][2] <= hi
    assert rep.verdict.label == "B better"


def test_regression_report_b_worse(client):
    rng = np.random.default_rng(4)
    n = 2000
    y = rng.normal(20, 5, n)
    sa = y + rng.normal(0, 1.0, n)
    sb = y + rng.normal(0.3, 1.4, n)  # B is worse
    _insert(client, _rows("dag3.reg", "regression", y, sa, sb, None, None))
    rep = build_report(client, "dag3.reg", n_resamples=300)
    refs = {
        "mae": skm.mean_absolute_error,
        "rmse": skm.root_mean_squared_error,
        "r2": skm.r2_score,
    }
    for name, f in refs.items():
        assert rep.metrics[name][0] == pytest.approx(f(y, sa), rel=REL), name
        assert rep.metrics[name][1] == pytest.approx(f(y, sb), rel=REL), name
    assert rep.metrics["mae"][3] > 0  # B's MAE is higher, interval excludes 0
    assert rep.mcnemar is None
    assert rep.verdict.label == "B worse" and rep.verdict.confidence > 0.99
    assert "McNemar" not in rep.render()


def test_binary_b_worse_and_not_enough_data(client):
    y, sa, sb, pa, pb = _binary_data(1500, seed=6, swap=True)
    _insert(client, _rows("dag4.worse", "binary", y, sa, sb, pa, pb))
    assert build_report(client, "dag4.worse", n_resamples=100).verdict.label == "B worse"
    y, sa, sb, pa, pb = _binary_data(120, seed=7)
    _insert(client, _rows("dag4.small", "binary", y, sa, sb, pa, pb))
    small = build_report(client, "dag4.small", n_resamples=100)
    assert small.verdict.label == "not enough data" and "120 labelled" in small.verdict.reason
    empty = build_report(client, "dag4.nothing")
    assert empty.task == "" and empty.metrics == {} and empty.counts["paired"] == 0
    assert empty.verdict.label == "not enough data"
    json.dumps(empty.to_dict(), allow_nan=False)
    assert "no data" in empty.render()


def test_rows_sql_orders_by_label_time(client):
    y, sa, sb, pa, pb = _binary_data(50, seed=8)
    rows = _rows("dag5.order", "binary", y, sa, sb, pa, pb)
    for i, r in enumerate(rows):  # labels arrive in reverse request order
        r[COLS.index("label_ts")] = T0 + dt.timedelta(hours=1, seconds=-i)
    _insert(client, rows)
    res = client.query(ROWS_SQL["binary"], parameters={"experiment": "dag5.order"})
    got = np.asarray(res.result_columns[1])
    np.testing.assert_array_equal(got, sa[::-1])


# ------------------------------------------------- declared metrics, thresholds
def _declare(client, experiment, metrics, group_size=1):
    cols = [c for c, _ in TABLES["experiments"].columns]
    row = dict.fromkeys(cols, "")
    row.update(experiment=experiment, updated_ts=T0, group_size=group_size, split=0.0, margin=0.0)
    row.update(metrics=metrics, task="binary", dag=experiment.split(".")[0], mirror=1.0)
    client.insert("experiments", [[row[c] for c in cols]], column_names=cols)


def test_declared_metrics_reach_the_report_and_its_timeline(client):
    y, sa, sb, pa, pb = _binary_data(400, seed=12)
    _insert(client, _rows("dag6.declared", "binary", y, sa, sb, pa, pb))
    # what dag.compare(metrics=[...]) records; a live-only metric has no report value
    _declare(client, "dag6.declared", "roc_auc,log_loss,roc_auc_river")
    rep = build_report(client, "dag6.declared", n_resamples=50)
    assert list(rep.metrics) == ["roc_auc", "log_loss"]
    assert rep.metrics["roc_auc"][1] == pytest.approx(skm.roc_auc_score(y, sb), rel=REL)
    assert rep.to_dict()["metrics"]["log_loss"]["higher_is_better"] is False
    last = timeline(client, "dag6.declared", bucket_seconds=3600)[-1]
    assert {k for k in last if k.endswith(("_a", "_b"))} == {
        "roc_auc_a",
        "roc_auc_b",
        "log_loss_a",
        "log_loss_b",
    }
    assert last["roc_auc_b"] == pytest.approx(rep.metrics["roc_auc"][1], rel=REL)
    # nothing declared: the task's defaults
    _insert(client, _rows("dag6.plain", "binary", y, sa, sb, pa, pb))
    _declare(client, "dag6.plain", "")
    assert list(build_report(client, "dag6.plain", n_resamples=50).metrics) == list(
        REPORT_METRICS["binary"]
    )


def test_one_of_two_challengers_is_judged_at_half_alpha_by_the_report_and_the_dashboard(client):
    from abdag.dashboard.data import timeline_payload

    y, sa, sb, pa, pb = _binary_data(400, seed=14)
    _insert(client, _rows("dag8.x__b1", "binary", y, sa, sb, pa, pb))
    _declare(client, "dag8.x__b1", "", group_size=2)
    rep = build_report(client, "dag8.x__b1", n_resamples=50)
    assert rep.alpha == pytest.approx(0.025) and rep.sequential.alpha == pytest.approx(0.025)
    seq = timeline_payload(client, "dag8.x__b1", bucket_seconds=3600)["sequential"][-1]
    assert (seq["lower"], seq["upper"]) == pytest.approx(
        (rep.sequential.lower, rep.sequential.upper), rel=1e-9
    )


def test_report_reads_the_classes_the_models_sent(client):
    """The model nodes' threshold (0.3 here) made pred_a/pred_b: the report counts those
    classes, and only rows without one fall back on score >= 0.5."""
    y, sa, sb, _, _ = _binary_data(600, seed=13)
    pa, pb = (sa >= 0.3).astype(int), (sb >= 0.3).astype(int)
    _insert(client, _rows("dag7.threshold", "binary", y, sa, sb, pa, pb))
    rep = build_report(client, "dag7.threshold", n_resamples=50)
    for side, p in ((0, pa), (1, pb)):
        assert rep.metrics["accuracy"][side] == pytest.approx(skm.accuracy_score(y, p), rel=REL)
        assert rep.metrics["f1"][side] == pytest.approx(skm.f1_score(y, p), rel=REL)
    assert (rep.mcnemar.b01, rep.mcnemar.b10) == (
        np.sum((pa != y) & (pb == y)),
        np.sum((pa == y) & (pb != y)),
    )
    _insert(client, _rows("dag7.no_class", "binary", y, sa, sb, None, None))
    bare = build_report(client, "dag7.no_class", n_resamples=50)
    assert bare.metrics["accuracy"][0] == pytest.approx(skm.accuracy_score(y, sa >= 0.5), rel=REL)
