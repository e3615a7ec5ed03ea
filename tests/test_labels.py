"""Labels a comparison may use, per task: impossible ones are refused, never counted."""

from __future__ import annotations

import pytest

from abdag.comparators.tasks import check_label
from abdag.topics.records import BadRecord


@pytest.mark.parametrize(
    ("task", "label", "n_classes"),
    [
        ("binary", 0.0, None),
        ("binary", 1.0, None),
        ("multiclass", 0.0, 3),
        ("multiclass", 2.0, 3),
        ("multiclass", 41.0, None),  # classes not known yet: any class index
        ("regression", -3.25, None),
        ("regression", 1e12, None),
    ],
)
def test_a_label_the_task_can_use_passes_unchanged(task, label, n_classes):
    assert check_label(task, label, n_classes=n_classes) == label


@pytest.mark.parametrize(
    ("task", "label", "n_classes", "says"),
    [
        ("binary", 7.0, None, "0 or 1"),
        ("binary", -1.0, None, "got -1"),
        ("binary", 0.5, None, "got 0.5"),
        ("multiclass", 3.0, 3, "output 3 classes: 0..2"),
        ("multiclass", 1.5, 3, "class index"),
        ("multiclass", -1.0, None, "class index"),
        ("regression", float("nan"), None, "finite"),
        ("regression", float("inf"), None, "finite"),
    ],
)
def test_an_impossible_label_is_a_bad_label_naming_the_request(task, label, n_classes, says):
    with pytest.raises(BadRecord, match=says) as refused:
        check_label(task, label, n_classes=n_classes, request_id="r-9")
    assert (refused.value.reason, refused.value.request_id) == ("bad label", "r-9")
