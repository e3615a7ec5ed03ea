"""The source kind: an input topic any Kafka client writes JSON events to.

Its agent assigns each event its request id (or keeps the producer's) and places it by the
id in the partition it hashes to, on every topic downstream (``abdag.topics.packs``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from abdag.agents.nodes.base import Node
from abdag.topics import BadRecord, Event, input_topic, node_topic, request_from_raw

if TYPE_CHECKING:
    from abdag.agents.app import DagRuntime
    from abdag.agents.dag import Dag


@dataclass(eq=False)
class Source(Node):
    """An input topic that any Kafka client can write JSON events to."""

    example: dict[str, Any] | None = None
    sampler: Callable[[int, int], list[dict[str, Any]]] | None = None

    kind = "source"
    takes_input = True
    emits_events = True

    def topics(self, dag: Dag) -> list[str]:
        return [input_topic(dag.name, self.name), node_topic(dag.name, self.name)]

    def sample(self, dag: Dag) -> dict[str, Any] | None:
        """One event for the dry run: the ``example``, or the ``sampler``'s first."""
        if self.example is not None:
            return self.example
        if self.sampler is not None:
            try:
                return self.sampler(1, 0)[0]
            except Exception as exc:  # noqa: BLE001 - the user's sampler failed
                raise self.fail(dag, f"sampler failed: {type(exc).__name__}: {exc}") from exc
        return None

    def dry_run(self, dag: Dag, events: dict[str, Event | None]) -> Event | None:
        raw = self.sample(dag)
        if not raw:
            return None
        try:
            return request_from_raw(orjson.dumps(raw), None, time.time())
        except (BadRecord, TypeError) as exc:
            raise self.fail(dag, f"example event is not valid: {exc}") from exc

    def build(self, rt: DagRuntime) -> None:
        _source_agent(rt, self)


# -- the worker side: the Faust agents of this kind -------------------------------------


def _source_agent(rt: DagRuntime, node: Source) -> None:
    def read(e: Any, now: float) -> Event:
        m = e.message  # the record's place names it: read twice, it keeps its request id
        return request_from_raw(
            e.value, e.key, now, f"{m.topic}/{m.partition}/{m.offset}/{m.timestamp}"
        )

    rt.input_agent(node, read, f"{node.name}-source")
