"""Packs: the records of one partition that a node sends on from one batch, as one record.

Why: a Faust worker pays about the same for each Kafka record it consumes, small or not
(its consume path, the acknowledgement, the offset bookkeeping), and so does the broker for
each record it stores and serves. Per request the A/B DAG moved ~7 records between its own
nodes, each such a cost. A node that handles a batch now sends the batch's records for one
partition as one pack: at load, tens to hundreds of requests share each record between
nodes; a lone request is still sent at once, alone in its pack.

Only the DAG's internal node topics carry packs. Input topics stay one JSON object per
record (any Kafka client writes them), and so do the served answers. A reader takes a plain
record as a pack of one, so records written one by one (by an older worker, or by hand)
still flow.

Placement: a pack lands in the partition its records' request ids hash to, with the
partitioner of the Java client (murmur2, the one Faust and abdag's producer use for keys),
so a request is in the same partition number on every topic, as the comparison node's join
needs.

>>> from abdag.topics.records import Event, encode, event_from
>>> raw = pack([encode(Event("r1", 1.0, {"x": 1})), encode(Event("r2", 2.0, {"x": 2}))])
>>> [event_from(item.body).request_id for item in unpack(raw)]
['r1', 'r2']
>>> [item.body["x"] for item in unpack(b'{"x": 3}')]  # a plain record: a pack of one
[3]
>>> partition_for(b"req-0", 4), partition_for(b"req-1", 4)  # where librdkafka puts them
(1, 3)
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import orjson
from aiokafka.partitioner import murmur2

from abdag.topics.records import SCHEMA_VERSION, BadRecord, load_json

# A pack stays well under Kafka's default 1 MB record limit; one record larger than this
# goes alone (the DAG's entry refuses events over abdag.topics.records.MAX_EVENT_BYTES).
PACK_MAX_BYTES = 512 * 1024
PACK_MAX_RECORDS = 1000

Headers = Sequence[tuple[str, bytes]] | None

_HEAD = b'{"v":%d,"kind":"pack","records":[' % SCHEMA_VERSION


class Packed(NamedTuple):
    """One record out of a pack: its parsed JSON, its Kafka headers and its place in the
    pack (-1: the Kafka record was this one record, not a pack)."""

    body: Any
    headers: Headers
    index: int = -1

    def original(self) -> bytes:
        """The record's bytes, for a dead letter."""
        return orjson.dumps(self.body)


def partition_for(key: bytes, partitions: int) -> int:
    """The partition a keyed record lands in with the Java client's partitioner."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def is_pack(value: bytes | None) -> bool:
    """Whether a record's value is a pack as :func:`pack` writes it (a quick look)."""
    return value is not None and value.startswith(_HEAD)


def pack(bodies: Sequence[bytes], headers: Sequence[Headers] | None = None) -> bytes:
    """One pack of encoded JSON records (``headers``, when given, one entry per record)."""
    out = _HEAD + b",".join(bodies) + b"]"
    if headers and any(headers):
        out += b',"headers":' + orjson.dumps([_headers_to_json(h) for h in headers])
    return out + b"}"


def unpack(value: bytes | None, headers: Headers = None) -> list[Packed]:
    """The records of a pack, or of a plain record (a pack of one, with ``headers``).

    Raises :class:`BadRecord` when the value is not JSON at all; a record of the pack that
    is not what its reader wants is that reader's to refuse, one by one.
    """
    obj = load_json(value)
    if not (isinstance(obj, dict) and obj.get("kind") == "pack"):
        return [Packed(obj, headers)]
    if obj.get("v") != SCHEMA_VERSION:
        raise BadRecord("unknown schema version", f"pack v={obj.get('v')!r}")
    records = obj.get("records")
    if not isinstance(records, list):
        raise BadRecord("undecodable", "a pack without a list of records")
    carried = obj.get("headers")
    if not isinstance(carried, list) or len(carried) != len(records):
        carried = [None] * len(records)
    return [
        Packed(body, _headers_from_json(h), i)
        for i, (body, h) in enumerate(zip(records, carried, strict=True))
    ]


def packs_by_partition(
    entries: Iterable[tuple[int, bytes, Headers]],
    *,
    max_bytes: int = PACK_MAX_BYTES,
    max_records: int = PACK_MAX_RECORDS,
) -> Iterator[tuple[int, bytes]]:
    """``(partition, encoded record, headers)`` entries as ``(partition, pack)``: one pack
    per partition, split where one would pass ``max_bytes`` or ``max_records``; the order
    of a partition's records is kept.

    >>> [(p, len(unpack(v))) for p, v in packs_by_partition(
    ...     [(0, b'{"a":1}', None), (1, b'{"a":2}', None), (0, b'{"a":3}', None)])]
    [(0, 2), (1, 1)]
    """
    groups: dict[int, tuple[list[bytes], list[Headers], list[int]]] = {}
    for partition, body, headers in entries:
        group = groups.get(partition)
        if group is None:
            group = groups[partition] = ([], [], [0])
        bodies, heads, size = group
        if bodies and (size[0] + len(body) > max_bytes or len(bodies) >= max_records):
            yield partition, pack(bodies, heads)
            bodies.clear()
            heads.clear()
            size[0] = 0
        bodies.append(body)
        heads.append(headers)
        size[0] += len(body) + 1
    for partition, (bodies, heads, _) in groups.items():
        if bodies:
            yield partition, pack(bodies, heads)


def _headers_to_json(headers: Any) -> list[list[str]] | None:
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, dict) else headers
    return [[k, base64.b64encode(v or b"").decode()] for k, v in pairs]


def _headers_from_json(carried: Any) -> Headers:
    if not carried:
        return None
    return [(str(k), base64.b64decode(v)) for k, v in carried]
