"""The comparison tasks, declared once.

Kept in a module of its own, free of numpy and river, so that the DAG API
(:mod:`abdag.agents.dag`) can name the tasks without loading the metric machinery: a DAG file
imports in milliseconds.

Adding a task means: its name here, its metrics' ``tasks`` in
:mod:`abdag.comparators.metric_specs`, how a pair updates the live statistics
(:meth:`abdag.comparators.metrics.PairMetrics.update`), its per-request loss
(:func:`abdag.comparators.metrics.request_loss`,
:func:`abdag.comparators.statistics.per_request_loss`),
its row columns and scorable rows in :mod:`abdag.comparators.report`, and the model outputs it
accepts (:mod:`abdag.agents.validate`).

>>> TASKS
('binary', 'multiclass', 'regression')
"""

from __future__ import annotations

__all__ = ["DEFAULT_THRESHOLD", "TASKS"]

TASKS: tuple[str, ...] = ("binary", "multiclass", "regression")

DEFAULT_THRESHOLD = 0.5
"""Class 1 when ``score >= DEFAULT_THRESHOLD``, only for a binary row that carries a score
and no predicted class. Rows written by abdag always carry the class their model node
derived with its own ``ModelNode.threshold`` (``abdag.models.batching``), so this fallback only
serves rows from elsewhere (other writers, hand-made tests)."""
