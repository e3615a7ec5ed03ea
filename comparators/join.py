"""Joining model A's and model B's outputs, and the label, by request id.

Faust has no stream-stream join, so the join is a small state machine over a mapping keyed
by request id. In a worker the mapping is a Faust Table (its changelog survives restarts and
moves with the partition on a rebalance); in tests it can be a dict.

Each request's entry remembers what has been emitted (``stage``: 1 unpaired, 2 paired
without label, 3 paired with label). A re-delivered event (after a rebalance or a crash)
finds its side already present: the join emits the same row again (``replay=True``) in case
the first emission was lost in the crash, and metrics ignore replays, so nothing counts
twice. A later stage supersedes an earlier one downstream (ClickHouse keeps the highest
stage per request).

>>> join = PairJoin(join_timeout=10, label_timeout=60, store={})
>>> join.offer_prediction("a", "r1", {"score": 0.9}, now=0.0) is None
True
>>> emitted = join.offer_prediction("b", "r1", {"score": 0.7}, now=1.0)
>>> emitted.stage, emitted.status, emitted.label
(2, 'paired', None)
>>> join.offer_label("r1", 1.0, label_ts=5.0, now=5.0).stage
3
>>> join.offer_prediction("a", "r1", {"score": 0.9}, now=6.0).replay  # re-delivered
True

What the join cannot use is never dropped silently: it raises
:class:`~abdag.topics.records.BadRecord` (the caller dead-letters the record with that reason) for
a second event with a request id already seen but another payload (``digest``), a second
label that differs from the first, and, from :meth:`PairJoin.expire`, a label whose
request never came within ``label_timeout``.

>>> join.offer_label("r1", 0.0, label_ts=7.0, now=7.0)
Traceback (most recent call last):
...
abdag.topics.records.BadRecord: conflicting label: request r1 already has label 1; label 0 not used
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, replace
from typing import Any

from abdag.comparators.tasks import label_text
from abdag.topics.records import BadRecord

UNPAIRED, PAIRED, LABELLED = 1, 2, 3


@dataclass(frozen=True)
class Emitted:
    """What the join learned about one request: a row for the pairs table."""

    request_id: str
    stage: int
    status: str  # 'paired' | 'missing_a' | 'missing_b'
    a: dict[str, Any] | None
    b: dict[str, Any] | None
    label: float | None
    label_ts: float | None
    first_ts: float
    newly_labelled: bool
    newly_paired: bool
    replay: bool = False
    served_by: str = ""  # 'a' / 'b': whose answer the node served; '' none (yet)
    segments: dict[str, str] | None = None  # the request's segment values (pairs.segments)


class PairJoin:
    """Pairs A and B outputs per request id, then attaches the label whenever it comes.

    ``join_timeout``: seconds after the first side arrives before the request is emitted as
    unpaired (a side that arrives later still pairs it). ``label_timeout``: seconds a paired
    request waits for its label (and a label for its predictions) before the entry is
    forgotten. ``keep_done``: how long a finished entry is kept to recognise re-deliveries.
    """

    def __init__(
        self,
        *,
        join_timeout: float,
        label_timeout: float,
        store: MutableMapping[str, dict[str, Any]],
        keep_done: float = 300.0,
        rescan_every: float = 30.0,
    ) -> None:
        self.join_timeout = join_timeout
        self.label_timeout = label_timeout
        self.keep_done = keep_done
        self.store = store
        # Deadlines kept in memory so the expiry check does not decode the whole store every
        # second; the store is rescanned now and then to pick up entries that arrived by
        # recovery (a partition moved here) and to forget partitions that moved away.
        self.rescan_every = rescan_every
        self._deadlines: dict[str, float] = {}
        self._scanned_at = float("-inf")

    def offer_prediction(
        self,
        side: str,
        request_id: str,
        prediction: dict[str, Any],
        now: float,
        digest: str = "",
        *,
        served: bool = False,
        segments: Callable[[], dict[str, str]] | None = None,
    ) -> Emitted | None:
        """``digest``: the request's payload hash (``Event.digest``); a prediction for a
        payload other than the one this request id was first seen with is refused.
        ``served``: this prediction is the request's served answer; the entry remembers
        its side, and every row of the request says so (``Emitted.served_by``).
        ``segments``: makes the request's segment values; called once per request (by its
        first prediction), kept in the entry and on every row (``Emitted.segments``)."""
        if side not in ("a", "b"):
            raise ValueError(f"side must be 'a' or 'b', got {side!r}")
        entry = self.store.get(request_id) or {"first": now, "stage": 0}
        first_digest = entry.get("digest")
        if digest and first_digest and digest != first_digest:
            self._refuse_duplicate(request_id, entry, digest)
            return None
        if entry.get(side) is not None:
            return self._replay(request_id, entry)
        if digest:
            entry["digest"] = digest
        entry[side] = prediction
        if served:
            entry["served_by"] = side
        if segments is not None and "segments" not in entry:
            entry["segments"] = segments()
        entry.setdefault("first", now)
        entry["touched"] = now
        emitted = None
        if entry.get("a") is not None and entry.get("b") is not None:
            stage = LABELLED if entry.get("label") is not None else PAIRED
            emitted = self._emit(request_id, entry, stage)
        self._put(request_id, entry)
        return emitted

    def offer_label(
        self, request_id: str, label: float, label_ts: float, now: float
    ) -> Emitted | None:
        entry = self.store.get(request_id) or {"first": now, "stage": 0}
        first = entry.get("label")
        if first is not None:  # re-delivered, or a second label: the first wins
            if first != label:
                raise BadRecord(
                    "conflicting label",
                    f"request {request_id} already has label {label_text(first)}; "
                    f"label {label_text(label)} not used",
                    request_id,
                )
            return self._replay(request_id, entry)
        entry["label"] = label
        entry["label_ts"] = label_ts
        entry["touched"] = now
        emitted = None
        if entry.get("a") is not None and entry.get("b") is not None:
            emitted = self._emit(request_id, entry, LABELLED)
        self._put(request_id, entry)
        return emitted

    def _refuse_duplicate(self, request_id: str, entry: dict[str, Any], digest: str) -> None:
        """Refuse another payload under a known request id, once per payload: both model
        sides see it, and it is one event."""
        refused = entry.setdefault("refused", [])
        if digest in refused:
            return
        refused.append(digest)
        self._put(request_id, entry)
        raise BadRecord(
            "duplicate request id",
            f"request {request_id} was first seen with another payload; the first is kept",
            request_id,
        )

    def _put(self, request_id: str, entry: dict[str, Any]) -> None:
        self.store[request_id] = entry
        self._deadlines[request_id] = self._deadline(entry)

    def _emit(self, request_id: str, entry: dict[str, Any], stage: int) -> Emitted | None:
        previous = entry.get("stage", 0)
        if stage <= previous:
            return None
        entry["stage"] = stage
        if stage == UNPAIRED:
            status = "missing_b" if entry.get("a") is not None else "missing_a"
        else:
            status = "paired"
        return Emitted(
            request_id=request_id,
            stage=stage,
            status=status,
            a=entry.get("a"),
            b=entry.get("b"),
            label=entry.get("label") if stage == LABELLED else None,
            label_ts=entry.get("label_ts") if stage == LABELLED else None,
            first_ts=entry["first"],
            newly_labelled=stage == LABELLED,
            newly_paired=stage >= PAIRED and previous < PAIRED,
            served_by=entry.get("served_by", ""),
            segments=entry.get("segments"),
        )

    def _replay(self, request_id: str, entry: dict[str, Any]) -> Emitted | None:
        """The row already emitted for this request, again (idempotent downstream)."""
        stage = entry.get("stage", 0)
        if stage == 0:
            return None
        entry = dict(entry, stage=stage - 1)
        emitted = self._emit(request_id, entry, stage)
        return replace(emitted, newly_labelled=False, newly_paired=False, replay=True)

    def next_deadline(self) -> float:
        """The earliest deadline of an entry this join knows (``inf`` with none): when
        :meth:`due` next has something to say (a C-speed min, not a pass over the store)."""
        return min(self._deadlines.values(), default=math.inf)

    def due(self, now: float) -> Iterator[str]:
        """Request ids whose entry needs attention at ``now`` (see :meth:`expire`)."""
        if now - self._scanned_at >= self.rescan_every:
            self._deadlines = {rid: self._deadline(e) for rid, e in list(self.store.items())}
            self._scanned_at = now
        for rid, deadline in list(self._deadlines.items()):
            if deadline <= now:
                yield rid

    def _deadline(self, entry: dict[str, Any]) -> float:
        stage = entry.get("stage", 0)
        has_side = entry.get("a") is not None or entry.get("b") is not None
        if stage == 0 and has_side:
            return entry["first"] + self.join_timeout
        if stage == LABELLED:
            return entry["touched"] + self.keep_done
        return entry["touched"] + self.label_timeout

    def expire(self, request_id: str, now: float) -> Emitted | None:
        """Emit a request that waited too long as unpaired, or forget a finished entry; a
        label whose request never came is forgotten with a :class:`BadRecord`."""
        entry = self.store.get(request_id)
        if entry is None:
            self._deadlines.pop(request_id, None)  # gone (or its partition moved away)
            return None
        if self._deadline(entry) > now:
            self._deadlines[request_id] = self._deadline(entry)
            return None
        has_side = entry.get("a") is not None or entry.get("b") is not None
        if entry.get("stage", 0) == 0 and has_side:
            emitted = self._emit(request_id, entry, UNPAIRED)
            entry["touched"] = now
            self._put(request_id, entry)
            return emitted
        del self.store[request_id]
        self._deadlines.pop(request_id, None)
        if entry.get("label") is not None and not has_side:
            raise BadRecord(
                "label without request",
                f"label {label_text(entry['label'])} waited {self.label_timeout:g} s "
                "(label_timeout) and no prediction of A or B for this request came",
                request_id,
            )
        return None
