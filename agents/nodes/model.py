"""The model kind: a PyTorch model run in micro-batches on the events of its input.

Each event carries every upstream node's output (``event.outputs``), so models can feed
models; the prediction is added under the node's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from abdag.agents.nodes.base import Node
from abdag.topics import Event, Prediction, fields_of

if TYPE_CHECKING:
    from abdag.agents.app import DagRuntime
    from abdag.agents.dag import Dag

OUTPUTS = ("sigmoid", "probability", "softmax", "value", "raw")


@dataclass(eq=False)
class ModelNode(Node):
    """A PyTorch model run in micro-batches on the events of its input(s)."""

    path: str = ""
    build_input: Callable[[Event], Any] | None = None
    output: str = "sigmoid"
    model_class: str | None = None
    model_kwargs: dict[str, Any] | None = None
    device: str = "auto"
    max_batch: int = 64
    max_wait: float = 0.01
    threshold: float = 0.5
    reload_interval: float = 5.0
    replaces: str | None = None  # set on shadow copies: which node this one stands in for

    kind = "model"
    emits_events = True
    shadowable = True

    def check(self, dag: Dag) -> None:
        self.check_one_event_input(dag)
        if self.output not in OUTPUTS:
            raise self.fail(dag, f"output must be one of {OUTPUTS}, got {self.output!r}")
        if not callable(self.build_input):
            raise self.fail(dag, "inputs must be a function of an event returning a tensor")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise self.fail(dag, f"max_batch must be a positive integer, got {self.max_batch!r}")
        if not self.max_wait > 0:
            raise self.fail(dag, f"max_wait must be > 0 seconds, got {self.max_wait!r}")

    def dry_run(self, dag: Dag, events: dict[str, Event | None]) -> Event | None:
        """Load the model (on CPU) and run it on the sample event, if there is one."""
        from abdag.agents.model_source import resolve
        from abdag.models import BatchRunner, ModelError, load_model

        try:
            src = resolve(self)
            model = load_model(
                src.path,
                name=self.name,
                device="cpu",
                model_class=src.model_class,
                model_kwargs=src.model_kwargs,
            )
        except ModelError as exc:
            raise self.fail(dag, f"model does not load: {exc}") from exc
        ev = events.get(self.inputs[0])
        if ev is None:
            return None
        try:
            x = self.build_input(ev)
        except Exception as exc:  # noqa: BLE001 - the user's input builder failed
            why = f"inputs() failed on the sample event: {type(exc).__name__}: {exc}"
            raise self.fail(dag, why) from exc
        (res,) = BatchRunner(model, None, self.output, threshold=self.threshold).run([x])
        if not res.ok:
            raise self.fail(dag, f"the model refused the sample input: {res.reason}")
        pred = Prediction(
            self.name, model.version, res.output, res.score, res.label, 0.0, "", 1, 0.0
        )
        return Event(ev.request_id, ev.ts, ev.payload, {**ev.outputs, self.name: fields_of(pred)})

    def build(self, rt: DagRuntime) -> None:
        from abdag.agents.app import _model_agent

        _model_agent(rt, self)
