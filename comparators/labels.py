"""Which ground-truth labels a comparison may use, per task.

A label source only checks that a label is a finite number (it does not know the task);
the comparison node checks it against its task before the label reaches the join, so an
impossible label (7 on a binary comparison) is a dead letter, never a metric input.

>>> check_label("binary", 1.0)
1.0
>>> check_label("multiclass", 2.0, n_classes=3)
2.0
>>> check_label("binary", 7.0)
Traceback (most recent call last):
...
abdag.topics.records.BadRecord: bad label: a binary label is 0 or 1 (or true/false), got 7
"""

from __future__ import annotations

import math

from abdag.topics.records import BadRecord


def check_label(
    task: str, label: float, *, n_classes: int | None = None, request_id: str = ""
) -> float:
    """``label`` if the task can use it, else :class:`BadRecord` ``'bad label'``.

    binary: 0 or 1; multiclass: an integer class ``0 <= y < n_classes`` (``n_classes``: the
    width of the models' softmax output; only ``y >= 0`` is checked while it is unknown);
    regression: any finite number.
    """
    if not math.isfinite(label):
        raise BadRecord("bad label", f"a {task} label must be finite, got {label}", request_id)
    if task == "binary" and label not in (0.0, 1.0):
        why = f"a binary label is 0 or 1 (or true/false), got {label_text(label)}"
        raise BadRecord("bad label", why, request_id)
    if task == "multiclass":
        if not label.is_integer() or label < 0:
            raise BadRecord(
                "bad label",
                f"a multiclass label is a class index 0, 1, ..., got {label_text(label)}",
                request_id,
            )
        if n_classes is not None and label >= n_classes:
            raise BadRecord(
                "bad label",
                f"class {label_text(label)} is not one the models know (they output {n_classes} "
                f"classes: 0..{n_classes - 1})",
                request_id,
            )
    return label


def label_text(x: float) -> str:
    """A label as a user wrote it: ``1`` for 1.0, ``0.5`` for 0.5."""
    return str(int(x)) if float(x).is_integer() else repr(x)
