"""The transform kind: a function of one event's payload returning the new payload."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from abdag.agents.nodes.base import Node
from abdag.topics import Event

if TYPE_CHECKING:
    from abdag.agents.app import DagRuntime
    from abdag.agents.dag import Dag


@dataclass(eq=False)
class Transform(Node):
    """A function of one event's payload returning the new payload."""

    fn: Callable[[dict[str, Any]], dict[str, Any]] = field(default=lambda p: p)

    kind = "transform"
    emits_events = True
    shadowable = True

    def check(self, dag: Dag) -> None:
        self.check_one_event_input(dag)
        if not callable(self.fn):
            raise self.fail(dag, "fn must be callable")

    def dry_run(self, dag: Dag, events: dict[str, Event | None]) -> Event | None:
        ev = events.get(self.inputs[0])
        if ev is None:
            return None
        try:
            payload = self.fn(dict(ev.payload))
        except Exception as exc:  # noqa: BLE001 - the user's function failed
            raise self.fail(dag, f"fn failed on the sample event: {exc}") from exc
        return Event(ev.request_id, ev.ts, payload, dict(ev.outputs))

    def build(self, rt: DagRuntime) -> None:
        from abdag.agents.app import _transform_agent

        _transform_agent(rt, self)
