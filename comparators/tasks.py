"""The comparison tasks, each defined once: one small class per task, registered in TASKS.

A task says what its models output, which labels it takes, the per-request loss the
sequential test watches (scalar for the live statistics, numpy for the report), how its
rows read in SQL, and which families of live statistics it keeps (``classes``,
``positive_score``). Everything that differs between tasks reads it from here: the DAG
checks, the comparison node, the live metrics, the report, the dashboard and the registry.

Kept free of numpy and river (numpy is imported inside :meth:`Task.per_request_loss`), so
that the DAG API can name the tasks without loading the metric machinery: a DAG file
imports in milliseconds.

Adding a task: a class here, listed in ``TASK_SPECS``; the metrics that apply to it name
it in their ``tasks`` (:mod:`abdag.comparators.metric_specs`).

>>> TASKS
('binary', 'multiclass', 'regression')
>>> t = task_spec("binary")
>>> t.outputs, t.loss, round(t.request_loss(0.8, 1, 1.0), 4)
(('sigmoid', 'probability'), 'log loss', 0.2231)
>>> check_label("multiclass", 2.0, n_classes=3)
2.0
>>> check_label("binary", 7.0)
Traceback (most recent call last):
...
abdag.topics.records.BadRecord: bad label: a binary label is 0 or 1 (or true/false), got 7
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from abdag.topics.records import BadRecord

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DEFAULT_THRESHOLD",
    "EPS",
    "TASKS",
    "TASK_SPECS",
    "Binary",
    "Multiclass",
    "Regression",
    "Task",
    "check_label",
    "label_text",
    "task_spec",
]

DEFAULT_THRESHOLD = 0.5
"""Class 1 when ``score >= DEFAULT_THRESHOLD``, only for a binary row that carries a score
and no predicted class. Rows written by abdag always carry the class their model node
derived with its own ``ModelNode.threshold`` (``abdag.models.batching``), so this fallback only
serves rows from elsewhere (other writers, hand-made tests)."""

EPS = 1e-15
"""Probability clip for log loss (river's value), in numpy, SQL and live alike."""


class Task:
    """One task. Subclasses set the class attributes and the three methods.

    ``outputs``: the model output kinds (``dag.model(output=...)``) it accepts.
    ``loss``: the per-request loss, by name. ``classes``: models predict a class (confusion
    matrix, agreement, McNemar). ``positive_score``: the score is P(class 1) (a class from
    the model's threshold, log loss, a score histogram). ``reads``: what a labelled row
    needs from both models to be scored (``'score'`` or ``'pred'``). ``label_sql``: the
    label column as the metric SQL reads it. ``prior_var``: one pseudo observation of this
    variance for the sequential test, for losses that can start with a run of zeros.
    """

    name: ClassVar[str]
    outputs: ClassVar[tuple[str, ...]]
    loss: ClassVar[str]
    classes: ClassVar[bool] = False
    positive_score: ClassVar[bool] = False
    reads: ClassVar[str] = "score"
    label_sql: ClassVar[str] = "assumeNotNull(label)"
    prior_var: ClassVar[float] = 0.0

    def check_label(self, label: float, n_classes: int | None = None) -> str | None:
        """Why ``label`` (finite) is impossible for this task, or None when it is usable."""
        return None

    def request_loss(self, score: float | None, pred: int | None, label: float) -> float:
        """Loss of one prediction."""
        raise NotImplementedError

    def per_request_loss(
        self, y: np.ndarray, score: np.ndarray | None = None, pred: np.ndarray | None = None
    ) -> np.ndarray:
        """Loss of each request; ``loss_a - loss_b`` feeds the sequential test."""
        raise NotImplementedError

    def score_of(self, output: dict[str, Any]) -> float | None:
        """The score column of a pair row from a model's output fields."""
        return output.get("score")

    def pred_sql(self, m: str) -> str:
        """The predicted class of model ``m`` per row in SQL (NULL when it has none)."""
        return f"pred_{m}"

    @property
    def scorable_sql(self) -> str:
        """Rows both models can be scored on."""
        return f"{self.reads}_a IS NOT NULL AND {self.reads}_b IS NOT NULL"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Binary(Task):
    """Two classes; the model gives P(class 1) and the class from its threshold."""

    name = "binary"
    outputs = ("sigmoid", "probability")
    loss = "log loss"
    classes = True
    positive_score = True
    label_sql = "toUInt8(assumeNotNull(label))"

    def check_label(self, label: float, n_classes: int | None = None) -> str | None:
        if label not in (0.0, 1.0):
            return f"a binary label is 0 or 1 (or true/false), got {label_text(label)}"
        return None

    def request_loss(self, score: float | None, pred: int | None, label: float) -> float:
        p = EPS if score < EPS else (1.0 - EPS if score > 1.0 - EPS else score)  # type: ignore[operator]
        return -math.log(p) if label == 1 else -math.log(1.0 - p)

    def per_request_loss(self, y, score=None, pred=None):  # noqa: ANN001, ANN201
        import numpy as np

        y = np.asarray(y, dtype=float)
        p = np.clip(np.asarray(score, dtype=float), EPS, 1.0 - EPS)
        return -(y * np.log(p) + (1.0 - y) * np.log1p(-p))

    def pred_sql(self, m: str) -> str:
        # a row without a class (not one abdag wrote) falls back on DEFAULT_THRESHOLD
        return f"ifNull(pred_{m}, toInt32(score_{m} >= {DEFAULT_THRESHOLD}))"


class Multiclass(Task):
    """A class index out of a softmax; scored by the predicted class."""

    name = "multiclass"
    outputs = ("softmax",)
    loss = "0/1 loss"
    classes = True
    reads = "pred"
    label_sql = "toInt64(assumeNotNull(label))"
    prior_var = 1.0  # the largest variance a {-1, 0, 1} difference can have

    def check_label(self, label: float, n_classes: int | None = None) -> str | None:
        if not label.is_integer() or label < 0:
            return f"a multiclass label is a class index 0, 1, ..., got {label_text(label)}"
        if n_classes is not None and label >= n_classes:
            return (
                f"class {label_text(label)} is not one the models know (they output "
                f"{n_classes} classes: 0..{n_classes - 1})"
            )
        return None

    def request_loss(self, score: float | None, pred: int | None, label: float) -> float:
        return 0.0 if pred == int(label) else 1.0

    def per_request_loss(self, y, score=None, pred=None):  # noqa: ANN001, ANN201
        import numpy as np

        return (np.asarray(pred) != np.asarray(y, dtype=float)).astype(float)


class Regression(Task):
    """A real value; its score is the value itself."""

    name = "regression"
    outputs = ("value",)
    loss = "squared error"

    def request_loss(self, score: float | None, pred: int | None, label: float) -> float:
        e = score - label  # type: ignore[operator]
        return e * e

    def per_request_loss(self, y, score=None, pred=None):  # noqa: ANN001, ANN201
        import numpy as np

        return (np.asarray(score, dtype=float) - np.asarray(y, dtype=float)) ** 2

    def score_of(self, output: dict[str, Any]) -> float | None:
        v = output.get("output")
        return float(v) if isinstance(v, int | float) else output.get("score")


TASK_SPECS: dict[str, Task] = {t.name: t for t in (Binary(), Multiclass(), Regression())}
"""Every task by name."""

TASKS: tuple[str, ...] = tuple(TASK_SPECS)
"""The task names, in the order reports list them."""


def task_spec(name: str) -> Task:
    """The task called ``name``; ValueError naming the known ones otherwise."""
    try:
        return TASK_SPECS[name]
    except KeyError:
        raise ValueError(f"task must be one of {TASKS}, got {name!r}") from None


def check_label(
    task: str, label: float, *, n_classes: int | None = None, request_id: str = ""
) -> float:
    """``label`` if the task can use it, else :class:`BadRecord` ``'bad label'``.

    A label source only checks that a label is a finite number (it does not know the
    task); the comparison node checks it against its task before the label reaches the
    join, so an impossible label (7 on a binary comparison) is a dead letter, never a
    metric input. ``n_classes``: the width of the models' softmax output (multiclass; only
    ``y >= 0`` is checked while it is unknown).
    """
    if not math.isfinite(label):
        raise BadRecord("bad label", f"a {task} label must be finite, got {label}", request_id)
    why = task_spec(task).check_label(label, n_classes)
    if why is not None:
        raise BadRecord("bad label", why, request_id)
    return label


def label_text(x: float) -> str:
    """A label as a user wrote it: ``1`` for 1.0, ``0.5`` for 0.5."""
    return str(int(x)) if float(x).is_integer() else repr(x)
