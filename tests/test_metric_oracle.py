"""Every metric, every task: live == SQL == offline == scikit-learn on the same data.

One parametrized oracle (after river's ``test_metrics.py``) over the registry
``abdag.comparators.metric_specs.METRICS``: for each metric and each of its tasks, the live value
of ``PairMetrics`` (and the same after merging partitions), the report's ClickHouse SQL on
the real engine (the session stack), the offline numpy value the bootstrap resamples, the
dashboard's cumulative curve, and scikit-learn agree. A metric added to the registry fails
here until its scikit-learn reference is added to ``SKLEARN``.
"""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest
from sklearn import metrics as skm

from abdag.clickhouse import connect
from abdag.comparators.metric_specs import METRICS, specs_for
from abdag.comparators.metrics import PairMetrics
from abdag.comparators.report import metrics_sql
from abdag.comparators.rows import PAIR_COLUMNS, to_insert_values
from abdag.comparators.schema import ensure_schema
from abdag.comparators.statistics import METRIC_FUNCTIONS
from abdag.comparators.tasks import TASKS

REL = 1e-9
N = 700
THRESHOLD = 0.4  # the model nodes' threshold: not 0.5, so SQL must read the classes sent

SKLEARN = {
    # name: f(y, score, pred)
    "accuracy": lambda y, s, p: skm.accuracy_score(y, p),
    "precision": lambda y, s, p: skm.precision_score(y, p, zero_division=0),
    "recall": lambda y, s, p: skm.recall_score(y, p, zero_division=0),
    "f1": lambda y, s, p: skm.f1_score(y, p, zero_division=0),
    "macro_f1": lambda y, s, p: skm.f1_score(y, p, average="macro"),
    "micro_f1": lambda y, s, p: skm.f1_score(y, p, average="micro"),
    "roc_auc": lambda y, s, p: skm.roc_auc_score(y, s),
    "pr_auc": lambda y, s, p: skm.average_precision_score(y, s),
    "log_loss": lambda y, s, p: skm.log_loss(y, s),
    "roc_auc_river": lambda y, s, p: skm.roc_auc_score(y, s),
    "mae": lambda y, s, p: skm.mean_absolute_error(y, s),
    "rmse": lambda y, s, p: skm.root_mean_squared_error(y, s),
    "r2": lambda y, s, p: skm.r2_score(y, s),
}
CASES = [(task, name) for name, m in METRICS.items() for task in m.tasks]


def _data(task: str) -> dict[str, np.ndarray]:
    """Ties in the scores; model B has an edge case per task: binary B never predicts 1
    (precision, recall and F1 divide by zero), multiclass B predicts a class no label has."""
    rng = np.random.default_rng(TASKS.index(task))
    if task == "binary":
        y = (rng.random(N) < 0.4).astype(int)
        sa = np.round(1 / (1 + np.exp(-(1.2 * y + rng.normal(size=N) - 0.6))), 2)
        sb = np.round(rng.random(N) * 0.35 + 0.05 * y, 2)
        return {"y": y, "sa": sa, "sb": sb, "pa": (sa >= THRESHOLD).astype(int), "pb": 0 * y}
    if task == "multiclass":
        y = rng.integers(0, 4, N)
        pa = np.where(rng.random(N) < 0.6, y, rng.integers(0, 4, N))
        pb = np.where(rng.random(N) < 0.7, y, rng.integers(0, 4, N))
        pb[:6] = 9
        return {"y": y, "sa": rng.random(N), "sb": rng.random(N), "pa": pa, "pb": pb}
    y = rng.normal(10, 3, N)
    return {"y": y, "sa": y + rng.normal(0, 1.5, N), "sb": y + rng.normal(0.2, 1.0, N)}


def _x(name: str, d: dict[str, np.ndarray], m: str) -> np.ndarray:
    return d[f"s{m}"] if METRICS[name].reads == "score" else d[f"p{m}"]


def _feed(pm: PairMetrics, d: dict[str, np.ndarray], idx) -> None:
    pa, pb = d.get("pa"), d.get("pb")
    for i in idx:
        pm.update(
            float(d["sa"][i]),
            None if pa is None else int(pa[i]),
            float(d["sb"][i]),
            None if pb is None else int(pb[i]),
            float(d["y"][i]),
        )


@pytest.fixture(scope="module")
def sql_values(stack):
    """Each task's rows in ClickHouse, and every metric's SQL value read back."""
    client = connect(stack)
    ensure_schema(client)
    out = {}
    for task in TASKS:
        d = _data(task)
        experiment = f"oracle.{task}.{uuid.uuid4().hex[:8]}"
        rows = []
        for i in range(N):
            rows.append(
                {
                    **dict.fromkeys(PAIR_COLUMNS),
                    "experiment": experiment,
                    "request_id": f"r{i}",
                    "partition": 0,
                    "status": "paired",
                    "task": task,
                    **{c: "" for c in ("model_a", "model_b", "version_a", "version_b", "worker")},
                    "score_a": float(d["sa"][i]),
                    "score_b": float(d["sb"][i]),
                    "pred_a": int(d["pa"][i]) if "pa" in d else None,
                    "pred_b": int(d["pb"][i]) if "pb" in d else None,
                    "label": float(d["y"][i]),
                    "request_ts": 1.7e9 + i,
                    "paired_ts": 1.7e9 + i,
                    "label_ts": 1.7e9 + i + 1,
                    "stage": 3,
                }
            )
        client.insert("pairs", [to_insert_values(r) for r in rows], column_names=PAIR_COLUMNS)
        names = [k for k in METRICS if task in METRICS[k].tasks and not METRICS[k].live_only]
        res = client.query(metrics_sql(task, names), parameters={"experiment": experiment})
        out[task] = dict(zip(res.column_names, res.result_rows[0], strict=True))
    yield out
    client.close()


def test_every_metric_has_a_scikit_learn_reference_and_a_task():
    assert set(SKLEARN) == set(METRICS)
    for name, m in METRICS.items():
        assert m.name == name and m.tasks and set(m.tasks) <= set(TASKS)
        assert m.reads in ("pred", "score") and m.label
        assert (m.sql is None) == m.live_only == (name not in METRIC_FUNCTIONS)


@pytest.mark.parametrize("task,name", CASES, ids=[f"{t}-{n}" for t, n in CASES])
def test_live_sql_offline_equal_scikit_learn(task, name, sql_values):
    spec = METRICS[name]
    d = _data(task)
    pm = PairMetrics(task, [name])
    _feed(pm, d, range(N))
    live = pm.snapshot()
    for m in ("a", "b"):
        x = _x(name, d, m)
        ref = SKLEARN[name](d["y"], d.get(f"s{m}"), d.get(f"p{m}"))
        got = live[m][name]
        if spec.live_abs_tol:
            assert got == pytest.approx(ref, abs=spec.live_abs_tol), (m, "live")
            if name == "roc_auc":
                assert abs(got - ref) <= live[m]["roc_auc_err_bound"] + 1e-12
        else:
            assert got == pytest.approx(ref, rel=REL), (m, "live")
        if spec.live_only:
            continue
        assert sql_values[task][f"{name}_{m}"] == pytest.approx(ref, rel=REL), (m, "sql")
        assert float(spec.offline(d["y"], x)) == pytest.approx(ref, rel=REL), (m, "offline")


@pytest.mark.parametrize("task,name", CASES, ids=[f"{t}-{n}" for t, n in CASES])
def test_curves_and_resamples_equal_offline(task, name):
    """The dashboard's curve is the offline value of each prefix; the bootstrap's batch of
    resamples gives the offline value of each resample."""
    spec = METRICS[name]
    if spec.live_only:
        pytest.skip("live only: no offline value")
    d = _data(task)
    y, x = d["y"], _x(name, d, "a")
    ends = [0, 1, 5, 5, 40, 333, N]
    want = [float(spec.offline(y[:k], x[:k])) if k else math.nan for k in ends]
    got = spec.cumulative(y, x, ends)
    np.testing.assert_allclose(got, want, rtol=1e-9, equal_nan=True)
    idx = np.random.default_rng(1).integers(0, N, (4, N))
    batch = spec.offline(y[idx], x[idx])
    np.testing.assert_allclose(
        batch, [float(spec.offline(y[i], x[i])) for i in idx], rtol=1e-12, equal_nan=True
    )


@pytest.mark.parametrize("task,name", CASES, ids=[f"{t}-{n}" for t, n in CASES])
def test_direction(task, name):
    """``higher_is_better`` agrees with scikit-learn: perfect predictions beat noisy ones."""
    d = _data(task)
    y = d["y"]
    perfect = {
        "binary": (np.where(y == 1, 0.9, 0.1), y),
        "multiclass": (d["sa"], y),
        "regression": (y, None),
    }[task]
    ref = SKLEARN[name]
    best, noisy = ref(y, *perfect), ref(y, d.get("sa"), d.get("pa"))
    assert best != noisy
    assert (best > noisy) == METRICS[name].higher_is_better


def test_defaults_and_unknown_names():
    assert [m.name for m in specs_for("binary")] == [
        "accuracy",
        "precision",
        "recall",
        "f1",
        "roc_auc",
        "pr_auc",
        "log_loss",
    ]
    with pytest.raises(ValueError, match="unknown regression metrics"):
        specs_for("regression", ["accuracy"])
    with pytest.raises(ValueError, match="task must be one of"):
        specs_for("ranking")
