"""The sample-ratio mismatch (SRM) check of split experiments: its two tests (chi-square
against scipy, the mixture SPRT by simulation) and the report that withholds its verdict
while the check fires, on the real ClickHouse engine (chdb, in-process).

chdb allows one engine path per process while a client is open: this module opens its own
and closes it at the end, as tests/test_report.py does.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import betaln
from scipy.stats import chi2 as chi2_dist
from scipy.stats import chisquare

from abdag.comparators.decisions import stable_share
from abdag.comparators.report import SRM_SEGMENTS_SQL, SRM_SQL, build_report, check_served_split
from abdag.comparators.srm import (
    MIN_EXPECTED,
    MIN_SERVED,
    PRIOR_CONCENTRATION,
    SRM_THRESHOLD,
    always_valid_pvalues,
    chi_square,
    log_bayes_factor,
    sequential_pvalue,
    srm_check,
    srm_check_segments,
)
from tests.test_report import COLS, _binary_data, _rows

DOCS = Path(__file__).resolve().parent.parent / "docs"


# ------------------------------------------------------------------- the two tests
@pytest.mark.parametrize(
    ("n_a", "n_b", "p"),
    [(900, 100, 0.1), (17_360, 2_640, 0.1), (4_980, 5_020, 0.5), (120, 3, 0.05), (1, 0, 0.3)],
)
def test_chi_square_equals_scipys(n_a, n_b, p):
    n = n_a + n_b
    ref = chisquare(f_obs=[n_a, n_b], f_exp=[n * (1 - p), n * p])
    stat, pvalue = chi_square(n_a, n_b, p)
    assert stat == pytest.approx(float(ref.statistic), rel=1e-12, abs=1e-12)
    assert pvalue == pytest.approx(float(ref.pvalue), rel=1e-12)
    r = srm_check(n_a, n_b, p, min_served=0, min_expected=0)
    assert (r.chi2, r.pvalue_chi2) == (stat, pvalue)


def test_the_bayes_factor_is_the_product_of_the_beta_binomial_predictions():
    """The closed form equals the mixture likelihood ratio built one request at a time
    (the posterior predictive of each next request, as ``ssrm`` accumulates it)."""
    rng = np.random.default_rng(3)
    p, k = 0.1, PRIOR_CONCENTRATION
    stream = rng.random(2000) < 0.12
    log_mix = log_null = 0.0
    n_a = n_b = 0
    for to_b in stream:
        pred_b = (k * p + n_b) / (k + n_a + n_b)
        log_mix += math.log(pred_b if to_b else 1 - pred_b)
        log_null += math.log(p if to_b else 1 - p)
        n_b += int(to_b)
        n_a += int(not to_b)
    assert log_bayes_factor(n_a, n_b, p) == pytest.approx(log_mix - log_null, rel=1e-9)
    # after each request: the running minimum of 1 / BF_t, never rising
    path = always_valid_pvalues(stream, p)
    n_b_t = np.cumsum(stream)
    each = sequential_pvalue(np.arange(1, len(stream) + 1) - n_b_t, n_b_t, p)
    assert path == pytest.approx(np.minimum.accumulate(each), rel=1e-9)
    assert path[-1] <= sequential_pvalue(n_a, n_b, p) and np.all(np.diff(path) <= 0)
    assert sequential_pvalue(0, 0, p) == 1.0


def _ever_fired(p: float, alphas: tuple[float, ...], share: float, *, streams: int, n: int):
    """Streams of ``n`` served requests with B's true share ``share``, looked at after
    every request: per alpha, the share of streams whose sequential p-value ever fell
    below it, and the same for the chi-square test looked at as often."""
    rng = np.random.default_rng(20)
    seq = dict.fromkeys(alphas, 0)
    naive = dict.fromkeys(alphas, 0)
    looks = np.arange(1, n + 1, dtype=float)
    a0, b0 = PRIOR_CONCENTRATION * (1 - p), PRIOR_CONCENTRATION * p
    for _ in range(0, streams, 50):  # 50 streams at a time: bounded memory
        n_b = np.cumsum(rng.random((50, n)) < share, axis=1, dtype=np.float64)
        n_a = looks - n_b
        lbf = betaln(a0 + n_a, b0 + n_b) - betaln(a0, b0) - n_a * np.log1p(-p) - n_b * np.log(p)
        top = lbf.max(axis=1)
        stat = (n_b - looks * p) ** 2 / (looks * p * (1 - p))  # Pearson's, 1 df
        stat_top = stat[:, MIN_SERVED:].max(axis=1)  # from the check's minimum on
        for alpha in alphas:
            seq[alpha] += int((top >= -math.log(alpha)).sum())
            naive[alpha] += int((stat_top > chi2_dist.isf(alpha, 1)).sum())
    return {a: v / streams for a, v in seq.items()}, {a: v / streams for a, v in naive.items()}


def test_no_mismatch_false_alarms_stay_below_alpha_however_often_one_looks():
    """2,000 correct 10% splits of 20,000 served requests, looked at after every request:
    the always-valid p-value ever falls below alpha in at most alpha of them (Ville), where
    the chi-square test looked at as often fires far more often than alpha."""
    seq, naive = _ever_fired(0.1, (0.05, 0.01, SRM_THRESHOLD), 0.1, streams=2000, n=20_000)
    for alpha, rate in seq.items():
        assert rate <= alpha, (alpha, rate)
    assert naive[0.05] > 0.3 and naive[SRM_THRESHOLD] > 0.01  # why the chi-square never decides


def test_a_real_mismatch_fires():
    """13% served to B against 10% declared, over 20,000 requests: the check fires (every
    one of 200 simulated experiments), the first time long before the end."""
    rng = np.random.default_rng(7)
    n_b = rng.binomial(20_000, 0.13, size=200)
    results = [srm_check(20_000 - b, b, 0.1) for b in n_b]
    assert all(r.fired for r in results)
    assert max(r.pvalue_sequential for r in results) < 1e-20
    stream = rng.random(20_000) < 0.13
    first = int(np.argmax(always_valid_pvalues(stream, 0.1) < SRM_THRESHOLD))
    assert 0 < first < 5_000
    r = srm_check(17_360, 2_640, 0.1)
    assert (r.status, r.summary()) == ("fired", "served 13.2% to B, declared 10%")
    assert r.to_dict()["fired"] is True and r.to_dict()["summary"] == r.summary()


def test_a_matching_split_does_not_fire_and_small_counts_are_skipped():
    r = srm_check(18_020, 1_980, 0.1)
    assert r.status == "ok" and not r.fired and r.pvalue_sequential > 0.5
    assert r.observed == pytest.approx(0.099)
    few = srm_check(60, 39, 0.5)  # 99 served: under MIN_SERVED
    assert few.status == "skipped" and "too few served requests" in few.reason
    assert math.isnan(few.pvalue_sequential)
    # 1% declared: 500 served answers are needed for 5 expected from B
    assert srm_check(498, 1, 0.01).status == "skipped"
    assert srm_check(495, 5, 0.01).status == "ok"
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="share"):
            srm_check(100, 100, bad)


# ------------------------------------------------------------------- the report
T0 = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)


def _declare(client, experiment: str, mode: str = "split", split: float = 0.1) -> None:
    client.command(
        "INSERT INTO experiments (experiment, updated_ts, dag, comparison, group_size, "
        "model_a, model_b, task, mode, split, margin) VALUES "
        f"('{experiment}', now64(3), 'srm', 'ab', 1, 'prod', 'retrained', 'binary', "
        f"'{mode}', {split}, 0)"
    )


def _split_rows(experiment: str, *, b_lost: float, n: int = 2500) -> list[list]:
    """A split experiment's pairs where B is better; ``b_lost`` of the requests the hash
    gives to B lose B's prediction (dead letters): they are ``missing_b`` and unserved."""
    y, sa, sb, pa, pb = _binary_data(n, seed=4)
    rows = _rows(experiment, "binary", y, sa, sb, pa, pb)
    rng = np.random.default_rng(5)
    col = {c: i for i, c in enumerate(COLS)}
    for r in rows:
        to_b = stable_share(r[col["request_id"]]) < 0.1
        r[col["served_by"]] = "b" if to_b else "a"
        if to_b and rng.random() < b_lost:
            r[col["served_by"]] = ""
            r[col["status"]], r[col["stage"]] = "missing_b", 1
            for c in ("score_b", "pred_b", "latency_b_ms", "label", "label_ts"):
                r[col[c]] = None
    return rows


@pytest.fixture(scope="module")
def reports(client):
    out = {}
    for name, lost in (("srm.matched", 0.0), ("srm.b_dead_letters", 0.4)):
        client.insert("pairs", _split_rows(name, b_lost=lost), column_names=COLS)
        _declare(client, name)
        out[name] = build_report(client, name, n_resamples=200)
    return out


def test_the_report_withholds_the_verdict_while_the_served_split_mismatches(reports):
    r = reports["srm.b_dead_letters"]
    s = r.srm
    assert s is not None and s.fired and s.declared == 0.1
    assert s.observed < 0.08 and s.not_served == r.counts["missing_b"] > 50
    assert r.statistical_verdict.label == "B better"  # what the tests say
    assert (r.verdict.label, r.verdict.confidence) == ("withheld", 0.0)
    assert r.verdict.reason == f"SRM: {s.summary()}"
    text = r.render()
    assert f"Verdict: withheld: SRM: served {100 * s.observed:.1f}% to B, declared 10%" in text
    assert "statistical verdict, withheld: B better" in text
    assert "Served split (SRM check)" in text and "SRM fired" in text
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["verdict"]["label"] == "withheld"
    assert d["statistical_verdict"]["label"] == "B better"
    assert d["srm"]["fired"] is True and d["srm"]["status"] == "fired"
    assert (d["srm"]["n_a"], d["srm"]["n_b"]) == (s.n_a, s.n_b)
    assert SRM_SQL in r.sql


def test_the_report_gives_the_normal_verdict_when_the_split_matches(reports):
    r = reports["srm.matched"]
    assert r.srm is not None and r.srm.status == "ok" and r.srm.not_served == 0
    assert abs(r.srm.observed - 0.1) < 0.02
    assert r.verdict.label == "B better" and r.verdict == r.statistical_verdict
    assert "no mismatch" in r.render() and "withheld" not in r.render()
    d = r.to_dict()
    assert d["verdict"] == d["statistical_verdict"] and d["srm"]["fired"] is False


def test_the_counts_are_read_from_deduplicated_pairs(client, reports):
    """A stage-1 row upgraded to a stage-3 one, re-delivered rows: each request counts
    once (``pairs FINAL``), with its newest row's served_by."""
    name = "srm.b_dead_letters"
    before = check_served_split(client, name, {"mode": "split", "split": 0.1})
    client.insert("pairs", _split_rows(name, b_lost=0.4), column_names=COLS)  # again
    again = check_served_split(client, name, {"mode": "split", "split": 0.1})
    assert (again.n_a, again.n_b, again.not_served) == (before.n_a, before.n_b, before.not_served)
    assert before == reports[name].srm


def test_no_check_in_shadow_mode_nothing_to_check_at_0_or_1_and_none_after_a_decision(client):
    assert check_served_split(client, "srm.matched", {"mode": "shadow", "split": 0.0}) is None
    for split in (0.0, 1.0):
        r = check_served_split(client, "srm.matched", {"mode": "split", "split": split})
        assert r.status == "skipped" and "one side serves every request" in r.reason
    name = "srm.decided"  # B's predictions all dead-lettered: it served nothing
    client.insert("pairs", _split_rows(name, b_lost=1.0, n=600), column_names=COLS)
    declared = {"mode": "split", "split": 0.1}
    assert check_served_split(client, name, declared).fired
    client.command(
        "INSERT INTO decisions (experiment, ts, action, served, forced, verdict, confidence, "
        f"note) VALUES ('{name}', now64(3), 'promote', 'b', 1, 'B better', 0.99, '')"
    )
    r = check_served_split(client, name, declared)
    assert r.status == "skipped" and "promoted" in r.reason


def test_the_documented_sql_gives_the_reports_numbers(client, reports):
    """docs/statistics.md's queries (the counts, and the whole check in SQL) agree with
    the report."""
    section = (DOCS / "statistics.md").read_text().split("## Sample-ratio mismatch", 1)[1]
    counts_sql, check_sql, segments_sql = re.findall(
        r"```sql\n(.*?)```", section.split("\n## ", 1)[0], re.S
    )
    assert segments_sql.strip() == SRM_SEGMENTS_SQL.strip()
    name = "srm.b_dead_letters"
    s = reports[name].srm
    assert counts_sql.strip() == SRM_SQL.strip()
    row = next(client.query(check_sql.replace("fraud.a_vs_b", name)).named_results())
    assert (row["n_a"], row["n_b"], row["declared"]) == (s.n_a, s.n_b, 0.1)
    assert row["p_chi_square"] == pytest.approx(s.pvalue_chi2, rel=1e-6)
    assert row["p_sequential"] == pytest.approx(s.pvalue_sequential, rel=1e-6)
    assert row["srm"] == 1


# ------------------------------------------------------------------- per segment
def test_the_threshold_is_divided_by_the_number_of_values_checked():
    """Bonferroni over the values checked: a value whose p-value lies between 0.001 / 5
    and 0.001 fires alone and not among 5 values checked; skipped values do not count."""
    n = 10_000
    b = next(
        b
        for b in range(1_000, 1_400)
        if SRM_THRESHOLD / 5 < sequential_pvalue(n - b, b, 0.1) < SRM_THRESHOLD
    )
    (alone,) = srm_check_segments([("country", "FR", n - b, b, 0)], 0.1)
    assert alone.fired and alone.threshold == SRM_THRESHOLD
    others = [("country", c, 9_000, 1_000, 0) for c in ("DE", "US", "IT", "ES")]
    few = [("device", "tablet", 60, 6, 0), ("device", "", 40, 2, 0)]  # under MIN_SERVED
    values = srm_check_segments([("country", "FR", n - b, b, 0), *others, *few], 0.1)
    assert [v.status for v in values] == ["ok"] * 5 + ["skipped"] * 2
    assert all(v.threshold == SRM_THRESHOLD / 5 for v in values[:5])
    assert values[0].pvalue_sequential == alone.pvalue_sequential
    assert "0.001 / 5 values checked" in values[0].reason
    assert values[6].label == "device=(missing)" and "too few" in values[6].reason


T_SEG = 6_000
OFF = {"FR": (1_000, 0.03), "DE": (2_500, 0.114), "US": (2_500, 0.114)}  # overall 10%
EVEN = {"FR": (1_000, 0.10), "DE": (2_500, 0.10), "US": (2_500, 0.10)}


def _segment_rows(experiment: str, countries: dict[str, tuple[int, float]]) -> list[list]:
    """A split experiment's pairs (B better) with segments country and device: in each
    country an exact share of the served answers is B's; device is independent of who
    served (tablet too rare to be checked, some missing), 1% of requests unserved."""
    n = sum(k for k, _ in countries.values())
    y, sa, sb, pa, pb = _binary_data(n, seed=4)
    rows = _rows(experiment, "binary", y, sa, sb, pa, pb)
    rng = np.random.default_rng(11)
    country = np.repeat(list(countries), [k for k, _ in countries.values()])
    served = np.concatenate(
        [rng.permutation(np.arange(k) < round(k * share)) for k, share in countries.values()]
    )
    device = rng.choice(np.array(["mobile", "desktop", "tablet", ""]), n, p=[0.55, 0.4, 0.01, 0.04])
    unserved = rng.random(n) < 0.01
    col = {c: i for i, c in enumerate(COLS)}
    for i, r in enumerate(rows):
        r[col["served_by"]] = "" if unserved[i] else ("b" if served[i] else "a")
        r[col["segments"]] = {"country": str(country[i]), "device": str(device[i])}
    return rows


@pytest.fixture(scope="module")
def segment_reports(client):
    out = {}
    for name, countries in (("srm_seg.off", OFF), ("srm_seg.even", EVEN)):
        rows = _segment_rows(name, countries)
        client.insert("pairs", rows, column_names=COLS)
        client.insert("pairs", rows[::3], column_names=COLS)  # re-delivered: counted once
        _declare(client, name)
        out[name] = (rows, build_report(client, name, n_resamples=200))
    return out


def test_a_segment_whose_served_share_is_off_fires_and_withholds(segment_reports):
    """3% served to B in FR (10% declared), compensated in DE and US: the overall share is
    10% and does not fire, FR does, and the verdict is withheld naming it."""
    _, r = segment_reports["srm_seg.off"]
    s = r.srm
    assert s.status == "ok" and not s.fired and abs(s.observed - 0.1) < 0.003
    assert s.any_fired and [v.label for v in s.fired_segments] == ["country=FR"]
    fr = s.fired_segments[0]
    assert fr.observed < 0.035 and fr.pvalue_sequential < fr.threshold
    assert r.statistical_verdict.label == "B better"
    reason = f"SRM in segment country=FR: served {100 * fr.observed:.1f}% to B, declared 10%"
    assert (r.verdict.label, r.verdict.reason) == ("withheld", reason)
    text = r.render()
    assert f"Verdict: withheld: {reason}" in text and "statistical verdict, withheld" in text
    assert "! SRM in segment country=FR" in text and "SRM fired in 1: verdict withheld" in text
    assert "too few served requests, skipped: device=tablet" in text
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["verdict"]["label"] == "withheld" and d["srm"]["fired"] is False
    assert d["srm"]["any_fired"] is True and d["srm"]["segments_fired"] == ["country=FR"]
    by_label = {v["label"]: v for v in d["srm"]["segments"]}
    assert by_label["country=FR"]["fired"] is True and by_label["country=FR"]["status"] == "fired"
    assert by_label["device=tablet"]["status"] == "skipped"
    assert SRM_SEGMENTS_SQL in r.sql


def test_balanced_segments_do_not_fire(segment_reports):
    _, r = segment_reports["srm_seg.even"]
    s = r.srm
    assert s.status == "ok" and not s.any_fired and s.segments
    assert all(v.status in ("ok", "skipped") for v in s.segments)
    assert r.verdict == r.statistical_verdict and r.verdict.label == "B better"
    text = r.render()
    assert "withheld" not in text and "per segment value: 6 checked" in text
    assert r.to_dict()["srm"]["segments_fired"] == []


@pytest.mark.parametrize("name", ["srm_seg.off", "srm_seg.even"])
def test_per_value_counts_equal_a_count_of_the_rows(segment_reports, name):
    """Served A / B / none per value of each segment equal pandas' count of the inserted
    rows (each request once, re-deliveries aside); the values with enough served answers
    are the ones checked, each at 0.001 over their number."""
    rows, r = segment_reports[name]
    df = pd.DataFrame(rows, columns=COLS)
    long = pd.concat(
        [
            pd.DataFrame({"segment": seg, "value": df.segments.str[seg], "by": df.served_by})
            for seg in ("country", "device")
        ]
    )
    want = long.groupby(["segment", "value"]).by.value_counts().unstack(fill_value=0)
    got = {(v.segment, v.value): (v.n_a, v.n_b, v.not_served) for v in r.srm.segments}
    expect = {k: (int(c["a"]), int(c["b"]), int(c[""])) for k, c in want.iterrows()}
    assert got == expect and len(got) == 7
    served = want["a"] + want["b"]
    enough = (served >= MIN_SERVED) & (served * 0.1 >= MIN_EXPECTED)
    m = int(enough.sum())
    checked = [v for v in r.srm.segments if v.status != "skipped"]
    assert m == len(checked) == r.to_dict()["srm"]["segments_checked"] == 6
    assert all(v.threshold == pytest.approx(SRM_THRESHOLD / m, rel=1e-15) for v in checked)
    for v in checked:
        assert v.pvalue_sequential == sequential_pvalue(v.n_a, v.n_b, 0.1)


def test_the_documented_segment_sql_gives_the_reports_counts(client, segment_reports):
    _, r = segment_reports["srm_seg.off"]
    res = client.query(SRM_SEGMENTS_SQL, parameters={"experiment": "srm_seg.off"})
    assert [(s, v, a, b, u) for s, v, a, b, u in res.result_rows] == [
        (x.segment, x.value, x.n_a, x.n_b, x.not_served) for x in r.srm.segments
    ]
    # no segments: no rows, and no per-segment checks
    assert (
        client.query(SRM_SEGMENTS_SQL, parameters={"experiment": "srm.matched"}).result_rows == []
    )
