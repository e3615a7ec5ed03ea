"""The model kind: a PyTorch model run in micro-batches on the events of its input.

Each event carries every upstream node's output (``event.outputs``), so models can feed
models; the prediction is added under the node's name.

A node declared ``output="sigmoid"`` whose model returns probabilities already (it ends in
a sigmoid) would have every score squashed twice, silently: the dry run tells them apart on
the sample event and stretched copies of its input (:mod:`abdag.models.probes`), and
``abdag topics`` / ``abdag worker`` print :func:`sigmoid_twice_warning`'s line; without a
sample event the worker watches the node's first requests (:class:`SigmoidWatch`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abdag.agents.nodes.base import Node
from abdag.settings import Settings
from abdag.topics import BadRecord, Event, Prediction, encode, event_from, fields_of, node_topic
from abdag.topics.packs import Packed

log = logging.getLogger("abdag.worker")

if TYPE_CHECKING:
    from abdag.agents.app import DagRuntime
    from abdag.agents.dag import Dag

OUTPUTS = ("sigmoid", "probability", "softmax", "value", "raw")

FIRST_REQUESTS_CHECKED = 64
"""How many real requests a worker looks at, for a node declared ``output="sigmoid"``
whose dry run could not tell logits from probabilities (no sample event, or a model that
refused the stretched copies of its input), before warning that they are probabilities."""


def sigmoid_twice_warning(node: str, model_file: str | Path, seen: str) -> str:
    """The one line saying that node ``node`` reads a model that already returns
    probabilities through a sigmoid (``seen``: on what, e.g. "on its first 64 requests")."""
    return (
        f"node {node}: model {model_file} returns values in [0, 1] {seen}, as a model "
        'ending in a sigmoid does, but the node declares output="sigmoid", which applies a '
        "sigmoid again (every score lands in [0.5, 0.73], every prediction is 1); declare "
        'output="probability" for it'
    )


_DRY_RUN_VERDICTS: weakref.WeakKeyDictionary[ModelNode, str | None] = weakref.WeakKeyDictionary()
"""What each sigmoid node's dry run found: the warning, or None when the outputs are logits;
no entry when the dry run could not tell (the worker then watches its first requests)."""


def output_warnings(dag: Dag) -> list[str]:
    """The warnings the dry run (:func:`abdag.agents.validate.validate`) found about the
    DAG's model nodes' ``output`` kinds, one line each."""
    nodes = [n for n in dag.topological() if isinstance(n, ModelNode)]
    return [w for n in nodes if (w := _DRY_RUN_VERDICTS.get(n))]


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
        if self.output == "sigmoid":
            self._check_logits(model, x, src.path)
        pred = Prediction(
            self.name, model.version, res.output, res.score, res.label, 0.0, "", 1, 0.0
        )
        return Event(ev.request_id, ev.ts, ev.payload, {**ev.outputs, self.name: fields_of(pred)})

    def _check_logits(self, model: Any, x: Any, model_file: Path) -> None:
        """Record whether the model returns logits, as ``output="sigmoid"`` says, judged on
        the sample input and stretched copies of it (:mod:`abdag.models.probes`)."""
        from abdag.models.probes import in_unit_interval, probe_inputs, raw_scores

        scores = raw_scores(model, [x, *probe_inputs(x)])
        if scores is None:  # a stretched copy was refused: the sample alone
            scores = raw_scores(model, [x]) or []
        if in_unit_interval(scores):
            seen = f"on the sample event and {len(scores) - 1} stretched copies of its input"
            _DRY_RUN_VERDICTS[self] = sigmoid_twice_warning(self.name, model_file, seen)
        elif any(not 0.0 <= v <= 1.0 for v in scores):
            _DRY_RUN_VERDICTS[self] = None
        else:
            _DRY_RUN_VERDICTS.pop(self, None)  # too few to tell: the worker watches

    def build(self, rt: DagRuntime) -> None:
        _model_agent(rt, self)


class SigmoidWatch:
    """Watches the first real scores of a node declared ``output="sigmoid"``: when the
    first :data:`FIRST_REQUESTS_CHECKED` all came from raw outputs in [0, 1] (scores in
    [0.5, sigmoid(1)]), the model returns probabilities already; :meth:`see` says so once."""

    def __init__(self, node: str, model_file: str | Path) -> None:
        self.node = node
        self.model_file = model_file
        self.seen = 0
        self.done = False

    def see(self, results: Sequence[Any]) -> str | None:
        """Look at one batch's results; the warning the first time it is due, else None."""
        from abdag.models.probes import SIGMOID_OF_1

        if self.done:
            return None
        for res in results:
            if not res.ok or not isinstance(res.output, float):
                continue
            if not 0.5 <= res.output <= SIGMOID_OF_1 + 1e-12:
                self.done = True  # a raw output outside [0, 1]: logits, as declared
                return None
            self.seen += 1
        if self.seen < FIRST_REQUESTS_CHECKED:
            return None
        self.done = True
        seen = f"on its first {self.seen} requests"
        return sigmoid_twice_warning(self.node, self.model_file, seen)


def mirror_share(dag: Dag, name: str) -> float:
    """The share of requests model node ``name`` scores: the largest ``mirror`` of the
    comparisons it is the challenger (b) of, and 1.0 (every request) when any other node
    reads it, a comparison that has it as A included (the DAG's check refuses a mirrored
    challenger that feeds anything else: ``Comparison._check_mirror``)."""
    shares = []
    for n in dag.nodes.values():
        if name not in n.inputs:
            continue
        if n.kind != "comparison" or getattr(n, "b", None) != name:
            return 1.0
        shares.append(float(n.mirror))
    return max(shares, default=1.0)


# -- the worker side: the Faust agents of this kind -------------------------------------


class ModelSlot:
    """The model a node runs now, swapped between batches when the registry has a newer one.

    A swap replaces one reference: the batch in flight finishes on the old model, the next
    runs on the new one, so no event is dropped and each prediction names its version.
    """

    def __init__(self, node: ModelNode, settings: Settings) -> None:
        self.node = node
        self.settings = settings
        # a sigmoid node the dry run could not judge has its first requests watched
        self.runner, self.version, self.watch = self._load(judged=node in _DRY_RUN_VERDICTS)

    def _load(self, *, judged: bool = False):
        """The runner, version and :class:`SigmoidWatch` (None: nothing to watch) of the
        model to serve now; ``judged``: the dry run has already checked this model."""
        from abdag.agents.model_source import resolve
        from abdag.models import BatchRunner, load_model

        src = resolve(self.node, self.settings)
        model = load_model(
            src.path,
            name=self.node.name,
            device=self.node.device,
            model_class=src.model_class,
            model_kwargs=src.model_kwargs,
        )
        runner = BatchRunner(model, None, self.node.output, threshold=self.node.threshold)
        watched = self.node.output == "sigmoid" and not judged
        watch = SigmoidWatch(self.node.name, src.path) if watched else None
        return runner, src.version or model.version, watch

    def reload_if_newer(self) -> bool:
        from abdag.agents.model_source import resolve

        try:
            if resolve(self.node, self.settings).version == self.version:
                return False
            runner, version, watch = self._load()
        except Exception as exc:  # noqa: BLE001 - keep serving the current model
            log.error(
                "node %s: new model version not loaded, keeping %s: %s",
                self.node.name,
                self.version,
                exc,
            )
            return False
        log.warning(
            "node %s: now serving model version %s (was %s)", self.node.name, version, self.version
        )
        self.runner, self.version, self.watch = runner, version, watch
        return True


def _model_agent(rt: DagRuntime, node: ModelNode) -> None:
    from abdag.agents.app import INLINE_BELOW_MS
    from abdag.agents.faust_compat import Batches
    from abdag.agents.model_source import resolve
    from abdag.comparators.decisions import mirrored

    (upstream,) = node.inputs
    out = node_topic(rt.dag.name, node.name)
    slot = ModelSlot(node, rt.settings)
    mirror = mirror_share(rt.dag, node.name)  # dag.compare(mirror=...): 1.0 = every request
    if mirror < 1.0:
        log.info("node %s: scores the mirrored %.4g%% of requests", node.name, 100 * mirror)

    def infer(inputs: list[Any]) -> tuple[list[Any], float, str]:
        runner, version, watch = slot.runner, slot.version, slot.watch  # one model a batch
        start = time.perf_counter()
        results = runner.run(inputs)
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        if watch is not None and (warning := watch.see(results)):
            log.warning("%s", warning)
        return results, elapsed_ms, version

    if resolve(node, rt.settings).follows_latest:

        @rt.app.timer(interval=node.reload_interval, name=f"{node.name}-reload")
        async def follow_registry() -> None:
            await rt.in_thread(slot.reload_if_newer)

    def decode(record: Packed) -> tuple[Event, Any] | None:
        """The event and the model's input; None for a request this node does not score
        (not mirrored: it sends nothing for it, so nothing downstream waits on it)."""
        ev = event_from(record.body)
        if mirror < 1.0 and not mirrored(ev.request_id, mirror):
            return None
        try:
            return ev, node.build_input(ev)
        except BadRecord:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's input builder failed
            raise BadRecord("bad input", f"{type(exc).__name__}: {exc}", ev.request_id) from exc

    async def publish(batches: Batches, events: list[Any], decoded: list, inferred: tuple) -> None:
        """Send an inferred batch on (the model's refusals to dead letters), then acknowledge
        it: only then may its offsets be committed."""
        results, latency_ms, version = inferred
        now = time.time()
        ready = []
        for (e, record, ev), res in zip(decoded, results, strict=True):
            if not res.ok:
                reason = res.reason or "model error"
                code = "model error" if reason.startswith("model") else "bad input"
                err = BadRecord(code, reason, ev.request_id)
                await rt.dead(node.name, err, e, record)
                continue
            ev.outputs[node.name] = fields_of(
                Prediction(
                    model=node.name,
                    version=version,
                    output=res.output,
                    score=res.score,
                    label=res.label,
                    latency_ms=latency_ms,
                    worker=rt.worker,
                    batch_size=len(decoded),
                    ts=now,
                )
            )
            ready.append((e.message.partition, encode(ev), record.headers))
        await rt.send_packed(out, ready)
        await batches.finish(events)

    inline = True  # the last batch was quick enough to infer on the event loop

    async def infer_batch(inputs: list[Any]) -> tuple[list[Any], float, str]:
        """Infer in the executor thread, so the event loop works meanwhile, unless the last
        batch took under INLINE_BELOW_MS: then the thread hop and the GIL hand-overs after
        each torch call cost more than they overlap, so the loop infers it itself. (The
        model ran on a sample event at start-up, so a slow one blocks the loop for one
        batch at most.)"""
        nonlocal inline
        inferred = infer(inputs) if inline else await rt.in_thread(infer, inputs)
        inline = inferred[1] < INLINE_BELOW_MS
        return inferred

    async def infer_in_order(batches: Batches, decoded_batches: asyncio.Queue) -> None:
        """Infer the decoded batches one after another, each sent on while the next infers.

        The next batch is already read and decoded when one finishes (the agent does that
        meanwhile), so the model is idle only when no events wait."""
        publishing: asyncio.Future | None = None
        try:
            while True:
                events, decoded, inputs = await decoded_batches.get()
                inferred = await infer_batch(inputs) if inputs else None
                if publishing is not None:
                    await publishing  # in order: batch k is out before batch k+1 is sent
                    publishing = None
                if inferred is None:
                    await batches.finish(events)
                else:
                    publishing = asyncio.ensure_future(publish(batches, events, decoded, inferred))
        finally:
            if publishing is not None and not publishing.done():
                publishing.cancel()  # unacknowledged: the batch is read again, not lost

    @rt.app.agent(rt.topic(node_topic(rt.dag.name, upstream)), name=node.name)
    async def model_node(stream):
        # Three batches overlap: this body reads and decodes batch k+2 while the executor
        # thread infers batch k+1 and batch k is sent on (a quick model infers on the loop:
        # see infer_batch). A batch is at most max_batch requests: the packs of one take
        # are cut into such batches, each sent on as soon as it is inferred; a pack is
        # acknowledged with the batch that holds its last request (batches go out in order).
        batches = Batches(stream, node.max_batch, node.max_wait, by_hand=True)
        decoded_batches: asyncio.Queue = asyncio.Queue(maxsize=1)
        inferring = asyncio.ensure_future(infer_in_order(batches, decoded_batches))
        try:
            async for events in batches:
                done: list[Any] = []  # packs whose every request is in a batch so far
                decoded: list[tuple[Any, Packed, Event]] = []
                inputs: list[Any] = []
                for e in events:
                    for record in await rt.records(node.name, e):
                        try:
                            got = decode(record)
                        except BadRecord as err:
                            await rt.dead(node.name, err, e, record)
                            continue
                        if got is None:  # not mirrored: not scored, nothing sent
                            continue
                        ev, x = got
                        decoded.append((e, record, ev))
                        inputs.append(x)
                        if len(inputs) >= node.max_batch:
                            batch = (done, decoded, inputs)
                            await _hand_over(decoded_batches, batch, inferring)
                            done, decoded, inputs = [], [], []
                    done.append(e)
                if done or inputs:
                    await _hand_over(decoded_batches, (done, decoded, inputs), inferring)
        finally:
            inferring.cancel()


async def _hand_over(queue: asyncio.Queue, item: Any, consumer: asyncio.Future) -> None:
    """Put ``item`` on ``queue``, waiting for room, unless ``consumer`` fails first: then
    raise its error here (a failed send must stop the agent, not leave it waiting)."""
    put = asyncio.ensure_future(queue.put(item))
    await asyncio.wait({put, consumer}, return_when=asyncio.FIRST_COMPLETED)
    if put.done():
        return
    put.cancel()
    if consumer.cancelled() or consumer.exception() is None:
        raise RuntimeError("the inference loop ended while events were waiting")
    raise consumer.exception()
