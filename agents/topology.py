"""Which topics a DAG uses: the single list that `abdag topics`, workers and produce share."""

from __future__ import annotations

from abdag.agents.dag import Comparison, Dag, LabelSource, Source
from abdag.topics import (
    dead_letter_topic,
    input_topic,
    node_topic,
    pairs_topic,
    served_topic,
    snapshots_topic,
)


def dag_topics(dag: Dag) -> list[str]:
    names: list[str] = []
    for node in dag.topological():
        if isinstance(node, Source | LabelSource):
            names.append(input_topic(dag.name, node.name))
        if isinstance(node, Comparison):
            names += [f"abdag.{dag.name}.{node.name}.ticks", served_topic(dag.name, node.name)]
        else:
            names.append(node_topic(dag.name, node.name))
    if any(isinstance(node, Comparison) for node in dag.topological()):
        names += [pairs_topic(dag.name), snapshots_topic(dag.name)]
    names.append(dead_letter_topic(dag.name))
    return names
