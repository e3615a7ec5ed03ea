"""Checking a DAG before anything runs.

Structure (cycles, unknown inputs, node kinds, options) is checked first; then every model
is loaded and the DAG is dry-run on one sample event per source (the source's ``example``
or the first event of its ``sampler``), so an input builder that makes the wrong shape or
dtype fails here, naming the node and the file, instead of in a worker at 3 am.
"""

from __future__ import annotations

import time

import orjson

from abdag.agents.dag import (
    OUTPUTS,
    TASKS,
    Comparison,
    Dag,
    LabelSource,
    ModelNode,
    Node,
    Source,
    Transform,
)
from abdag.agents.errors import DagError
from abdag.topics import BadRecord, Event, Prediction, fields_of, request_from_raw


def validate(dag: Dag, *, load_models: bool = True) -> None:
    """Raise :class:`DagError` for the first problem found."""
    order = dag.topological()
    if not dag.nodes:
        raise DagError("the DAG has no nodes", file=dag.file)
    for node in order:
        _check_node(dag, node)
    if load_models:
        _dry_run(dag, order)


def _fail(dag: Dag, node: Node, message: str) -> DagError:
    return DagError(message, node=node.name, file=dag.file)


def _check_node(dag: Dag, node: Node) -> None:
    kinds = {n: type(dag.nodes[n]) for n in node.inputs}
    if isinstance(node, Transform | ModelNode):
        if len(node.inputs) != 1:
            raise _fail(
                dag,
                node,
                f"takes {len(node.inputs)} inputs; a node reads one upstream node (chain "
                "nodes: each event carries every upstream output in event.outputs)",
            )
        if kinds[node.inputs[0]] in (LabelSource, Comparison):
            raise _fail(dag, node, f"cannot read {node.inputs[0]!r}: it is not an event stream")
    if isinstance(node, Transform) and not callable(node.fn):
        raise _fail(dag, node, "fn must be callable")
    if isinstance(node, ModelNode):
        if node.output not in OUTPUTS:
            raise _fail(dag, node, f"output must be one of {OUTPUTS}, got {node.output!r}")
        if not callable(node.build_input):
            raise _fail(dag, node, "inputs must be a function of an event returning a tensor")
        if not isinstance(node.max_batch, int) or node.max_batch < 1:
            raise _fail(dag, node, f"max_batch must be a positive integer, got {node.max_batch!r}")
        if not node.max_wait > 0:
            raise _fail(dag, node, f"max_wait must be > 0 seconds, got {node.max_wait!r}")
    if isinstance(node, Comparison):
        if node.a == node.b:
            raise _fail(dag, node, "a and b are the same node")
        for side in (node.a, node.b):
            if not isinstance(dag.nodes[side], ModelNode):
                raise _fail(dag, node, f"{side!r} is not a model node")
        if node.labels and not isinstance(dag.nodes[node.labels], LabelSource):
            raise _fail(dag, node, f"labels {node.labels!r} is not a label source (dag.labels)")
        if node.task not in TASKS:
            raise _fail(dag, node, f"task must be one of {TASKS}, got {node.task!r}")
        if node.metrics is not None:
            from abdag.comparators.metric_specs import specs_for

            try:
                specs_for(node.task, node.metrics)
            except ValueError as exc:
                raise _fail(dag, node, str(exc)) from None
        if not (node.join_timeout > 0 and node.label_timeout > 0):
            raise _fail(dag, node, "join_timeout and label_timeout must be > 0 seconds")
        if node.mode not in ("shadow", "split"):
            raise _fail(dag, node, f"mode must be 'shadow' or 'split', got {node.mode!r}")
        if not 0.0 <= node.split <= 1.0:
            raise _fail(dag, node, f"split must be a share in [0, 1], got {node.split!r}")
        if node.margin < 0:
            raise _fail(dag, node, f"margin must be >= 0, got {node.margin}")
        expected = {
            "binary": ("sigmoid", "probability"),
            "multiclass": ("softmax",),
            "regression": ("value",),
        }
        for side in (node.a, node.b):
            out = dag.nodes[side].output
            if out not in expected[node.task]:
                raise _fail(
                    dag,
                    node,
                    f"task {node.task!r} needs {side!r} to output one of "
                    f"{expected[node.task]}, it outputs {out!r}",
                )


def _sample(dag: Dag, source: Source) -> dict | None:
    if source.example is not None:
        return source.example
    if source.sampler is not None:
        try:
            return source.sampler(1, 0)[0]
        except Exception as exc:  # noqa: BLE001
            raise _fail(dag, source, f"sampler failed: {type(exc).__name__}: {exc}") from exc
    return None


def _dry_run(dag: Dag, order: list[Node]) -> None:
    from abdag.agents.model_source import resolve
    from abdag.models import BatchRunner, ModelError, load_model

    events: dict[str, Event | None] = {}
    for node in order:
        if isinstance(node, Source):
            raw = _sample(dag, node)
            try:
                events[node.name] = (
                    request_from_raw(orjson.dumps(raw), None, time.time()) if raw else None
                )
            except (BadRecord, TypeError) as exc:
                raise _fail(dag, node, f"example event is not valid: {exc}") from exc
        elif isinstance(node, Transform):
            ev = events.get(node.inputs[0])
            if ev is not None:
                try:
                    ev = Event(ev.request_id, ev.ts, node.fn(dict(ev.payload)), dict(ev.outputs))
                except Exception as exc:  # noqa: BLE001
                    raise _fail(dag, node, f"fn failed on the sample event: {exc}") from exc
            events[node.name] = ev
        elif isinstance(node, ModelNode):
            try:
                src = resolve(node)
                model = load_model(
                    src.path,
                    name=node.name,
                    device="cpu",
                    model_class=src.model_class,
                    model_kwargs=src.model_kwargs,
                )
            except ModelError as exc:
                raise _fail(dag, node, f"model does not load: {exc}") from exc
            ev = events.get(node.inputs[0])
            if ev is None:
                events[node.name] = None
                continue
            try:
                x = node.build_input(ev)
            except Exception as exc:  # noqa: BLE001
                raise _fail(
                    dag, node, f"inputs() failed on the sample event: {type(exc).__name__}: {exc}"
                ) from exc
            (res,) = BatchRunner(model, None, node.output, threshold=node.threshold).run([x])
            if not res.ok:
                raise _fail(dag, node, f"the model refused the sample input: {res.reason}")
            pred = Prediction(
                node.name, model.version, res.output, res.score, res.label, 0.0, "", 1, 0.0
            )
            events[node.name] = Event(
                ev.request_id, ev.ts, ev.payload, {**ev.outputs, node.name: fields_of(pred)}
            )
