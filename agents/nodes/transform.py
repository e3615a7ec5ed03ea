"""The transform kind: a function of one event's payload returning the new payload."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from abdag.agents.nodes.base import Node
from abdag.topics import BadRecord, Event, encode, event_from, node_topic

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

    def apply(self, ev: Event) -> Event:
        """``ev`` with the payload ``fn`` returns; BadRecord ``'transform error'`` when
        ``fn`` raises or returns something that is not a dict (the worker and the dry run
        alike)."""
        try:
            payload = self.fn(ev.payload)
        except Exception as exc:  # noqa: BLE001 - the user's function failed
            raise BadRecord(
                "transform error", f"{type(exc).__name__}: {exc}", ev.request_id
            ) from exc
        if not isinstance(payload, dict):
            why = f"returned {type(payload).__name__}, not a dict"
            raise BadRecord("transform error", why, ev.request_id)
        ev.payload = payload
        return ev

    def dry_run(self, dag: Dag, events: dict[str, Event | None]) -> Event | None:
        ev = events.get(self.inputs[0])
        if ev is None:
            return None
        sample = Event(ev.request_id, ev.ts, dict(ev.payload), dict(ev.outputs))
        try:
            return self.apply(sample)
        except BadRecord as err:
            raise self.fail(dag, f"fn failed on the sample event: {err.detail}") from None

    def build(self, rt: DagRuntime) -> None:
        _transform_agent(rt, self)


# -- the worker side: the Faust agents of this kind -------------------------------------


def _transform_agent(rt: DagRuntime, node: Transform) -> None:
    from abdag.agents.app import TAKE_MAX, TAKE_WITHIN
    from abdag.agents.faust_compat import Batches

    (upstream,) = node.inputs
    out = node_topic(rt.dag.name, node.name)

    @rt.app.agent(rt.topic(node_topic(rt.dag.name, upstream)), name=node.name)
    async def transform(stream):
        async for events in Batches(stream, TAKE_MAX, TAKE_WITHIN):
            ready = []
            for e in events:
                for record in await rt.records(node.name, e):
                    try:
                        ev = node.apply(event_from(record.body))
                    except BadRecord as err:
                        await rt.dead(node.name, err, e, record)
                        continue
                    ready.append((e.message.partition, encode(ev), record.headers))
            await rt.send_packed(out, ready)
