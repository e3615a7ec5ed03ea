"""Each task is defined once (abdag.comparators.tasks); every other module reads it there."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.metrics as skm

from abdag.agents.nodes.model import OUTPUTS
from abdag.comparators.metric_specs import AVAILABLE_METRICS, DEFAULT_METRICS
from abdag.comparators.tasks import TASK_SPECS, TASKS, task_spec


def _rows(task: str, n: int = 300):
    rng = np.random.default_rng(len(task))
    if task == "binary":
        y = rng.integers(0, 2, n).astype(float)
        s = rng.random(n)
        return y, s, (s >= 0.5).astype(int)
    if task == "multiclass":
        y = rng.integers(0, 4, n).astype(float)
        return y, None, np.where(rng.random(n) < 0.6, y, rng.integers(0, 4, n)).astype(int)
    y = rng.normal(3, 2, n)
    return y, y + rng.normal(0, 1, n), None


@pytest.mark.parametrize("task", TASKS)
def test_the_scalar_loss_of_a_task_equals_its_vectorised_loss_and_scikit_learn(task):
    spec = task_spec(task)
    y, s, p = _rows(task)
    scalar = [
        spec.request_loss(None if s is None else s[i], None if p is None else p[i], y[i])
        for i in range(len(y))
    ]
    vector = spec.per_request_loss(y, s, p)
    np.testing.assert_allclose(scalar, vector, rtol=1e-12)
    ref = {
        "binary": lambda: skm.log_loss(y, s),
        "multiclass": lambda: 1.0 - skm.accuracy_score(y, p),
        "regression": lambda: skm.mean_squared_error(y, s),
    }[task]()
    assert vector.mean() == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("task", TASKS)
def test_a_task_accepts_only_model_outputs_that_exist_and_has_default_metrics(task):
    spec = TASK_SPECS[task]
    assert spec.outputs and set(spec.outputs) <= set(OUTPUTS)
    assert spec.reads in ("score", "pred")
    assert DEFAULT_METRICS[task] and set(DEFAULT_METRICS[task]) <= set(AVAILABLE_METRICS[task])


def test_the_registry_and_the_dag_api_know_the_same_tasks():
    from abdag.agents import dag
    from abdag.models import registry

    assert registry.TASKS is TASKS and dag.TASKS is TASKS


def test_an_unknown_task_names_the_known_ones():
    with pytest.raises(
        ValueError,
        match=r"task must be one of \('binary', 'multiclass', 'regression'\), got 'ranking'",
    ):
        task_spec("ranking")
