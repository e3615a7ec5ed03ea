"""The label-source kind: an input topic of ground truth, ``{"request_id": ..., "label": ...}``.

Its agent checks that each label names a request and is a number, and places it by the
request id like the source does, so a label meets its request's predictions in the same
partition of the comparison (which checks the label against its task).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from abdag.agents.nodes.base import Node
from abdag.topics import BadRecord, encode, input_topic, label_from_raw, node_topic

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
    from abdag.agents.app import INPUT_BUFFER, TAKE_MAX, TAKE_WITHIN
    from abdag.agents.faust_compat import Batches

    out = node_topic(rt.dag.name, node.name)

    inputs = rt.topic(input_topic(rt.dag.name, node.name), buffer=INPUT_BUFFER)

    @rt.app.agent(inputs, name=f"{node.name}-labels")
    async def labels(stream):
        async for events in Batches(stream, TAKE_MAX, TAKE_WITHIN):
            now = time.time()
            ready = []
            for e in events:
                try:
                    lab = label_from_raw(e.value, e.key, now)
                except BadRecord as err:
                    await rt.dead(node.name, err, e)
                    continue
                ready.append((rt.partition_of(lab.request_id), encode(lab), e.headers))
            await rt.send_packed(out, ready)
