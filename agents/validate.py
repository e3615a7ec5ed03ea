"""Checking a DAG before anything runs.

Structure (cycles, unknown inputs) is checked first, then each node's own checks (its
kind's :meth:`~abdag.agents.nodes.base.Node.check`); then every model is loaded and the DAG
is dry-run on one sample event per source (the source's ``example`` or the first event of
its ``sampler``), each node passing on what it would send (:meth:`Node.dry_run`), so an
input builder that makes the wrong shape or dtype fails here, naming the node and the file,
instead of in a worker at 3 am.
"""

from __future__ import annotations

from abdag.agents.dag import Dag
from abdag.agents.errors import DagError
from abdag.topics import Event


def validate(dag: Dag, *, load_models: bool = True) -> None:
    """Raise :class:`DagError` for the first problem found."""
    order = dag.topological()
    if not dag.nodes:
        raise DagError("the DAG has no nodes", file=dag.file)
    for node in order:
        node.check(dag)
    if load_models:
        events: dict[str, Event | None] = {}
        for node in order:
            events[node.name] = node.dry_run(dag, events)
