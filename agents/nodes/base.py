"""The interface every node kind implements, and the registry of kinds.

A kind is one module of this package: its dataclass (what a DAG file declares with
``dag.source(...)``, ``dag.model(...)``, ...), the topics it writes, its checks, its dry run
on a sample event, and the Faust agents it builds. The DAG (``abdag.agents.dag``), its
validation, its topics and the worker (``abdag.agents.app``) only call this interface, so
adding a kind touches one new module (plus, for a ``dag.<kind>(...)`` shortcut, one method
of :class:`~abdag.agents.dag.Dag`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from abdag.agents.errors import DagError
from abdag.topics import Event, node_topic

if TYPE_CHECKING:
    from abdag.agents.app import DagRuntime
    from abdag.agents.dag import Dag

KINDS: dict[str, type[Node]] = {}
"""Every node kind by name, filled as the kinds' modules define them."""


@dataclass(eq=False)
class Node:
    """A node of a DAG: a name, the nodes it reads, and what its kind does with them."""

    name: str
    inputs: tuple[str, ...]

    kind: ClassVar[str] = ""
    takes_input: ClassVar[bool] = False  # has an input topic that any Kafka client writes
    emits_events: ClassVar[bool] = False  # its topic carries events other nodes may read
    shadowable: ClassVar[bool] = False  # dag.shadow may copy it onto another branch
    writes_pairs: ClassVar[bool] = False  # needs the DAG's pair-row and snapshot topics

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):
            KINDS[cls.kind] = cls

    def topics(self, dag: Dag) -> list[str]:
        """The topics this node writes (``abdag topics`` creates them)."""
        return [node_topic(dag.name, self.name)]

    def check(self, dag: Dag) -> None:
        """Raise :class:`DagError` for what is wrong with this node in ``dag``."""

    def dry_run(self, dag: Dag, events: dict[str, Event | None]) -> Event | None:
        """The sample event this node would send on, given its inputs' (None: none)."""
        return None

    def build(self, rt: DagRuntime) -> None:
        """Register this node's Faust agents on the worker's app."""
        raise NotImplementedError(f"node kind {self.kind!r} builds no agent")

    # -- helpers for the kinds --------------------------------------------------------------
    def fail(self, dag: Dag, message: str) -> DagError:
        """A DagError naming this node and the DAG file."""
        return DagError(message, node=self.name, file=dag.file)

    def check_one_event_input(self, dag: Dag) -> None:
        """For kinds that read one upstream event stream."""
        if len(self.inputs) != 1:
            raise self.fail(
                dag,
                f"takes {len(self.inputs)} inputs; a node reads one upstream node (chain "
                "nodes: each event carries every upstream output in event.outputs)",
            )
        (upstream,) = self.inputs
        if not dag.nodes[upstream].emits_events:
            raise self.fail(dag, f"cannot read {upstream!r}: it is not an event stream")
