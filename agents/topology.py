"""Which topics a DAG uses: the single list that `abdag topics`, workers and produce share."""

from __future__ import annotations

from abdag.agents.dag import Dag
from abdag.topics import dead_letter_topic, pairs_topic, snapshots_topic


def dag_topics(dag: Dag) -> list[str]:
    """Every topic of the DAG: each node's (its kind says which), then the DAG's own."""
    nodes = dag.topological()
    names = [topic for node in nodes for topic in node.topics(dag)]
    if any(node.writes_pairs for node in nodes):
        names += [pairs_topic(dag.name), snapshots_topic(dag.name)]
    names.append(dead_letter_topic(dag.name))
    return names
