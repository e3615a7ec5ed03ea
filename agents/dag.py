"""The DAG API: a serving graph of sources, transforms, model nodes and comparisons.

A DAG file reads in a few lines::

    dag = Dag("fraud")
    tx = dag.source("transactions")
    a = dag.model("fraud_a", tx, path="fraud_a.pt", inputs=features, output="sigmoid")
    b = dag.model("fraud_b", tx, path="fraud_b.pt", inputs=features, output="sigmoid")
    dag.compare("a_vs_b", a=a, b=b, labels=dag.labels("chargebacks"), task="binary")

Each node becomes one Faust agent (see :mod:`abdag.agents.app`) consuming its input's topic and
publishing to its own, keyed by request id. Nothing runs until the DAG passed
``abdag.agents.validate.validate``.

>>> dag = Dag("demo")
>>> src = dag.source("events")
>>> up = dag.transform("upper", src, lambda p: {"text": p["text"].upper()})
>>> tuple(n.name for n in dag.topological())
('events', 'upper')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from abdag.agents.errors import DagError
from abdag.agents.nodes import (  # noqa: F401 - the kinds, importable from here as well
    KINDS,
    OUTPUTS,
    Comparison,
    LabelSource,
    ModelNode,
    Node,
    Source,
    Transform,
)
from abdag.comparators.policy import Policy  # noqa: F401 - dag.compare(policy=...)
from abdag.comparators.tasks import TASKS  # noqa: F401 - declared once there, read here too
from abdag.topics import Event, check_name


def _reading_copies(build: Callable[[Event], Any], copies: dict[str, str]):
    """Wrap an input builder so ``event.outputs[<original>]`` reads the B-branch copy.

    The user's function was written for A's branch (``event.outputs["embed"]``); on B's
    branch the same function must see ``embed_v2``'s output under that name.
    """

    def build_on_copy(event: Event) -> Any:
        outputs = dict(event.outputs)
        for original, copy in copies.items():
            if copy != original and copy in outputs:
                outputs[original] = outputs[copy]
        return build(Event(event.request_id, event.ts, event.payload, outputs))

    return build_on_copy


class Dag:
    """A named graph of nodes; topics are named ``abdag.<dag>.<node>``."""

    def __init__(self, name: str, *, partitions: int = 4, file: str | None = None) -> None:
        self.name = check_name("DAG", name)
        if not isinstance(partitions, int) or partitions < 1:
            raise DagError(f"partitions must be a positive integer, got {partitions!r}", file=file)
        self.partitions = partitions
        self.file = file
        self.nodes: dict[str, Node] = {}

    # -- building -------------------------------------------------------------------------
    def add(self, node: Node) -> Node:
        """Add a node of any kind (``abdag.agents.nodes``); the methods below are shortcuts."""
        return self._add(node)

    def _add(self, node: Node) -> Node:
        try:
            check_name("node", node.name)
        except ValueError as exc:
            raise DagError(str(exc), node=str(node.name), file=self.file) from None
        if node.name in self.nodes:
            raise DagError("duplicate node name", node=node.name, file=self.file)
        self.nodes[node.name] = node
        return node

    @staticmethod
    def _names(inputs: Node | str | Sequence[Node | str]) -> tuple[str, ...]:
        if isinstance(inputs, Node | str):
            inputs = [inputs]
        return tuple(i.name if isinstance(i, Node) else str(i) for i in inputs)

    def source(
        self,
        name: str,
        *,
        example: dict[str, Any] | None = None,
        sampler: Callable[[int, int], list[dict[str, Any]]] | None = None,
    ) -> Source:
        """An input. ``sampler(n, seed)`` makes synthetic events for ``abdag produce``."""
        return self._add(Source(name, (), example=example, sampler=sampler))

    def labels(self, name: str) -> LabelSource:
        return self._add(LabelSource(name, ()))

    def transform(
        self, name: str, input: Node | str, fn: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> Transform:
        return self._add(Transform(name, self._names(input), fn=fn))

    def model(
        self,
        name: str,
        input: Node | str | Sequence[Node | str],
        *,
        path: str,
        inputs: Callable[[Event], Any],
        output: str = "sigmoid",
        model_class: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: str = "auto",
        max_batch: int = 64,
        max_wait: float = 0.01,
        threshold: float = 0.5,
        reload_interval: float = 5.0,
    ) -> ModelNode:
        """A model node. ``inputs(event)`` builds one example's tensor (or tuple of tensors)
        from the event's payload and upstream outputs; ``output`` says how to read the
        model's answer (one of sigmoid, probability, softmax, value, raw). ``path`` is a
        model file or ``registry:NAME[@vN]``; without a pinned version the node follows the
        registry's newest version, checked every ``reload_interval`` seconds."""
        return self._add(
            ModelNode(
                name,
                self._names(input),
                path=path,
                build_input=inputs,
                output=output,
                model_class=model_class,
                model_kwargs=model_kwargs,
                device=device,
                max_batch=max_batch,
                max_wait=max_wait,
                threshold=threshold,
                reload_interval=reload_interval,
            )
        )

    def compare(
        self,
        name: str,
        *,
        a: Node | str,
        b: Node | str | Sequence[Node | str],
        labels: Node | str | None = None,
        task: str = "binary",
        metrics: list[str] | None = None,
        join_timeout: float = 30.0,
        label_timeout: float = 3600.0,
        margin: float = 0.0,
        snapshot_every: int = 1000,
        snapshot_interval: float = 5.0,
        mode: str = "shadow",
        split: float = 0.0,
        mirror: float | dict[Node | str, float] = 1.0,
        segments: list[str | dict[str, Callable[[dict[str, Any]], Any]]]
        | dict[str, Callable[[dict[str, Any]], Any]]
        | None = None,
        policy: Policy | None = None,
    ) -> Comparison | list[Comparison]:
        """Compare two model nodes' outputs on the same requests (see comparators/).

        The served answer goes to ``abdag.<dag>.<name>.served``: A's in ``mode="shadow"``;
        in ``mode="split"`` a stable ``split`` share of requests is served by B. Both
        models score every request either way, so the comparison stays paired.

        ``mirror`` (shadow mode): B scores only a stable share of the requests, in (0, 1]
        (a hash of the request id, independent of the split's): its model node skips the
        others, and they are served by A and not compared (no pair row). A float applies
        to every challenger, a dict ``{challenger: share}`` to those it names (the others:
        1.0). A mirrored challenger must feed nothing but its comparison.

        ``b`` may be a list of challengers: each is compared with the champion ``a`` in a
        comparison named ``<name>__<challenger>``, and their verdicts share ``alpha``
        (Bonferroni) so that running several challengers does not inflate false wins.

        ``segments`` names payload fields (``["country", "device"]``) and bucketed features
        (``{"amount_bucket": fn}``, ``fn(payload) -> str``) whose value every pair row
        records; the report compares A and B within each value (Benjamini-Hochberg over
        segments, metrics and challengers).

        ``policy`` (:class:`abdag.comparators.policy.Policy`): when B is promoted or pulled
        back automatically (verdict held long enough, B worse, a guardrail tripped); it is
        recorded in the ``experiments`` table, and each challenger gets it.
        """
        (a_name,) = self._names(a)
        challengers = self._names(b)
        label_name = self._names(labels)[0] if labels is not None else None
        group = name if not isinstance(b, Node | str) else ""
        mirrors = self._mirrors(name, mirror, challengers)
        made = []
        for b_name in challengers:
            inputs = (a_name, b_name) + ((label_name,) if label_name else ())
            made.append(
                self._add(
                    Comparison(
                        f"{name}__{b_name}" if group else name,
                        inputs,
                        a=a_name,
                        b=b_name,
                        labels=label_name,
                        task=task,
                        metrics=metrics,
                        join_timeout=join_timeout,
                        label_timeout=label_timeout,
                        margin=margin,
                        snapshot_every=snapshot_every,
                        snapshot_interval=snapshot_interval,
                        mode=mode,
                        split=split,
                        mirror=mirrors[b_name],
                        group=group,
                        group_size=len(challengers) if group else 1,
                        segments=segments,
                        policy=policy,
                    )
                )
            )
        return made if group else made[0]

    def _mirrors(self, name: str, mirror: Any, challengers: tuple[str, ...]) -> dict[str, Any]:
        """``dag.compare(mirror=...)`` per challenger: a dict names some (the others 1.0),
        anything else applies to all (its value is checked with the comparison)."""
        if not isinstance(mirror, dict):
            return dict.fromkeys(challengers, mirror)
        shares = {self._names(k)[0]: v for k, v in mirror.items()}
        unknown = sorted(set(shares) - set(challengers))
        if unknown:
            raise DagError(
                f"mirror names {unknown}, which are not challengers (b) of this comparison",
                node=name,
                file=self.file,
            )
        return {c: shares.get(c, 1.0) for c in challengers}

    def shadow(self, node: Node | str, *, replace: dict[Node | str, Node | str]) -> Node:
        """B's branch of ``node``: a copy of it, and of everything between it and the
        replaced node(s), that reads B's outputs instead of A's.

        Use it to compare at depth: when a new embedding model replaces an old one, the
        ranker downstream must run again on the new embeddings before the final outputs can
        be compared. Copies are named ``<name>__<replacement>``.
        """
        target = self._names(node)[0]
        swaps = {self._names(k)[0]: self._names(v)[0] for k, v in replace.items()}
        for old, new in swaps.items():
            for n in (old, new, target):
                if n not in self.nodes:
                    raise DagError("shadow refers to an unknown node", node=n, file=self.file)
        tag = "__".join(sorted(swaps.values()))
        copies: dict[str, str] = dict(swaps)

        def copy_of(name: str) -> str:
            if name in copies:
                return copies[name]
            original = self.nodes[name]
            new_inputs = tuple(copy_of(i) for i in original.inputs)
            if new_inputs == original.inputs:
                copies[name] = name  # does not depend on a replaced node: share it
                return name
            if not original.shadowable:
                raise DagError("only model and transform nodes can be shadowed", node=name)
            clone = type(original)(**{**original.__dict__, "name": f"{name}__{tag}"})
            clone.inputs = new_inputs
            if isinstance(clone, ModelNode):  # its input builder reads the copies' outputs
                clone.replaces = name
                clone.build_input = _reading_copies(original.build_input, copies)
            self._add(clone)
            copies[name] = clone.name
            return clone.name

        result = copy_of(target)
        if result == target:
            raise DagError(
                "shadow: the node does not depend on any replaced node", node=target, file=self.file
            )
        return self.nodes[result]

    # -- reading --------------------------------------------------------------------------
    def topological(self) -> list[Node]:
        """Nodes in dependency order; raises DagError on a cycle or an unknown input."""
        order: list[Node] = []
        state: dict[str, int] = {}

        def visit(name: str, path: tuple[str, ...]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = " -> ".join(path[path.index(name) :] + (name,))
                raise DagError(f"cycle: {cycle}", node=name, file=self.file)
            state[name] = 1
            for inp in self.nodes[name].inputs:
                if inp not in self.nodes:
                    raise DagError(f"unknown input {inp!r}", node=name, file=self.file)
                visit(inp, path + (name,))
            state[name] = 2
            order.append(self.nodes[name])

        for name in self.nodes:
            visit(name, ())
        return order

    def of_kind(self, cls: type[Node]) -> list[Node]:
        return [n for n in self.topological() if isinstance(n, cls)]

    def root_source(self, name: str) -> Source | None:
        """The source a node's events come from (first input chain)."""
        node = self.nodes[name]
        while not isinstance(node, Source):
            if not node.inputs:
                return None
            node = self.nodes[node.inputs[0]]
        return node
