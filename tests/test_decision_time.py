"""Time to decision and label delay (comparators/decision_time.py, LABELS_SQL), against
independent references.

* The math: the confidence sequence's half-width from ``statistics.confidence_sequence``
  at the projected n is below the distance to the boundary, and at n - 1 it is not
  (consistency with the test that decides); a simulation: drawing ``d ~ N(mu, sd)`` for
  the projected number of pairs, the sequential test decides in 0.55 to 0.8 of the runs
  (the projection is a point estimate: about half the paths end above the mean, some
  crossed earlier) and in over 0.85 by twice that n, and never decides wrongly; the fixed-n
  reference equals statsmodels' ``NormalIndPower`` and has the power it claims.
* On ClickHouse (chdb, as tests/test_report.py): label delay p50/p90/p99 equal numpy's
  ``np.quantile(..., method="linear")`` of the rows' delays (``quantileExactInclusive`` is
  the same definition: linear interpolation between order statistics, R's type 7), the
  coverage is labelled / paired, the unknown-request labels are the dead letters inserted,
  the report's JSON and text carry them, the documented SQL is the SQL that runs; and the
  time to decision shrinks as pairs come in and is "decided" once the verdict is reached.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm
from statsmodels.stats.power import NormalIndPower

from abdag.comparators.decision_time import (
    MIN_PROJECT_PAIRS,
    RATE_WINDOW_S,
    LabelStats,
    eta_seconds,
    fixed_n_pairs,
    half_width,
    pairs_needed,
    reachable,
    time_to_decision,
)
from abdag.comparators.report import LABELS_SQL, build_report
from abdag.comparators.schema import DEAD_LETTER_COUNT, TABLES
from abdag.comparators.statistics import (
    SequentialResult,
    confidence_sequence,
    sequential_test,
)

ROOT = Path(__file__).resolve().parent.parent
T0 = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)


# ============================================================================ the math
def _exact(n: int, mean: float, sd: float, seed: int = 0) -> np.ndarray:
    """n values whose mean and sample sd (ddof=1) are exactly ``mean`` and ``sd``."""
    z = np.random.default_rng(seed).normal(size=n)
    z = (z - z.mean()) / z.std(ddof=1)
    return mean + sd * z


@pytest.mark.parametrize(
    ("mean", "sd", "margin", "decision"),
    [
        (0.05, 0.5, 0.0, "B better"),
        (0.02, 0.8, 0.0, "B better"),
        (-0.004, 0.3, 0.01, "B not worse"),
        (0.0, 0.3, 0.01, "B not worse"),
        (-0.03, 0.6, 0.0, "B worse"),
        (-0.05, 0.6, 0.02, "B worse"),
        (0.01, 0.3, 0.01, "B not worse"),  # m > 0 with a margin: B not worse comes first
    ],
)
def test_the_projected_n_is_where_the_confidence_sequence_leaves_the_boundary(
    mean, sd, margin, decision
):
    (first, boundary), *_ = reachable(mean, margin)
    assert first == decision
    distance = abs(mean - boundary)
    n = pairs_needed(distance, sd, 0.05)
    assert n is not None and n > 200
    # the test's own construction, on data with exactly this mean and sd at n and n - 1
    for m, decided in ((n, True), (n - 1, False)):
        d = _exact(m, mean, sd)
        _, means, lo, hi, _ = confidence_sequence(d, 0.05)
        radius = hi[-1] - means[-1]
        assert radius == pytest.approx(half_width(m, sd, 0.05), rel=1e-9)
        assert means[-1] == pytest.approx(mean, abs=1e-12)
        if decision == "B worse":
            assert bool(hi[-1] < boundary) is decided
        else:
            assert bool(lo[-1] > boundary) is decided
    # at the projected n the half-width is just below the distance: consistency
    assert half_width(n, sd) < distance <= half_width(n - 1, sd)
    assert half_width(n, sd) == pytest.approx(distance, rel=0.01)


def test_min_pairs_burn_in_and_the_boundary_itself():
    assert pairs_needed(10.0, 0.1) == 200  # a huge effect still waits for the verdict's 200
    assert pairs_needed(10.0, 0.1, min_pairs=0, burn_in=100) == 100
    assert pairs_needed(0.1, 0.0) == 200  # no variance at all
    assert pairs_needed(0.0, 0.5) is None and pairs_needed(-1.0, 0.5) is None
    assert pairs_needed(1e-9, 1.0) is None  # beyond MAX_PAIRS: not expected
    assert reachable(0.0) == [] and reachable(-0.01, 0.01) == [] and reachable(math.nan) == []
    assert reachable(0.02, 0.01) == [("B not worse", -0.01), ("B better", 0.0)]
    # n for a stated effect: half the effect, about 4 times the pairs (and a log factor)
    n1, n2 = pairs_needed(0.02, 0.5), pairs_needed(0.01, 0.5)
    assert 4.0 < n2 / n1 < 5.0  # 1/effect^2 is 4; the log adds ~13 %


@pytest.mark.parametrize(
    ("mu", "sd", "margin", "decision"),
    [
        (0.05, 0.5, 0.0, "B better"),
        (-0.04, 0.6, 0.0, "B worse"),
        (0.0, 0.5, 0.02, "B not worse"),
    ],
)
def test_simulated_streams_decide_by_the_projected_n_in_most_runs(mu, sd, margin, decision):
    """If the true mean is mu, the test decides by the projected n in 0.55-0.8 of runs
    (measured: 0.62-0.68) and by twice it in over 0.85 (measured: 0.92-0.97); it never
    reaches another decision."""
    boundary = dict(reachable(mu, margin))[decision]
    n = pairs_needed(abs(mu - boundary), sd, 0.05)
    rng = np.random.default_rng(7)
    at_n, at_2n = [], []
    for _ in range(400):
        d = rng.normal(mu, sd, 2 * n)
        at_n.append(sequential_test(d[:n], 0.05, margin).decision)
        at_2n.append(sequential_test(d, 0.05, margin).decision)
    # never the other side ("B better" may come with B not worse's boundary: it passes it too)
    wrong = {"B worse"} if decision != "B worse" else {"B better", "B not worse"}
    assert not (set(at_n) | set(at_2n)) & wrong
    assert 0.55 <= np.mean([x != "inconclusive" for x in at_n]) <= 0.8
    assert np.mean([x != "inconclusive" for x in at_2n]) > 0.85


def test_the_fixed_n_reference_equals_statsmodels_and_has_its_power():
    for distance, sd, alpha in ((0.05, 0.5, 0.05), (0.01, 0.3, 0.025), (0.2, 1.0, 0.01)):
        es = distance / sd
        ref = NormalIndPower().solve_power(
            effect_size=es, nobs1=None, alpha=alpha / 2, power=0.8, ratio=0, alternative="larger"
        )
        n = fixed_n_pairs(distance, sd, alpha)
        assert n == math.ceil(ref)
        # one look at n: the two-sided interval excludes the boundary with probability 0.8
        means = np.random.default_rng(1).normal(distance, sd / math.sqrt(n), 40_000)
        hit = means - norm.ppf(1 - alpha / 2) * sd / math.sqrt(n) > 0
        assert hit.mean() == pytest.approx(0.8, abs=0.01)
        # looking as often as you like costs pairs: the sequential n is larger
        assert pairs_needed(distance, sd, alpha) > n


def _seq(n, mean, sd, margin=0.0, decision="inconclusive") -> SequentialResult:
    return SequentialResult(n, mean, -1.0, 1.0, 1.0, decision, sd=sd, alpha=0.05, margin=margin)


def test_time_to_decision_statuses():
    pace = LabelStats(labelled_in_window=1200, span_s=3600, paired=5000, labelled=4000)
    assert pace.rate_per_s == 2.0
    t = time_to_decision(_seq(500, 0.03, 0.5), "not enough data", pace)
    assert t.status == "projected" and t.decision == "B better" and t.boundary == 0.0
    assert t.needed_pairs == pairs_needed(0.03, 0.5) and t.more_pairs == t.needed_pairs - 500
    assert t.eta_s == t.more_pairs / 2.0 and t.then is None
    assert t.fixed_n_pairs == fixed_n_pairs(0.03, 0.5)
    # with a margin: B not worse first, then B better
    t = time_to_decision(_seq(500, 0.03, 0.5, margin=0.01), "not enough data", pace)
    assert (t.decision, t.boundary, t.distance) == ("B not worse", -0.01, pytest.approx(0.04))
    assert t.then["decision"] == "B better" and t.then["needed_pairs"] > t.needed_pairs
    # decided; B not worse with a positive mean still projects B better
    t = time_to_decision(_seq(1000, 0.03, 0.5, 0.01, "B not worse"), "B not worse", pace)
    assert t.status == "decided" and t.more_pairs == 0 and t.eta_s == 0.0
    assert t.then["status"] == "projected" and t.then["decision"] == "B better"
    assert time_to_decision(_seq(3000, 0.1, 0.5, 0, "B better"), "B better").then is None
    # the mean on the boundary
    t = time_to_decision(_seq(500, 0.0, 0.5), "not enough data", pace)
    assert t.status == "no decision expected" and "at this effect size" in t.reason
    # the sequence decided but McNemar's guardrail holds the verdict
    t = time_to_decision(_seq(500, 0.2, 0.5, 0, "B better"), "not enough data", pace)
    assert t.status == "no decision expected" and "McNemar" in t.reason
    # too few pairs to project from, or none
    t = time_to_decision(_seq(MIN_PROJECT_PAIRS - 1, 0.2, 0.5), "not enough data", pace)
    assert t.status == "not enough data"
    assert time_to_decision(None, "not enough data").status == "not enough data"
    assert time_to_decision(_seq(500, 0.2, 0.5), "withheld").status == "withheld"
    json.dumps(t.to_dict(), allow_nan=False)


def test_eta_accounts_for_label_delay():
    # labels arriving: K / R, the delay is already in R
    assert eta_seconds(600, LabelStats(labelled_in_window=300, span_s=10_000)) == 1200.0
    # none in the window but requests flowing: the first label comes after ~p50 delay
    batch = LabelStats(
        paired=1000, labelled=500, delay_p50_s=3600.0, paired_in_window=600, span_s=10_000
    )
    assert batch.rate_per_s == 0.0 and batch.paired_rate_per_s == 1.0
    assert eta_seconds(100, batch) == 3600.0 + 100 / (1.0 * 0.5)
    assert eta_seconds(100, LabelStats(span_s=10_000)) is None  # nothing flows
    assert eta_seconds(0, None) == 0.0 and eta_seconds(5, None) is None
    # the window is the experiment's span while that is shorter
    young = LabelStats(labelled_in_window=100, span_s=50.0)
    assert young.effective_window_s == 50.0 and young.rate_per_s == 2.0
    assert "no rate yet" in LabelStats().render()  # no pairs at all: still one line
    assert "2 labelled pairs/s over 50.0 s" in young.render()


# ======================================================================== ClickHouse
def _insert(client, rows: list[dict]) -> None:
    """Rows as dicts of some columns: the others get their defaults."""
    names = list(rows[0])
    client.insert("pairs", [[r[k] for k in names] for r in rows], column_names=names)


def _row(experiment, i, task, y, sa, sb, *, request_ms, label_ms=None, status="paired"):
    request_ts = T0 + dt.timedelta(milliseconds=int(request_ms))
    labelled = label_ms is not None
    return {
        "experiment": experiment,
        "request_id": f"r{i}",
        "partition": i % 4,
        "status": status,
        "task": task,
        "model_a": "prod",
        "model_b": "retrained",
        "version_a": "1",
        "version_b": "2",
        "score_a": None if status == "missing_a" else float(sa),
        "score_b": None if status == "missing_b" else float(sb),
        "pred_a": None if status == "missing_a" or task == "regression" else int(sa >= 0.5),
        "pred_b": None if status == "missing_b" or task == "regression" else int(sb >= 0.5),
        "label": float(y) if labelled else None,
        "latency_a_ms": 5.0,
        "latency_b_ms": 6.0,
        "request_ts": request_ts,
        "paired_ts": request_ts + dt.timedelta(milliseconds=40),
        "label_ts": T0 + dt.timedelta(milliseconds=int(label_ms)) if labelled else None,
        "stage": 3 if labelled else (2 if status == "paired" else 1),
        "worker": "w1",
    }


DAG = "ttd"
EXP = f"{DAG}.delays"
N = 2000


@pytest.fixture(scope="module")
def delays(client):
    """A binary experiment: requests every 1.5 s, label delays of 1 s to 20 min in whole
    milliseconds, 5 % never labelled, the last requests still waiting, a few unpaired;
    dead letters of labels for unknown requests (one read twice), other reasons, another
    DAG's."""
    rng = np.random.default_rng(3)
    y = (rng.random(N) < 0.4).astype(int)
    sa = np.round(1 / (1 + np.exp(-(1.0 * y + rng.normal(size=N) - 0.5))), 3)
    sb = np.round(1 / (1 + np.exp(-(1.2 * y + rng.normal(size=N) - 0.6))), 3)
    request_ms = np.arange(N) * 1500 + rng.integers(0, 1000, N)
    delay_ms = rng.integers(1_000, 1_200_000, N)
    never = rng.random(N) < 0.05
    label_ms = request_ms + delay_ms
    labelled = ~never & (label_ms <= request_ms[-1])  # labels in by the last request
    rows = [
        _row(EXP, i, "binary", y[i], sa[i], sb[i], request_ms=request_ms[i],
             label_ms=label_ms[i] if labelled[i] else None)
        for i in range(N)
    ]  # fmt: skip
    for j, status in enumerate(("missing_a", "missing_b", "missing_b")):
        rows.append(_row(EXP, 10**6 + j, "binary", 1, 0.5, 0.5, request_ms=j * 1000, status=status))
    _insert(client, rows)
    _insert(client, rows[:100])  # re-delivered: counts once
    cols = [c for c, _ in TABLES["dead_letters"].columns]
    unknown = "label without request"
    dead = [
        [DAG, "delays", unknown, T0, "x1", "", 1, "abdag.ttd.labels.in/0/7", 0, ""],
        [DAG, "delays", unknown, T0, "x1", "", 1, "abdag.ttd.labels.in/0/7", 0, ""],  # again
        [DAG, "delays", unknown, T0, "x2", "", 1, "abdag.ttd.labels.in/1/3", 0, ""],
        [DAG, "delays", unknown, T0, "x3", "", 2, "", 0, ""],
        [DAG, "delays", "bad label", T0, "x4", "", 1, "abdag.ttd.labels.in/1/4", 0, ""],
        ["other", "delays", unknown, T0, "x5", "", 9, "", 0, ""],
    ]
    client.insert("dead_letters", dead, column_names=cols)
    rep = build_report(client, EXP, n_resamples=50)
    truth = {
        "request_ms": request_ms,
        "label_ms": np.where(labelled, label_ms, -1),
        "labelled": labelled,
        "unknown": 1 + 1 + 2,  # x1 read twice counts once, x2, and x3 written with count 2
    }
    return rep, truth


def test_label_delay_quantiles_equal_numpys(delays):
    rep, t = delays
    lab = t["labelled"]
    delay_s = (t["label_ms"][lab] - t["request_ms"][lab]) / 1000.0
    ref = np.quantile(delay_s, [0.5, 0.9, 0.99], method="linear")
    got = [rep.labels.delay_p50_s, rep.labels.delay_p90_s, rep.labels.delay_p99_s]
    assert got == list(ref)  # the same definition, to the last bit
    assert got != pytest.approx(
        list(np.quantile(delay_s, [0.5, 0.9, 0.99], method="lower")), rel=1e-12
    )  # and a real check: another definition differs


def test_coverage_waiting_and_rates(delays):
    rep, t = delays
    lab = t["labelled"]
    L = rep.labels
    assert (
        (L.paired, L.labelled)
        == (N, int(lab.sum()))
        == (rep.counts["paired"], rep.counts["scored"])
    )
    assert L.coverage == lab.sum() / N
    # the experiment's clock: its last request or label
    as_of_ms = max(t["request_ms"].max(), t["label_ms"].max())
    assert L.as_of == T0 + dt.timedelta(milliseconds=int(as_of_ms))
    age_s = (as_of_ms - t["request_ms"]) / 1000.0
    p99 = L.delay_p99_s
    assert L.waiting == int(np.sum(~lab & (age_s < p99)))
    assert L.settled_paired == int(np.sum(age_s >= p99))
    assert L.settled_coverage == np.sum(lab & (age_s >= p99)) / np.sum(age_s >= p99)
    label_age_s = (as_of_ms - t["label_ms"][lab]) / 1000.0
    assert L.labelled_in_window == int(np.sum(label_age_s < RATE_WINDOW_S))
    assert L.rate_per_s == L.labelled_in_window / RATE_WINDOW_S
    assert L.paired_in_window == int(np.sum(age_s < RATE_WINDOW_S))
    assert L.unknown_request_labels == t["unknown"]


def test_the_report_carries_labels_and_time_to_decision(delays):
    rep, _ = delays
    d = rep.to_dict()
    json.dumps(d, allow_nan=False)
    lb = d["labels"]
    for key in ("delay_p50_s", "delay_p90_s", "delay_p99_s", "coverage", "unknown_request_labels"):
        assert lb[key] is not None, key
    assert lb["unknown_request_labels"] == 4 and lb["window_s"] == RATE_WINDOW_S
    ttd = d["time_to_decision"]
    assert ttd["status"] in ("decided", "projected", "no decision expected")
    if ttd["status"] == "projected":
        assert ttd["eta_s"] == pytest.approx(ttd["more_pairs"] / lb["rate_per_s"])
        as_of = dt.datetime.fromisoformat(lb["as_of"])
        assert dt.datetime.fromisoformat(ttd["eta_ts"]) == as_of + dt.timedelta(
            seconds=ttd["eta_s"]
        )
    assert LABELS_SQL["binary"] in d["sql"]
    text = rep.render()
    assert "Time to decision:" in text and "Labels: delay p50/p90/p99" in text
    assert "4 labels for unknown requests" in text


def _doc_section(title: str) -> str:
    text = (ROOT / "docs" / "statistics.md").read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_documented_sql_is_the_sql_that_runs(client, delays):
    rep, t = delays
    section = _doc_section("Label delay and coverage")
    block = section.split("```sql\n", 1)[1].split("\n```", 1)[0]
    literal = (
        LABELS_SQL["binary"]
        .replace("{experiment:String}", "'fraud.a_vs_b'")
        .replace("{window_seconds:UInt32}", str(RATE_WINDOW_S))
    )
    assert block == literal
    assert client.query(block.replace("'fraud.a_vs_b'", f"'{EXP}'")).result_rows  # it runs
    # the abdag sql lines give the report's numbers
    bash = section.split("```bash\n", 1)[1].split("\n```", 1)[0]
    queries = [shlex.split(line)[2] for line in bash.splitlines() if line.startswith("abdag sql")]
    ours = [
        q.replace("'fraud.a_vs_b'", f"'{EXP}'").replace("dag = 'fraud'", f"dag = '{DAG}'")
        for q in queries
    ]
    (quantiles,) = client.query(ours[0]).result_rows[0]
    assert list(quantiles) == pytest.approx(
        [rep.labels.delay_p50_s, rep.labels.delay_p90_s, rep.labels.delay_p99_s], rel=1e-12
    )
    buckets = client.query(ours[1]).result_rows
    assert sum(r[1] for r in buckets) == rep.labels.paired
    assert sum(r[2] for r in buckets) == rep.labels.labelled
    (rate,) = client.query(ours[2]).result_rows[0]
    assert rate == pytest.approx(rep.labels.rate_per_s)
    (unknown,) = client.query(ours[3]).result_rows[0]
    assert unknown == rep.labels.unknown_request_labels == t["unknown"]
    assert DEAD_LETTER_COUNT in ours[3]


def _block(n: int) -> np.ndarray:
    """Per-request loss differences in blocks of 20 with mean exactly 0.05 and sd 0.5:
    the running mean and sd stay put, so the projection has one answer."""
    z = np.random.default_rng(11).normal(size=20)
    z = (z - z.mean()) / z.std(ddof=1)
    return np.tile(0.05 + 0.5 * z, n // 20 + 1)[:n]


def test_time_to_decision_shrinks_as_pairs_come_and_is_decided_at_the_verdict(client):
    """Regression on squared error: A's loss is 1 + d + 1, B's 1 + 1 (label 0, scores the
    square roots), so d is the loss difference exactly. One request a second, labels 30 s
    later."""
    exp = "ttd.shrink"
    n_all = 1400
    d = _block(n_all)
    la, lb = 2.0 + d, np.full(n_all, 2.0)
    rows = [
        _row(exp, i, "regression", 0.0, math.sqrt(la[i]), math.sqrt(lb[i]),
             request_ms=1000 * i, label_ms=1000 * i + 30_000)
        for i in range(n_all)
    ]  # fmt: skip
    needed = pairs_needed(0.05, float(np.std(d, ddof=1)))
    assert 700 < needed < 1100
    seen, last = [], None
    for upto in (300, 600, 900, n_all):
        _insert(client, rows[(last or 0) : upto])
        last = upto
        rep = build_report(client, exp, n_resamples=20)
        ttd = rep.time_to_decision
        seen.append((upto, rep.verdict.label, ttd.status, ttd.more_pairs, ttd.eta_s))
        if rep.verdict.label == "not enough data":
            assert ttd.status == "projected" and ttd.decision == "B better"
            assert ttd.needed_pairs == pairs_needed(ttd.distance, ttd.sd)
            assert ttd.eta_s == pytest.approx(ttd.more_pairs / rep.labels.rate_per_s)
        else:
            assert rep.verdict.label == "B better"
            assert ttd.status == "decided" and ttd.more_pairs == 0 and ttd.eta_s == 0.0
    projected = [s for s in seen if s[2] == "projected"]
    assert len(projected) >= 2, seen
    more = [s[3] for s in projected]
    eta = [s[4] for s in projected]
    assert more == sorted(more, reverse=True) and len(set(more)) == len(more), seen
    assert eta == sorted(eta, reverse=True), seen
    assert seen[-1][2] == "decided", seen
