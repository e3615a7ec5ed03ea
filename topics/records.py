"""The records that travel on a DAG's topics, and their versioned JSON encoding.

Every record carries ``"v"`` (schema version) and ``"kind"``; a reader refuses a version it
does not know instead of guessing. JSON (via orjson) keeps the input topics writable by any
Kafka client, kcat included, and is compact enough for Faust's per-event cost to dominate.

>>> e = Event(request_id="r1", ts=1.0, payload={"x": 1})
>>> decode_event(encode(e)) == e
True
>>> request_from_raw(b'{"request_id": "r2", "x": 3}', key=None, now=5.0).payload
{'x': 3}
"""

from __future__ import annotations

import base64
import hashlib
import math
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

import orjson

SCHEMA_VERSION = 1
MAX_REQUEST_ID_LEN = 200
MAX_EVENT_BYTES = 512 * 1024  # larger events are refused at the DAG entry, not carried on
# A dead letter keeps at most this much of the refused record's bytes (with its full size
# and hash): the letter itself must fit in one Kafka record, whatever was refused.
DEAD_LETTER_ORIGINAL_BYTES = 64 * 1024


class BadRecord(ValueError):
    """A record that cannot be processed; ``reason`` is a short stable code for counting."""

    def __init__(self, reason: str, detail: str, request_id: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.request_id = request_id


@dataclass
class Prediction:
    """One model node's answer for one request."""

    model: str
    version: str
    output: Any
    score: float | None
    label: int | None
    latency_ms: float
    worker: str
    batch_size: int
    ts: float


@dataclass
class Event:
    """A request on its way through the DAG: the payload plus every upstream node's output."""

    request_id: str
    ts: float
    payload: dict[str, Any]
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # A hash of the payload made at the DAG's entry: two events with one request id and
    # different payloads are told apart from one event read twice (abdag.comparators.join).
    digest: str = ""

    def prediction(self, node: str) -> Prediction:
        try:
            return Prediction(**self.outputs[node])
        except KeyError as exc:
            raise BadRecord(
                "missing output", f"no output of node {node!r}", self.request_id
            ) from exc


@dataclass
class Label:
    """The ground truth for a request, often arriving long after the predictions."""

    request_id: str
    label: float
    ts: float


@dataclass
class DeadLetter:
    """A refused record with the reason, the node that refused it and its original bytes.

    ``original`` is the refused record's first :data:`DEAD_LETTER_ORIGINAL_BYTES` bytes (all
    of it when smaller); ``original_size`` and ``original_sha256`` describe the whole record,
    so a truncated original can still be matched with what the producer sent.

    >>> letter = DeadLetter.of("d", "tx", "too large", "", "r1", original=b"x" * 100_000)
    >>> len(letter.original), letter.original_size, letter.truncated
    (65536, 100000, True)
    """

    dag: str
    node: str
    reason: str
    detail: str
    request_id: str
    topic: str
    partition: int
    offset: int
    original: bytes
    ts: float
    index: int = -1  # the refused record's place in a pack (abdag.topics.packs); -1: not in one
    original_size: int = -1  # bytes of the whole refused record (-1: written before 2026-12)
    original_sha256: str = ""

    @classmethod
    def of(
        cls,
        dag: str,
        node: str,
        reason: str,
        detail: str,
        request_id: str,
        *,
        original: bytes,
        topic: str = "",
        partition: int = -1,
        offset: int = -1,
        index: int = -1,
        ts: float = 0.0,
    ) -> DeadLetter:
        """A letter whose original is bounded, with the whole record's size and hash."""
        return cls(
            dag=dag,
            node=node,
            reason=reason,
            detail=detail,
            request_id=request_id,
            topic=topic,
            partition=partition,
            offset=offset,
            original=original[:DEAD_LETTER_ORIGINAL_BYTES],
            ts=ts,
            index=index,
            original_size=len(original),
            original_sha256=hashlib.sha256(original).hexdigest(),
        )

    @property
    def truncated(self) -> bool:
        """Whether :attr:`original` is only the start of the refused record."""
        return self.original_size > len(self.original)

    @property
    def source(self) -> str:
        """Where the refused record was read: ``topic/partition/offset[#index]``; one record
        read twice (a re-delivery) has the same source."""
        if not self.topic:
            return ""
        where = f"{self.topic}/{self.partition}/{self.offset}"
        return where if self.index < 0 else f"{where}#{self.index}"


_KINDS = {"event": Event, "label": Label, "dead_letter": DeadLetter}
_KIND_OF = {cls: kind for kind, cls in _KINDS.items()}
_FIELDS = {cls: tuple(f.name for f in fields(cls)) for cls in (Prediction, *_KINDS.values())}


def fields_of(record: Prediction | Event | Label | DeadLetter) -> dict[str, Any]:
    """A record's fields as a new dict that shares their values.

    Not ``dataclasses.asdict``: it deep-copies the payload and every output, much slower on
    an event, and it ran several times per request in a busy worker (docs/design-notes.md).
    """
    return {name: getattr(record, name) for name in _FIELDS[type(record)]}


def encode(record: Event | Label | DeadLetter) -> bytes:
    body = fields_of(record)
    if isinstance(record, DeadLetter):
        body["original"] = base64.b64encode(record.original).decode()
    return orjson.dumps({"v": SCHEMA_VERSION, "kind": _KIND_OF[type(record)], **body})


def _load(value: bytes | None) -> dict[str, Any]:
    return _object(load_json(value))


def load_json(value: bytes | None) -> Any:
    """Parse a record's value; a missing value or bad JSON is a :class:`BadRecord`."""
    if value is None:
        raise BadRecord("undecodable", "empty message (no value)")
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise BadRecord("undecodable", f"not JSON: {exc}") from exc


def _typed(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    rid = str(obj.get("request_id", ""))
    if obj.get("v") != SCHEMA_VERSION:
        raise BadRecord("unknown schema version", f"v={obj.get('v')!r}", rid)
    if obj.get("kind") != kind:
        raise BadRecord("wrong record kind", f"expected {kind}, got {obj.get('kind')!r}", rid)
    return {k: v for k, v in obj.items() if k not in ("v", "kind")}


def _object(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise BadRecord("undecodable", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def event_from(obj: Any) -> Event:
    """An :class:`Event` from its parsed JSON (a record of a pack: ``abdag.topics.packs``)."""
    body = _typed(_object(obj), "event")
    try:
        return Event(**body)
    except TypeError as exc:
        raise BadRecord("missing field", str(exc), str(body.get("request_id", ""))) from exc


def label_from(obj: Any) -> Label:
    """A :class:`Label` from its parsed JSON (a record of a pack: ``abdag.topics.packs``)."""
    body = _typed(_object(obj), "label")
    try:
        return Label(**body)
    except TypeError as exc:
        raise BadRecord("missing field", str(exc), str(body.get("request_id", ""))) from exc


def decode_event(value: bytes | None) -> Event:
    return event_from(_load(value))


def decode_label(value: bytes | None) -> Label:
    return label_from(_load(value))


def decode_dead_letter(value: bytes) -> DeadLetter:
    body = _typed(_load(value), "dead_letter")
    body["original"] = base64.b64decode(body["original"])
    return DeadLetter(**body)


def _request_id(obj: dict[str, Any], key: bytes | None) -> str | None:
    rid = obj.get("request_id")
    if rid is None and key:
        rid = key.decode("utf-8", errors="replace")
    if rid is None:
        return None
    if not isinstance(rid, str | int) or isinstance(rid, bool):
        raise BadRecord("bad request id", f"request_id must be a string, got {type(rid).__name__}")
    rid = str(rid)
    if not rid or len(rid) > MAX_REQUEST_ID_LEN:
        raise BadRecord("bad request id", f"request_id must be 1..{MAX_REQUEST_ID_LEN} characters")
    return rid


_ASSIGNED_IDS = uuid.uuid5(uuid.NAMESPACE_URL, "abdag:request-id")


def _assigned_id(origin: str | None) -> str:
    if origin is None:
        return uuid.uuid4().hex
    return uuid.uuid5(_ASSIGNED_IDS, origin).hex


def request_from_raw(
    value: bytes | None, key: bytes | None, now: float, origin: str | None = None
) -> Event:
    """Turn what a user produced to an input topic into an :class:`Event`.

    Accepts a plain JSON object (the payload, optionally with ``request_id`` and ``ts``) or
    an abdag envelope. The request id is kept when the producer gave one (in the body or as
    the Kafka key) and assigned here otherwise: this is the one place ids are made.

    ``origin`` names the record in the log (topic, partition, offset, timestamp). An id
    assigned from it is the same each time the record is read, so a record read twice
    (after a rebalance or a crash) is still one request; without it the id is random.

    >>> a = request_from_raw(b'{"x": 1}', None, 5.0, origin="in/0/17/1700000000000")
    >>> a.request_id == request_from_raw(b'{"x": 1}', None, 9.0, "in/0/17/1700000000000").request_id
    True
    """
    if value is not None and len(value) > MAX_EVENT_BYTES:
        raise BadRecord("too large", f"{len(value)} bytes; the limit is {MAX_EVENT_BYTES}")
    obj = _load(value)
    if "v" in obj and "kind" in obj:
        return decode_event(value)
    rid = _request_id(obj, key) or _assigned_id(origin)
    ts = obj.get("ts", now)
    if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
        raise BadRecord("bad timestamp", f"ts must be epoch seconds, got {ts!r}", rid)
    payload = {k: v for k, v in obj.items() if k not in ("request_id", "ts")}
    return Event(request_id=rid, ts=float(ts), payload=payload, digest=payload_digest(payload))


def payload_digest(payload: dict[str, Any]) -> str:
    """A short hash of a payload, the same for the same JSON whatever its key order.

    >>> payload_digest({"a": 1, "b": 2}) == payload_digest({"b": 2, "a": 1})
    True
    """
    canonical = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canonical, digest_size=8).hexdigest()


def label_from_raw(value: bytes | None, key: bytes | None, now: float) -> Label:
    """Turn a user's label message (``{"request_id": ..., "label": ...}``) into a Label."""
    obj = _load(value)
    if "v" in obj and "kind" in obj:
        return decode_label(value)
    rid = _request_id(obj, key)
    if rid is None:
        raise BadRecord("missing request id", "a label must name the request_id it belongs to")
    y = obj.get("label")
    if isinstance(y, bool):
        y = int(y)
    if not isinstance(y, int | float):
        raise BadRecord("bad label", f"label must be a number, got {y!r}", rid)
    if not math.isfinite(y):
        raise BadRecord("non-finite label", f"label is {y}", rid)
    ts = obj.get("ts", now)
    if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
        raise BadRecord("bad timestamp", f"ts must be epoch seconds, got {ts!r}", rid)
    return Label(request_id=rid, label=float(y), ts=float(ts))
