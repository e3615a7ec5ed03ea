"""Segments (``dag.compare(segments=...)``): values recorded per pair row, A against B
within each value with the documented paired tests, Benjamini-Hochberg equal to
statsmodels, too-small segments left out, and the report calling out a segment where B is
worse although the verdict says B better, on the real ClickHouse engine (chdb)."""

from __future__ import annotations

import json
import logging

import numpy as np
import orjson
import pytest
from scipy import stats as sps
from sklearn import metrics as skm
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests

from abdag import Dag
from abdag.agents.dag import Comparison
from abdag.agents.errors import DagError
from abdag.agents.validate import validate
from abdag.comparators.comparison import LABEL, A, B, ComparisonState, Incoming
from abdag.comparators.report import build_report, build_reports, group_members
from abdag.comparators.rows import PAIR_COLUMNS, to_insert_values
from abdag.comparators.segments import (
    MIN_LABELLED,
    TESTS,
    VALUE_MAX,
    benjamini_hochberg,
    metric_test,
    segment_report,
    segment_values,
)
from abdag.comparators.statistics import paired_bootstrap_metric_diff
from abdag.topics import Event
from abdag.topics.packs import Packed
from abdag.topics.records import Label, Prediction, encode, fields_of

REL = 1e-9
BINARY = ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc", "log_loss")


def _binary(n: int, seed: int, worse_in: np.ndarray | None = None):
    """Labels and scores: B better than A, except on the rows of ``worse_in``."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    sa = 1 / (1 + np.exp(-(1.0 * y + rng.normal(size=n) - 0.5)))
    sb = 1 / (1 + np.exp(-(1.8 * y + 0.7 * rng.normal(size=n) - 0.9)))
    if worse_in is not None:
        bad = 1 / (1 + np.exp(-(0.2 * y + rng.normal(size=n) - 0.2)))
        sb = np.where(worse_in, bad, sb)
    sa, sb = np.round(sa, 3), np.round(sb, 3)  # ties, as real scores have
    return {
        "y": y,
        "sa": sa,
        "sb": sb,
        "pa": (sa >= 0.5).astype(int),
        "pb": (sb >= 0.5).astype(int),
    }


# --------------------------------------------------------------- Benjamini-Hochberg
@pytest.mark.parametrize("m", [1, 2, 7, 60, 501])
def test_q_values_equal_statsmodels_fdr_bh(m):
    rng = np.random.default_rng(m)
    p = rng.random(m) ** 3  # many small ones
    p[: m // 5] = np.round(p[: m // 5], 2)  # ties
    if m > 2:
        p[0], p[1] = 0.0, 1.0
    assert np.array_equal(benjamini_hochberg(p), multipletests(p, method="fdr_bh")[1])


def test_q_values_of_a_report_are_statsmodels_over_its_tested_p_values():
    """BH runs over every (segment value, metric) p-value of the tested values; a value with
    fewer than MIN_LABELLED labelled pairs is listed as too few, has no test and does not
    count in BH (MIN_LABELLED - 1 pairs: too few; MIN_LABELLED: tested)."""
    n = 2000
    rng = np.random.default_rng(3)
    country = rng.choice(np.array(["FR", "DE", "US"]), n, p=[0.3, 0.3, 0.4])
    country[: MIN_LABELLED - 1] = "LU"
    country[MIN_LABELLED - 1 : 2 * MIN_LABELLED - 1] = "BE"
    device = np.where(rng.random(n) < 0.5, "ios", "android")
    device[:5] = ""  # the payload had no device field
    rows = _binary(n, seed=4, worse_in=country == "FR")
    rep = segment_report(rows, {"country": country, "device": device}, BINARY, n_resamples=200)
    by = {v.label: v for v in rep.values}
    assert by["country=LU"].too_few and by["country=LU"].n == MIN_LABELLED - 1
    assert by["country=LU"].metrics == []
    assert not by["country=BE"].too_few and by["country=BE"].n == MIN_LABELLED
    assert by["device=(missing)"].too_few and by["device=(missing)"].n == 5
    tests = [m for v in rep.values for m in v.metrics if m.pvalue is not None]
    assert rep.n_tests == len(tests) == len(rep.tested()) * len(BINARY)
    expected = multipletests([m.pvalue for m in tests], method="fdr_bh")[1]
    assert [m.qvalue for m in tests] == expected.tolist()
    assert {v.label for v in rep.worse()} == {"country=FR"}
    assert rep.hidden() == []  # no overall verdict given
    d = rep.to_dict()
    assert {(v["segment"], v["value"]) for v in d["too_few"]} == {("country", "LU"), ("device", "")}
    assert d["too_few_count"] == 2 and len(d["values"]) == len(rep.tested())  # tested only
    json.dumps(d, allow_nan=False, default=float)


# ------------------------------------------------------------- values and p-values
def test_per_segment_metric_values_equal_scikit_learn():
    n = 3000
    rng = np.random.default_rng(8)
    device = rng.choice(np.array(["ios", "android", "web"]), n)
    rows = _binary(n, seed=9, worse_in=device == "web")
    rep = segment_report(rows, {"device": device}, BINARY, n_resamples=100)
    sk = {
        "accuracy": lambda y, s, p: skm.accuracy_score(y, p),
        "precision": lambda y, s, p: skm.precision_score(y, p, zero_division=0),
        "recall": lambda y, s, p: skm.recall_score(y, p, zero_division=0),
        "f1": lambda y, s, p: skm.f1_score(y, p, zero_division=0),
        "roc_auc": lambda y, s, p: skm.roc_auc_score(y, s),
        "pr_auc": lambda y, s, p: skm.average_precision_score(y, s),
        "log_loss": lambda y, s, p: skm.log_loss(y, np.clip(s, 1e-15, 1 - 1e-15), labels=[0, 1]),
    }
    assert sorted(v.value for v in rep.values) == ["android", "ios", "web"]
    for v in rep.values:
        idx = device == v.value
        y = rows["y"][idx]
        assert v.n == idx.sum()
        for m in v.metrics:
            a = sk[m.metric](y, rows["sa"][idx], rows["pa"][idx])
            b = sk[m.metric](y, rows["sb"][idx], rows["pb"][idx])
            assert m.a == pytest.approx(a, rel=REL) and m.b == pytest.approx(b, rel=REL)
            assert m.diff == pytest.approx(b - a, rel=1e-7, abs=1e-12)


def test_regression_and_multiclass_segment_values_equal_scikit_learn():
    rng = np.random.default_rng(1)
    n = 600
    seg = rng.choice(np.array(["x", "y"]), n)
    y = rng.normal(size=n)
    sa, sb = y + rng.normal(0, 0.5, n), y + rng.normal(0, 0.4, n)
    rows = {"y": y, "sa": sa, "sb": sb, "pa": np.full(n, -1), "pb": np.full(n, -1)}
    rep = segment_report(rows, {"s": seg}, ("mae", "rmse", "r2"), n_resamples=100)
    for v in rep.values:
        i = seg == v.value
        got = {m.metric: (m.a, m.b) for m in v.metrics}
        for side, s in (("a", sa), ("b", sb)):
            k = 0 if side == "a" else 1
            assert got["mae"][k] == pytest.approx(skm.mean_absolute_error(y[i], s[i]), rel=REL)
            rmse = np.sqrt(skm.mean_squared_error(y[i], s[i]))
            assert got["rmse"][k] == pytest.approx(rmse, rel=REL)
            assert got["r2"][k] == pytest.approx(skm.r2_score(y[i], s[i]), rel=REL)
    yc = rng.integers(0, 3, n)
    pa = np.where(rng.random(n) < 0.6, yc, rng.integers(0, 3, n))
    pb = np.where(rng.random(n) < 0.7, yc, rng.integers(0, 3, n))
    rows = {"y": yc, "sa": np.full(n, 0.5), "sb": np.full(n, 0.5), "pa": pa, "pb": pb}
    rep = segment_report(rows, {"s": seg}, ("accuracy", "macro_f1"), n_resamples=100)
    for v in rep.values:
        i = seg == v.value
        got = {m.metric: (m.a, m.b) for m in v.metrics}
        assert got["accuracy"] == pytest.approx(
            (skm.accuracy_score(yc[i], pa[i]), skm.accuracy_score(yc[i], pb[i])), rel=REL
        )
        assert got["macro_f1"] == pytest.approx(
            (
                skm.f1_score(yc[i], pa[i], average="macro"),
                skm.f1_score(yc[i], pb[i], average="macro"),
            ),
            rel=REL,
        )


def test_each_metric_gets_the_documented_paired_test():
    """McNemar (accuracy; recall on the label-1 rows), paired t on the per-request loss
    (log loss, MAE; squared error for RMSE and R2), else a Wald z with the paired
    bootstrap's standard error: each p equals its reference computed here."""
    r = _binary(400, seed=21)
    y, sa, sb, pa, pb = r["y"], r["sa"], r["sb"], r["pa"], r["pb"]
    kw = {"n_resamples": 300, "seed": 2}

    def mcnemar_p(y, pa, pb):
        b01, b10 = int(((pa != y) & (pb == y)).sum()), int(((pa == y) & (pb != y)).sum())
        return sm_mcnemar([[0, b10], [b01, 0]], exact=b01 + b10 < 25, correction=True).pvalue

    t = metric_test("accuracy", y, sa, sb, pa, pb, **kw)
    assert t.test == TESTS["accuracy"] == "McNemar" and t.pvalue == pytest.approx(
        mcnemar_p(y, pa, pb)
    )
    pos = y == 1
    t = metric_test("recall", y, sa, sb, pa, pb, **kw)
    assert t.pvalue == pytest.approx(mcnemar_p(y[pos], pa[pos], pb[pos]))
    clip = lambda s: np.clip(s, 1e-15, 1 - 1e-15)  # noqa: E731
    ll = lambda s: -(y * np.log(clip(s)) + (1 - y) * np.log(1 - clip(s)))  # noqa: E731
    t = metric_test("log_loss", y, sa, sb, pa, pb, **kw)
    assert t.pvalue == pytest.approx(sps.ttest_rel(ll(sb), ll(sa)).pvalue, rel=1e-9)
    for name in ("roc_auc", "f1"):
        t = metric_test(name, y, sa, sb, pa, pb, **kw)
        xa, xb = (sa, sb) if name == "roc_auc" else (pa, pb)
        iv = paired_bootstrap_metric_diff(name, y, xa, xb, method="percentile", **kw)
        assert (t.ci_low, t.ci_high) == (iv.low, iv.high)
        assert t.pvalue == pytest.approx(2 * sps.norm.sf(abs(iv.estimate) / iv.se), rel=1e-9)
        assert iv.se == pytest.approx(np.std(_resampled(name, y, xa, xb, kw), ddof=1), rel=0.3)
    yr = np.random.default_rng(5).normal(size=200)
    ra, rb = yr + 0.5, yr + np.random.default_rng(6).normal(0, 0.4, 200)
    for name in ("rmse", "r2"):
        t = metric_test(name, yr, ra, rb, yr, yr, **kw)
        ref = sps.ttest_rel((rb - yr) ** 2, (ra - yr) ** 2).pvalue
        assert t.pvalue == pytest.approx(ref, rel=1e-9)
    t = metric_test("mae", yr, ra, rb, yr, yr, **kw)
    assert t.pvalue == pytest.approx(sps.ttest_rel(abs(rb - yr), abs(ra - yr)).pvalue, rel=1e-9)
    # one class only: no AUC, hence no test (and nothing for BH)
    t = metric_test("roc_auc", np.zeros(50), sa[:50], sb[:50], pa[:50], pb[:50], **kw)
    assert t.pvalue is None and t.note


def _resampled(name, y, xa, xb, kw):
    from abdag.comparators.metric_specs import METRICS

    rng = np.random.default_rng(99)
    idx = rng.integers(0, len(y), (kw["n_resamples"], len(y)))
    f = METRICS[name].offline
    return f(y[idx], xb[idx]) - f(y[idx], xa[idx])


def test_a_null_segment_is_rarely_flagged():
    """A and B equally good everywhere: over 12 null segments x 7 metrics, BH at 0.05 finds
    nothing (the FDR is controlled; a naive p < 0.05 would flag about 4 of 84)."""
    n = 6000
    rng = np.random.default_rng(12)
    y = (rng.random(n) < 0.4).astype(int)
    sa = np.round(1 / (1 + np.exp(-(1.0 * y + rng.normal(size=n) - 0.5))), 3)
    sb = np.round(1 / (1 + np.exp(-(1.0 * y + rng.normal(size=n) - 0.5))), 3)
    rows = {
        "y": y,
        "sa": sa,
        "sb": sb,
        "pa": (sa >= 0.5).astype(int),
        "pb": (sb >= 0.5).astype(int),
    }
    seg = rng.integers(0, 12, n).astype(str)
    rep = segment_report(rows, {"s": seg}, BINARY, n_resamples=200)
    assert rep.n_tests == 84 and rep.worse() == []


# -------------------------------------------------------------- segment values
def test_segment_values_of_a_payload():
    specs = (
        ("country", None),
        ("n", None),
        ("big", lambda p: "big" if p["amount"] > 100 else "small"),
    )
    assert segment_values(specs, {"country": "FR", "n": 3, "amount": 250}) == {
        "country": "FR",
        "n": "3",
        "big": "big",
    }
    errors = []
    got = segment_values(
        specs, {"country": None}, on_error=lambda n, e: errors.append((n, type(e)))
    )
    assert got == {"country": "", "n": "", "big": ""} and errors == [("big", KeyError)]
    assert segment_values((("t", None),), {"t": "x" * 1000})["t"] == "x" * VALUE_MAX
    assert segment_values((("t", None),), ["not", "a", "dict"]) == {"t": ""}


# ----------------------------------------------------------- the comparison state
def _spec(**kw) -> Comparison:
    kw = {"a": "m_a", "b": "m_b", "labels": "y", "task": "binary", **kw}
    return Comparison("ab", ("m_a", "m_b", "y"), join_timeout=10.0, label_timeout=60.0, **kw)


def _event(model: str, rid: str, score: float, payload: dict, ts: float = 100.0) -> Packed:
    p = Prediction(model, "v1", score, score, int(score >= 0.5), 2.0, "w", 1, 0.0)
    ev = Event(rid, ts, payload, {model: fields_of(p)}, digest=f"d-{rid}")
    return Packed(orjson.loads(encode(ev)), None)


def _label(rid: str, y: float, ts: float = 130.0) -> Packed:
    return Packed(orjson.loads(encode(Label(rid, float(y), ts))), None)


def test_the_comparison_state_writes_segment_values_into_pair_rows(caplog):
    calls = []

    def bucket(payload):
        calls.append(payload.get("amount"))
        return "high" if payload["amount"] >= 100 else "low"

    state = ComparisonState(
        _spec(segments=["country", {"amount_bucket": bucket}]), {}, experiment="d.ab", worker="w"
    )
    pay = {"country": "FR", "amount": 250.0}
    out = state.process(
        [
            Incoming(A, 0, [_event("m_a", "r1", 0.9, pay)]),
            Incoming(B, 0, [_event("m_b", "r1", 0.2, pay)]),
        ],
        now=1.0,
    )
    row = out.pairs["r1"][1]
    assert row["segments"] == {"country": "FR", "amount_bucket": "high"}
    assert all("segments" not in orjson.loads(v) for _, v, _ in out.served)  # not served
    # the label, then a re-delivered A: the same values, made once for the request
    row = state.process([Incoming(LABEL, 0, [_label("r1", 1)])], now=2.0).pairs["r1"][1]
    assert (row["stage"], row["segments"]) == (3, {"country": "FR", "amount_bucket": "high"})
    state.process([Incoming(A, 0, [_event("m_a", "r1", 0.9, pay)])], now=3.0)
    assert calls == [250.0]
    # label first; a payload without the field, a bucket function that raises: ''
    caplog.set_level(logging.WARNING, logger="abdag.worker")
    state.process([Incoming(LABEL, 0, [_label("r2", 0), _label("r3", 0)])], now=4.0)
    batch = [
        Incoming(A, 0, [_event("m_a", r, 0.3, {"x": 1}) for r in ("r2", "r3")]),
        Incoming(B, 0, [_event("m_b", r, 0.1, {"x": 1}) for r in ("r2", "r3")]),
    ]
    out = state.process(batch, now=5.0)
    for r in ("r2", "r3"):
        assert out.pairs[r][1]["segments"] == {"country": "", "amount_bucket": ""}
    assert sum("segment 'amount_bucket' failed" in m for m in caplog.messages) == 1  # once
    # unpaired: the side that came gives them
    state.process([Incoming(B, 0, [_event("m_b", "r4", 0.7, {"country": "DE", "amount": 5})])], 6.0)
    row = state.process([Incoming("tick", 0, [Packed("r4", None)])], now=20.0).pairs["r4"][1]
    assert (row["status"], row["segments"]) == (
        "missing_a",
        {"country": "DE", "amount_bucket": "low"},
    )
    values = to_insert_values(row)
    assert values[PAIR_COLUMNS.index("segments")] == {"country": "DE", "amount_bucket": "low"}


def test_without_segments_rows_carry_an_empty_map_and_the_store_no_key():
    store: dict = {}
    state = ComparisonState(_spec(), store, experiment="d.ab", worker="w")
    pay = {"country": "FR"}
    out = state.process(
        [
            Incoming(A, 0, [_event("m_a", "r", 0.9, pay)]),
            Incoming(B, 0, [_event("m_b", "r", 0.2, pay)]),
        ],
        now=1.0,
    )
    assert out.pairs["r"][1]["segments"] == {} and "segments" not in store["r"]
    old = {c: None for c in PAIR_COLUMNS}  # a row from a worker before schema 7
    assert to_insert_values(old)[PAIR_COLUMNS.index("segments")] == {}


# ------------------------------------------------------------------- validation
def _dag(**kw) -> Dag:
    dag = Dag("seg")
    src = dag.source("q", example={"country": "FR", "amount": 3.0})
    a = dag.model("a", src, path="a.pt", inputs=lambda e: e.payload["x"])
    b = dag.model("b", src, path="b.pt", inputs=lambda e: e.payload["x"])
    dag.compare("ab", a=a, b=b, labels=dag.labels("y"), **kw)
    return dag


@pytest.mark.parametrize(
    ("segments", "message"),
    [
        (
            "country",
            r"segments must be .*, got the string 'country' \(write segments=\['country'\]\)",
        ),
        ([3], r"segments: each item is a payload field name or a \{name: function\} dict, got 3 "),
        (
            [{"amount_bucket": "high"}],
            r"segment 'amount_bucket': a bucketed segment needs a function",
        ),
        (["country", "country"], r"segment 'country' is declared twice"),
        (["country", {"country": len}], r"segment 'country' is declared twice"),
        ([""], r"segment name '' is not allowed"),
        (["a b"], r"segment name 'a b' is not allowed"),
        (7, r"segments must be a list .* got int"),
    ],
)
def test_dag_compare_segments_are_checked_naming_the_node(segments, message):
    with pytest.raises(DagError, match=rf"node 'ab': {message}"):
        validate(_dag(segments=segments), load_models=False)


def test_valid_segments_pass_and_a_bucket_that_fails_on_the_sample_event_is_refused():
    def bucket(p):
        return str(int(p["amount"] // 100))

    dag = _dag(segments=["country", {"amount_bucket": bucket}, {"device.type": lambda p: "x"}])
    validate(dag, load_models=False)
    node = dag.nodes["ab"]
    assert [n for n, _ in node.segment_specs()] == ["country", "amount_bucket", "device.type"]
    sample = Event("r", 0.0, {"country": "FR", "amount": 250.0}, {})
    assert node.dry_run(dag, {"a": sample}) is None
    broken = _dag(segments={"amount_bucket": lambda p: p["amont"]})
    with pytest.raises(DagError, match=r"node 'ab': segment 'amount_bucket' failed on the sample"):
        broken.nodes["ab"].dry_run(broken, {"a": sample})
    assert _dag(segments={"b": bucket}).nodes["ab"].segment_specs()[0][0] == "b"  # a dict alone


# ------------------------------------------------------------ on ClickHouse rows
def _write_through_the_state(client, experiment: str, model_b: str, n: int, seed: int) -> None:
    """``n`` requests through a ComparisonState (A, B, label), its pair rows into ClickHouse:
    B better than A overall but worse for country FR."""
    rng = np.random.default_rng(seed)
    country = rng.choice(np.array(["DE", "FR", "US"]), n, p=[0.35, 0.25, 0.4])
    country[:20] = "LU"  # too few to test
    rows = _binary(n, seed=seed + 1, worse_in=country == "FR")
    spec = _spec(b=model_b, segments=["country", {"amount_bucket": lambda p: p["bucket"]}])
    state = ComparisonState(spec, {}, experiment=experiment, worker="w")
    rids = [f"{experiment}-{i}" for i in range(n)]
    pays = [{"country": str(c), "bucket": str(i % 2)} for i, c in enumerate(country)]
    got = {}
    for side, model, s in ((A, "m_a", rows["sa"]), (B, model_b, rows["sb"])):
        events = [_event(model, r, float(s[i]), pays[i], ts=1e9 + i) for i, r in enumerate(rids)]
        got.update(
            {
                r: row
                for r, (_, row) in state.process([Incoming(side, 0, events)], 1.0).pairs.items()
            }
        )
    labels = [_label(r, rows["y"][i], ts=1e9 + i + 30) for i, r in enumerate(rids)]
    got.update(
        {r: row for r, (_, row) in state.process([Incoming(LABEL, 0, labels)], 2.0).pairs.items()}
    )
    client.insert("pairs", [to_insert_values(r) for r in got.values()], column_names=PAIR_COLUMNS)


def test_a_segment_where_b_is_worse_is_called_out_although_b_is_better(client):
    _write_through_the_state(client, "seg.ab", "m_b", 4000, seed=30)
    r = build_report(client, "seg.ab", n_resamples=200)
    assert r.verdict.label == "B better"
    s = r.segments
    assert s.segments == ["amount_bucket", "country"] and s.verdict == "B better"
    assert [v.label for v in s.hidden()] == ["country=FR"]
    fr = next(v for v in s.values if v.label == "country=FR")
    assert set(fr.worse()) >= {"roc_auc", "log_loss", "accuracy"}
    lu = next(v for v in s.values if v.label == "country=LU")
    assert lu.too_few and lu.n < MIN_LABELLED
    text = r.render()
    assert "! B is significantly worse for country=FR (" in text
    assert "although the verdict is B better" in text
    assert "too few labelled pairs (< 30), not tested: country=LU" in text
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    seg = d["segments"]
    assert [(v["segment"], v["value"]) for v in seg["b_worse_despite_verdict"]] == [
        ("country", "FR")
    ]
    assert seg["n_tests"] == len(s.tested()) * len(BINARY) and seg["scope"] == "experiment"
    de = next(v for v in seg["values"] if v["value"] == "DE")
    assert de["status"] == "tested" and de["metrics"]["roc_auc"]["b_worse"] is False
    assert any("segments[{segment_0:String}] AS segment_0" in q for q in r.sql)
    # the per-value numbers are the segment's rows' numbers, read back from ClickHouse
    res = client.query(
        "SELECT label, score_a, score_b FROM pairs FINAL WHERE experiment = 'seg.ab' "
        "AND segments['country'] = 'FR' AND label IS NOT NULL"
    )
    y, sa, sb = (np.asarray(c, dtype=float) for c in res.result_columns)
    auc = next(m for m in fr.metrics if m.metric == "roc_auc")
    assert fr.n == len(y)
    assert (auc.a, auc.b) == pytest.approx((skm.roc_auc_score(y, sa), skm.roc_auc_score(y, sb)))


def test_a_group_runs_bh_over_every_challenger_together(client):
    for b in ("m_b", "m_c"):
        _write_through_the_state(client, f"seg.x__{b}", b, 1500, seed=40 if b == "m_b" else 50)
        client.command(
            "INSERT INTO experiments (experiment, updated_ts, dag, comparison, grp, group_size, "
            f"task) VALUES ('seg.x__{b}', now64(3), 'seg', 'x__{b}', 'x', 2, 'binary')"
        )
    members = group_members(client, "seg.x")
    assert members == ["seg.x__m_b", "seg.x__m_c"]
    alone = [build_report(client, m, n_resamples=100).segments for m in members]
    assert all(s.alpha == 0.025 and s.scope == "experiment" for s in alone)  # alpha / k alone
    reports = build_reports(client, members, n_resamples=100)
    segs = [r.segments for r in reports]
    tests = [m for s in segs for v in s.values for m in v.metrics if m.pvalue is not None]
    assert all(s.n_tests == len(tests) and s.alpha == 0.05 for s in segs)
    assert all(s.scope == "2 challengers together" for s in segs)
    assert [m.pvalue for m in tests] == [
        m.pvalue for s in alone for v in s.values for m in v.metrics if m.pvalue is not None
    ]
    assert [m.qvalue for m in tests] == multipletests([m.pvalue for m in tests], method="fdr_bh")[
        1
    ].tolist()
    assert {v.label for s in segs for v in s.worse()} == {"country=FR"}


def test_experiments_without_segments_have_no_section(client):
    state = ComparisonState(_spec(), {}, experiment="seg.plain", worker="w")
    pay = {"country": "FR"}
    out = state.process(
        [
            Incoming(A, 0, [_event("m_a", "p", 0.9, pay)]),
            Incoming(B, 0, [_event("m_b", "p", 0.2, pay)]),
        ],
        now=1.0,
    )
    client.insert(
        "pairs", [to_insert_values(r) for _, r in out.pairs.values()], column_names=PAIR_COLUMNS
    )
    r = build_report(client, "seg.plain", n_resamples=50)
    assert r.segments is None and r.to_dict()["segments"] is None
    assert r._segment_lines() == []  # nothing in the text report either
