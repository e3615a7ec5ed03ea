"""The comparison kind (the signal comparison node): A against B on the same requests.

It joins A's and B's outputs by request id, attaches the label whenever it comes, keeps the
live metrics and writes one pair row per request (``abdag.comparators.comparison``); its
served answers go to ``abdag.<dag>.<comparison>.served``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from abdag.agents.nodes.base import Node
from abdag.comparators.tasks import TASKS
from abdag.topics import served_topic

if TYPE_CHECKING:
    from abdag.agents.app import DagRuntime
    from abdag.agents.dag import Dag

OUTPUTS_OF_TASK = {
    "binary": ("sigmoid", "probability"),
    "multiclass": ("softmax",),
    "regression": ("value",),
}
"""What a model must output for each task (``abdag.agents.nodes.model.OUTPUTS``)."""


@dataclass(eq=False)
class Comparison(Node):
    """The signal comparison node: A against B on the same requests, with labels if any."""

    a: str = ""
    b: str = ""
    labels: str | None = None
    task: str = "binary"
    metrics: list[str] | None = None
    join_timeout: float = 30.0
    label_timeout: float = 3600.0
    margin: float = 0.0
    snapshot_every: int = 1000
    snapshot_interval: float = 5.0
    mode: str = "shadow"  # 'shadow' | 'split': who serves, see abdag.comparators.decisions
    split: float = 0.0
    group: str = ""  # champion-and-challengers group this comparison belongs to
    group_size: int = 1

    kind = "comparison"
    writes_pairs = True

    def ticks_topic(self, dag_name: str) -> str:
        """Where the node's expiry ticks travel to the owner of a request's partition."""
        return f"abdag.{dag_name}.{self.name}.ticks"

    def topics(self, dag: Dag) -> list[str]:
        return [self.ticks_topic(dag.name), served_topic(dag.name, self.name)]

    def check(self, dag: Dag) -> None:
        if self.a == self.b:
            raise self.fail(dag, "a and b are the same node")
        for side in (self.a, self.b):
            if dag.nodes[side].kind != "model":
                raise self.fail(dag, f"{side!r} is not a model node")
        if self.labels and dag.nodes[self.labels].kind != "labels":
            raise self.fail(dag, f"labels {self.labels!r} is not a label source (dag.labels)")
        if self.task not in TASKS:
            raise self.fail(dag, f"task must be one of {TASKS}, got {self.task!r}")
        if self.metrics is not None:
            from abdag.comparators.metric_specs import specs_for

            try:
                specs_for(self.task, self.metrics)
            except ValueError as exc:
                raise self.fail(dag, str(exc)) from None
        if not (self.join_timeout > 0 and self.label_timeout > 0):
            raise self.fail(dag, "join_timeout and label_timeout must be > 0 seconds")
        if self.mode not in ("shadow", "split"):
            raise self.fail(dag, f"mode must be 'shadow' or 'split', got {self.mode!r}")
        if not 0.0 <= self.split <= 1.0:
            raise self.fail(dag, f"split must be a share in [0, 1], got {self.split!r}")
        if self.margin < 0:
            raise self.fail(dag, f"margin must be >= 0, got {self.margin}")
        expected = OUTPUTS_OF_TASK[self.task]
        for side in (self.a, self.b):
            out = dag.nodes[side].output
            if out not in expected:
                raise self.fail(
                    dag,
                    f"task {self.task!r} needs {side!r} to output one of {expected}, it "
                    f"outputs {out!r}",
                )

    def build(self, rt: DagRuntime) -> None:
        from abdag.agents.app import _comparison_agents

        _comparison_agents(rt, self)
