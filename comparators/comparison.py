"""The comparison node's logic, apart from Faust and Kafka: records and a clock in; pair
rows, served answers, metric snapshots and expiries out.

A worker's comparison agent only feeds it (``abdag.agents.app``): it decodes a batch of
Kafka events into :class:`Incoming` records, calls :meth:`ComparisonState.process`, and
sends the :class:`Outgoing` on. A test drives the same class with a dict for a store and a
number for a clock, no broker::

    >>> from abdag.agents.dag import Comparison
    >>> from abdag.topics.packs import Packed
    >>> from abdag.topics.records import Event, Label, Prediction, encode, fields_of
    >>> import orjson
    >>> spec = Comparison("ab", (), a="m_a", b="m_b", labels="y", task="binary")
    >>> state = ComparisonState(spec, {}, experiment="d.ab", worker="w")
    >>> def said(model, score):
    ...     p = Prediction(model, "v1", score, score, int(score >= 0.5), 1.0, "w", 1, 0.0)
    ...     ev = Event("r1", 0.0, {}, {model: fields_of(p)})
    ...     return Packed(orjson.loads(encode(ev)), None)
    >>> lab = Packed(orjson.loads(encode(Label("r1", 1.0, 2.0))), None)
    >>> out = state.process([Incoming(A, 0, [said("m_a", 0.9)]),
    ...                      Incoming(B, 0, [said("m_b", 0.4)])], now=1.0)
    >>> out.pairs["r1"][1]["status"], [a for _, a, _ in out.served]
    ('paired', [b'{"request_id":"r1","served_by":"a",...}'])
    >>> state.process([Incoming(LABEL, 0, [lab])], now=2.0).pairs["r1"][1]["stage"]
    3

Timeouts are the join's: :meth:`ComparisonState.ticks_due` names the requests whose
deadline passed (each once per :data:`TICK_RESEND_AFTER`), and the worker sends each a tick
on the node's ticks topic, which reaches the owner of the request's partition; that owner
expires it when the tick comes back in as an :class:`Incoming` of side :data:`TICK`. (An
expiry writes the join's table and may emit a row, so it must ride on a record read from
that partition, committed with what it sent, like any other input.)
:meth:`ComparisonState.next_check` says when to look again.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from abdag.comparators.decisions import mirrored, served_side
from abdag.comparators.join import Emitted, PairJoin
from abdag.comparators.rows import pair_row, snapshot_rows
from abdag.comparators.tasks import DEFAULT_THRESHOLD, check_label, task_spec
from abdag.topics.packs import Headers, Packed
from abdag.topics.records import BadRecord, event_from, fields_of, label_from

if TYPE_CHECKING:
    from abdag.agents.dag import Comparison
    from abdag.comparators.metrics import PairMetrics

__all__ = [
    "A",
    "B",
    "EXPIRY_CHECK_EVERY",
    "LABEL",
    "TICK",
    "TICKS_PER_ROUND",
    "TICK_RESEND_AFTER",
    "ComparisonState",
    "Incoming",
    "Outgoing",
    "Refused",
]

A, B, LABEL, TICK = "a", "b", "label", "tick"

# A due request whose tick went out is not ticked again for this long: the tick is on its
# way to the partition's owner, which expires the request when it reads it. Sent again
# after this (a partition that moved, a tick lost with a broker).
TICK_RESEND_AFTER = 5.0
# At most this many ticks per look: a table recovered after a long stop may hold a backlog
# of due requests; it goes out over several looks, none holding the event loop for long.
TICKS_PER_ROUND = 5000
# The longest a worker waits between two looks at the deadlines, so the most an expiry fires
# after its deadline: a request can become due before any deadline the join knew at the
# last look (a side that joins a label which came long before; entries recovered from the
# changelog, which the join learns at its next rescan).
EXPIRY_CHECK_EVERY = 1.0


class Incoming(NamedTuple):
    """Records read together from one input of the node, in one partition.

    ``side``: :data:`A` or :data:`B` (events carrying that model's prediction), :data:`LABEL`
    (labels) or :data:`TICK` (each record's ``body`` is a request id to expire).
    ``records``: parsed JSON bodies with their headers (a pack's, ``abdag.topics.packs``).
    ``source``: the caller's handle on what it read (the worker's Kafka event), handed back
    with a refusal and to ``on_incoming``.
    """

    side: str
    partition: int
    records: Sequence[Packed]
    source: Any = None


class Refused(NamedTuple):
    """A record the comparison cannot use, with the reason (for a dead letter). A tick's
    record is the request id (``index`` -1: the letter keeps the whole tick record)."""

    error: BadRecord
    incoming: Incoming
    record: Packed


@dataclass
class Outgoing:
    """What one :meth:`ComparisonState.process` call sends on.

    ``pairs``: request id -> (partition, pairs row), the newest row of each request (a later
    stage in the same batch supersedes an earlier one). ``served``: (request id, answer as
    JSON, headers) for the requests' served answers. ``snapshots``: (partition, metric rows)
    due by count. ``refused``: the records not used, in the order read.
    """

    pairs: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    served: list[tuple[bytes, bytes, Headers]] = field(default_factory=list)
    snapshots: list[tuple[int, list[dict[str, Any]]]] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)


class ComparisonState:
    """One comparison node's join, serving choice, live metrics and snapshot cadence.

    ``spec``: the :class:`~abdag.agents.dag.Comparison` (a, b, task, metrics, timeouts,
    snapshot_every / snapshot_interval, mode, split, mirror: requests B does not mirror are
    served by A and neither joined nor counted, their labels not used). ``store``: the
    join's mapping (a dict in tests; the worker's changelogged table). ``thresholds``:
    models A's and B's ``ModelNode.threshold``. ``on_incoming``: called with each
    :class:`Incoming` before its records are handled, for a store that routes each write by
    what made it (the worker's ``JsonTable`` sends it to that event's partition).

    Metrics are per partition and in memory: a replay (a record read again after a crash or
    a rebalance) emits its row again and updates no metric. Serving follows :attr:`control`
    (promote / retire decisions, :meth:`serve`).
    """

    def __init__(
        self,
        spec: Comparison,
        store: MutableMapping[str, dict[str, Any]],
        *,
        experiment: str,
        worker: str,
        thresholds: tuple[float, float] = (DEFAULT_THRESHOLD, DEFAULT_THRESHOLD),
        on_incoming: Callable[[Incoming], None] | None = None,
        keep_done: float = 300.0,
        rescan_every: float = 30.0,
    ) -> None:
        # imported here: numpy and river load only where a comparison runs
        from abdag.comparators.metrics import PairMetrics
        from abdag.comparators.segments import segment_values

        self.spec, self.experiment, self.worker = spec, experiment, worker
        self.thresholds = thresholds
        self.on_incoming = on_incoming
        self.join = PairJoin(
            join_timeout=spec.join_timeout,
            label_timeout=spec.label_timeout,
            store=store,
            keep_done=keep_done,
            rescan_every=rescan_every,
        )
        # who serves; the worker's decisions follower updates this very dict
        self.control: dict[str, bool] = {"promoted": False, "retired": False}
        self.metrics: dict[int, PairMetrics] = {}  # partition -> live metrics
        self._new_metrics = PairMetrics
        self._models = {A: spec.a, B: spec.b}
        self._mirror = float(getattr(spec, "mirror", 1.0))  # share of requests B scores
        self._segments = spec.segment_specs()  # dag.compare(segments=...): (name, fn or None)
        self._segment_failed: set[str] = set()  # bucket functions that raised (logged once)
        self._values_of = segment_values
        self._since_snapshot: Counter[int] = Counter()  # counted updates since the last one
        self._last_snapshot: dict[int, float] = {}
        self._classes: int | None = None  # the models' number of classes, once a softmax is seen
        self._classes_out = task_spec(spec.task).classes
        self._ticked: dict[str, float] = {}  # request id -> when its tick was sent
        self._rescanned_at = -math.inf  # when join.due last rescanned the store

    # -- records in --------------------------------------------------------------------
    def process(self, batch: Iterable[Incoming], now: float | Callable[[], float]) -> Outgoing:
        """Handle a batch of records; never raises for a record's content (it is refused,
        in :attr:`Outgoing.refused`).

        ``now``: the time, or a clock read as each :class:`Incoming` is handled (the worker
        passes ``time.time``, so a row's ``paired_ts`` is when its pack was handled, not
        when a long batch began)."""
        out = Outgoing()
        on_incoming = self.on_incoming
        clock = now if callable(now) else None
        for incoming in batch:
            if on_incoming is not None:
                on_incoming(incoming)
            t = clock() if clock is not None else now
            side = incoming.side
            if side in (A, B):
                for record in incoming.records:
                    self._prediction(incoming, record, t, out)
            elif side == LABEL:
                for record in incoming.records:
                    self._label(incoming, record, t, out)
            elif side == TICK:
                for record in incoming.records:
                    self._expire(incoming, record, t, out)
            else:
                raise ValueError(f"unknown side {side!r}")
        return out

    def serve(self, *, promoted: bool, retired: bool = False) -> None:
        """Follow a decision: B serves once ``promoted``; a ``retired`` challenger serves
        no share of a split (``abdag.comparators.decisions.served_side``)."""
        self.control.update(promoted=promoted, retired=retired)

    def _prediction(self, incoming: Incoming, record: Packed, now: float, out: Outgoing) -> None:
        side, spec = incoming.side, self.spec
        try:
            ev = event_from(record.body)
            pred = fields_of(ev.prediction(self._models[side]))
            pred["request_ts"] = ev.ts
            if isinstance(pred["output"], list) and self._classes_out:
                self._classes = max(self._classes or 0, len(pred["output"]))
            if not self._compared(ev.request_id):
                # not mirrored (dag.compare(mirror=...)): B does not score it, so A answers
                # it, B promoted or not, and it is not joined: no pair row, no missing_b
                self._serve_unmirrored(incoming, record, ev.request_id, pred, out)
                return
            # this side answers the request: its served answer goes out below, and the join
            # records who served it, for the pairs rows' served_by (the SRM check reads it)
            serves = side == served_side(
                ev.request_id, mode=spec.mode, split=spec.split, **self.control
            )
            emitted = self.join.offer_prediction(
                side,
                ev.request_id,
                pred,
                now,
                ev.digest,
                served=serves,
                segments=self._segment_values(ev.payload) if self._segments else None,
            )
        except BadRecord as err:
            out.refused.append(Refused(err, incoming, record))
            return
        if serves:
            answer = {"request_id": ev.request_id, "served_by": side, **pred}
            out.served.append((ev.request_id.encode(), orjson.dumps(answer), record.headers))
        if emitted is not None:
            self._emitted(emitted, incoming.partition, now, out)

    def _compared(self, request_id: str) -> bool:
        """Whether B scores this request, so it is joined: every request unless
        ``spec.mirror`` < 1 (:func:`abdag.comparators.decisions.mirrored`)."""
        return self._mirror >= 1.0 or mirrored(request_id, self._mirror)

    def _serve_unmirrored(
        self, incoming: Incoming, record: Packed, request_id: str, pred: dict, out: Outgoing
    ) -> None:
        """A's answer to a request B does not mirror goes out as it is; a B record for one
        (a B node that mirrored more, during a redeploy) is not used."""
        if incoming.side == A:
            answer = {"request_id": request_id, "served_by": A, **pred}
            out.served.append((request_id.encode(), orjson.dumps(answer), record.headers))

    def _label(self, incoming: Incoming, record: Packed, now: float, out: Outgoing) -> None:
        try:
            lab = label_from(record.body)
            y = check_label(
                self.spec.task, lab.label, n_classes=self._classes, request_id=lab.request_id
            )
            if not self._compared(lab.request_id):
                return  # the label of a request B does not mirror: nothing to join it to
            emitted = self.join.offer_label(lab.request_id, y, lab.ts, now)
        except BadRecord as err:
            out.refused.append(Refused(err, incoming, record))
            return
        if emitted is not None:
            self._emitted(emitted, incoming.partition, now, out)

    def _expire(self, incoming: Incoming, record: Packed, now: float, out: Outgoing) -> None:
        request_id = record.body
        self._ticked.pop(request_id, None)  # its tick came back: expired (or not yet due)
        try:
            emitted = self.join.expire(request_id, now)
        except BadRecord as err:  # a label whose request never came
            out.refused.append(Refused(err, incoming, record))
            return
        if emitted is not None:
            self._emitted(emitted, incoming.partition, now, out)

    def _emitted(self, emitted: Emitted, partition: int, now: float, out: Outgoing) -> None:
        """The request's row; metrics for what is new (a replay counts nothing)."""
        out.pairs[emitted.request_id] = (
            partition,
            pair_row(self.experiment, self.spec, emitted, partition, self.worker, now),
        )
        if not (emitted.newly_paired or emitted.newly_labelled):
            return
        m = self.metrics.get(partition)
        if m is None:
            m = self.metrics[partition] = self._new_metrics(
                task=self.spec.task,
                metrics=self.spec.metrics,
                threshold_a=self.thresholds[0],
                threshold_b=self.thresholds[1],
            )
        a, b = emitted.a or {}, emitted.b or {}
        m.update(
            a.get("score"),
            a.get("label"),
            b.get("score"),
            b.get("label"),
            emitted.label,
            a.get("latency_ms"),
            b.get("latency_ms"),
            count_pair=emitted.newly_paired,
        )
        self._since_snapshot[partition] += 1
        if self._since_snapshot[partition] >= self.spec.snapshot_every:
            out.snapshots.append(self._snapshot(partition, now))

    # -- segments ----------------------------------------------------------------------
    def _segment_values(self, payload: Any) -> Callable[[], dict[str, str]]:
        """What makes the request's segment values (``dag.compare(segments=...)``) from the
        payload of A's or B's event: the join calls it once per request, with its first
        prediction, and keeps the values for every row (:mod:`abdag.comparators.segments`)."""
        values_of, specs, on_error = self._values_of, self._segments, self._segment_error
        return lambda: values_of(specs, payload, on_error=on_error)

    def _segment_error(self, name: str, exc: BaseException) -> None:
        """A bucket function that raised: its value is '' (missing); said once per name."""
        if name not in self._segment_failed:
            self._segment_failed.add(name)
            logging.getLogger("abdag.worker").warning(
                "comparison %s: segment %r failed (%s: %s); such requests get '' for it",
                self.spec.name,
                name,
                type(exc).__name__,
                exc,
            )

    # -- snapshots ---------------------------------------------------------------------
    def snapshots_due(self, now: float) -> list[tuple[int, list[dict[str, Any]]]]:
        """(partition, metric rows) of each partition with updates and no snapshot for
        ``snapshot_interval`` seconds (those with ``snapshot_every`` updates came out of
        :meth:`process` already)."""
        interval = self.spec.snapshot_interval
        return [
            self._snapshot(p, now)
            for p in list(self.metrics)
            if self._since_snapshot[p] and now - self._last_snapshot.get(p, 0.0) >= interval
        ]

    def _snapshot(self, partition: int, now: float) -> tuple[int, list[dict[str, Any]]]:
        rows = snapshot_rows(self.experiment, self.worker, partition, self.metrics[partition], now)
        self._since_snapshot[partition] = 0
        self._last_snapshot[partition] = now
        return partition, rows

    # -- expiries ----------------------------------------------------------------------
    def next_deadline(self) -> float:
        """The earliest deadline the join holds (``inf`` with none); a request whose tick is
        on its way counts until the tick comes back."""
        return self.join.next_deadline()

    def ticks_due(self, now: float) -> list[str]:
        """Request ids to send a tick for at ``now``: due in the join, with no tick sent in
        the last :data:`TICK_RESEND_AFTER` seconds; at most :data:`TICKS_PER_ROUND`.

        Goes through the join's deadlines only when one passed or the join's rescan of the
        store is due (every ``rescan_every`` s, to learn entries recovered from the
        changelog): a quiet look costs one min over the deadlines, not a pass in Python."""
        ticked = self._ticked
        for rid in [r for r, t in ticked.items() if now - t >= TICK_RESEND_AFTER]:
            del ticked[rid]
        rescan = now - self._rescanned_at >= self.join.rescan_every
        if not rescan and self.next_deadline() > now:
            return []
        if rescan:  # PairJoin.due rescans on the first call this late (only this class calls it)
            self._rescanned_at = now
        due: list[str] = []
        for rid in self.join.due(now):
            if rid in ticked:
                continue
            ticked[rid] = now
            due.append(rid)
            if len(due) >= TICKS_PER_ROUND:
                break
        return due

    def next_check(self, now: float) -> float:
        """When to call :meth:`ticks_due` next: at the join's next deadline, and within
        :data:`EXPIRY_CHECK_EVERY` (a request can become due sooner than any known deadline);
        one look per :data:`EXPIRY_CHECK_EVERY` while due requests wait for their ticks."""
        deadline = self.next_deadline()
        if deadline <= now:
            return now + EXPIRY_CHECK_EVERY
        return min(deadline, now + EXPIRY_CHECK_EVERY)
