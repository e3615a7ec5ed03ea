"""The label-source kind: an input topic of ground truth, ``{"request_id": ..., "label": ...}``.

Its agent checks that each label names a request and is a number, and places it by the
request id like the source does, so a label meets its request's predictions in the same
partition of the comparison (which checks the label against its task).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from abdag.agents.nodes.base import Node
from abdag.topics import input_topic, label_from_raw, node_topic

if TYPE_CHECKING:
    from abdag.agents.app import DagRuntime
    from abdag.agents.dag import Dag


@dataclass(eq=False)
class LabelSource(Node):
    """An input topic of ground truth: ``{"request_id": ..., "label": ...}``."""

    kind = "labels"
    takes_input = True

    def topics(self, dag: Dag) -> list[str]:
        return [input_topic(dag.name, self.name), node_topic(dag.name, self.name)]

    def build(self, rt: DagRuntime) -> None:
        _label_agent(rt, self)


# -- the worker side: the Faust agents of this kind -------------------------------------


def _label_agent(rt: DagRuntime, node: LabelSource) -> None:
    rt.input_agent(node, lambda e, now: label_from_raw(e.value, e.key, now), f"{node.name}-labels")
