"""Where the agents' output records go: librdkafka (confluent-kafka), not Faust's producer.

Faust's producer is aiokafka's, in Python on the event loop, and its send path was a fifth
of a busy worker's time; librdkafka batches, sends and retries in its own threads (the
figures are in docs/design-notes.md). The comparison node's join-table changelog goes here
too (``abdag.agents.faust_compat.tables``).

At-least-once needs every record an event caused to be delivered before the event's offset
is committed. Faust flushes only its own producer before a commit, so abdag's consumer
awaits :meth:`OutputProducer.delivered` first (``abdag.agents.faust_compat.consumer``): it
waits for the records queued before the commit began, not for an empty queue (agents keep producing
while a commit is in flight). A record that failed for good fails the commit and crashes
the worker: its events are read again from the last commit, by this worker restarted or
by another.

A record refused for its size (by librdkafka's ``message.max.bytes`` at once, or by the
broker) is a fault of that record's content, not of the worker: it is handed to
``on_refused``, whose replacement (a bounded dead letter, in a worker) is sent in its place
under the same sequence number, so the commit gate waits for the replacement instead.

Records keep Faust's placement: keys go through the Java client's murmur2 partitioner (the
one aiokafka and Faust use), so a request's records land in the same partition number on
every topic, and a table's changelog partition (Faust's) matches its key's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from confluent_kafka import KafkaError, KafkaException, Producer

log = logging.getLogger("abdag.producer")


class OutRecord(NamedTuple):
    """One record an agent sends on; ``partition`` None: by key; ``value`` None: a
    tombstone (a table key deleted)."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Any = None
    partition: int | None = None


class DeliveryFailed(RuntimeError):
    """Records were not delivered: the offsets of their events must not be committed."""


# librdkafka's default message.max.bytes; Kafka brokers default to 1,048,588.
DEFAULT_MAX_RECORD_BYTES = 1_000_000
# What a record refused for its size is replaced with (None: no replacement, a failure).
Refused = Callable[[OutRecord, str], OutRecord | None]
_TOO_LARGE = (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE)


def _too_large(err: Any) -> bool:
    return isinstance(err, KafkaError) and err.code() in _TOO_LARGE


class OutputProducer:
    """Queues the agents' records and tells when the ones queued so far are delivered.

    ``config`` adds to / overrides the librdkafka settings (e.g. security for a real cluster).
    ``max_record_bytes``: the largest record sent (librdkafka's ``message.max.bytes``; keep it
    at or under the broker's limit). ``on_refused(record, reason)``: the replacement for a
    record refused for its size (None: that record fails, as any undeliverable one).
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        delivery_timeout: float = 120.0,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        on_refused: Refused | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.delivery_timeout = delivery_timeout
        self.max_record_bytes = max_record_bytes
        self.on_refused = on_refused
        settings = {
            "bootstrap.servers": bootstrap,
            "partitioner": "murmur2_random",  # Faust's (the Java client's) for keyed records
            "linger.ms": 5,
            "acks": "all",
            "message.timeout.ms": int(delivery_timeout * 1000),
            "message.max.bytes": max_record_bytes,
            "log_level": 3,
        }
        settings.update(config or {})
        self._producer = Producer(settings)
        self._next = 0  # sequence number of the next record queued
        self._pending: set[int] = set()
        self._failures: list[str] = []
        self._replacements: list[tuple[int, OutRecord]] = []  # sent at the next chance
        self.failed = 0
        self.sent = 0
        self.replaced = 0  # records refused for their size and sent as a replacement

    def _on_delivery(self, seq: int, err: Any, msg: Any) -> None:
        if err is not None and _too_large(err):
            record = OutRecord(msg.topic(), msg.key(), msg.value(), msg.headers(), msg.partition())
            if self._replace(seq, record, err):
                return
        self._settled(seq, err, f"{msg.topic()}[{msg.partition()}]")

    def _replace(self, seq: int, record: OutRecord, err: Any) -> bool:
        """Queue the replacement of a record refused for its size under the same ``seq``
        (still pending); False when there is none."""
        if self.on_refused is None:
            return False
        size = len(record.value or b"") + len(record.key or b"")
        said = err.str() if isinstance(err, KafkaError) else str(err)
        why = f"{size} bytes, over the record size limit of {self.max_record_bytes} ({said})"
        replacement = self.on_refused(record, why)
        if replacement is None:
            return False
        self.replaced += 1
        self._replacements.append((seq, replacement))
        return True

    def _send_replacements(self) -> bool:
        """Send queued replacements; False while librdkafka's queue is full."""
        while self._replacements:
            seq, record = self._replacements[0]
            if not self._produce(seq, record, replaceable=False):
                return False
            self._replacements.pop(0)
        return True

    def _settled(self, seq: int, err: Any, where: str) -> None:
        self._pending.discard(seq)
        if err is not None:
            self.failed += 1
            if len(self._failures) < 5:
                self._failures.append(f"{where}: {err}")

    async def send_all(self, records: Iterable[OutRecord]) -> None:
        """Queue ``records``; waits only while librdkafka's queue is full."""
        for record in records:
            seq = self._next
            self._next += 1
            self._pending.add(seq)
            while not self._produce(seq, record):  # queue full: let deliveries drain it
                self._producer.poll(0)
                await asyncio.sleep(0.005)
            self.sent += 1
        self._producer.poll(0)  # serve delivery reports
        self._send_replacements()

    def _produce(self, seq: int, record: OutRecord, *, replaceable: bool = True) -> bool:
        topic, key, value, headers, partition = record
        kwargs: dict[str, Any] = {} if partition is None else {"partition": partition}
        if headers:
            kwargs["headers"] = list(headers.items() if isinstance(headers, dict) else headers)
        try:
            self._producer.produce(
                topic,
                value,
                key,
                on_delivery=lambda err, msg: self._on_delivery(seq, err, msg),
                **kwargs,
            )
        except BufferError:
            return False
        except KafkaException as exc:  # refused at once: too large, no such partition, ...
            err = exc.args[0]
            if not (replaceable and _too_large(err) and self._replace(seq, record, err)):
                self._settled(seq, err, f"{topic}[{partition}]")
        return True

    async def delivered(self) -> None:
        """Return once every record queued before this call is delivered.

        Raises :class:`DeliveryFailed` if a record failed or the wait passed
        ``delivery_timeout`` (the broker unreachable that long)."""
        upto = self._next
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.delivery_timeout
        while True:
            self._producer.poll(0)
            self._send_replacements()
            if self._failures:
                raise DeliveryFailed(
                    f"{self.failed} output records not delivered, e.g. {self._failures[0]}"
                )
            if not self._pending or min(self._pending) >= upto:
                return
            if loop.time() > deadline:
                waiting = sum(1 for s in self._pending if s < upto)
                raise DeliveryFailed(
                    f"{waiting} output records not delivered within {self.delivery_timeout:.0f} s"
                )
            await asyncio.sleep(0.002)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (up to ``timeout`` s) and report what was not."""
        try:
            left = self._producer.flush(timeout)
            if self._replacements and self._send_replacements():
                left = self._producer.flush(timeout)
        except KafkaException as exc:  # pragma: no cover - librdkafka fatal error
            log.error("output producer: %s", exc)
            return
        if left:
            log.error("output producer closed with %d records not delivered", left)


class RecordLimitTooSmall(ValueError):
    """The broker accepts smaller records than abdag itself sends."""


def broker_record_limit(
    bootstrap: str, topics: Iterable[str], *, timeout: float = 5.0
) -> tuple[int, str] | None:
    """The smallest record size limit the broker reports, and where it is set: the broker's
    ``message.max.bytes`` or a topic's ``max.message.bytes``; None when it reports neither
    (Tansu reports no configs)."""
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        brokers = admin.list_topics(timeout=timeout).brokers
    except KafkaException:
        return None
    wanted = [(ConfigResource("BROKER", str(b)), "message.max.bytes") for b in brokers]
    wanted += [(ConfigResource("TOPIC", t), "max.message.bytes") for t in topics]
    found: list[tuple[int, str]] = []
    futures = admin.describe_configs([r for r, _ in wanted], request_timeout=timeout)
    for resource, name in wanted:
        try:
            entry = futures[resource].result(timeout).get(name)
        except (KafkaException, KeyError, TimeoutError):
            continue
        if entry is not None and str(entry.value).isdigit():
            found.append(
                (int(entry.value), f"{name} of {resource.restype.name.lower()} {resource.name}")
            )
    return min(found) if found else None


def record_limit(bootstrap: str, topics: Iterable[str], needed: int) -> int:
    """The record size limit a worker's producer should keep: librdkafka's default, or the
    broker's when smaller. Raises :class:`RecordLimitTooSmall` when the broker's is under
    ``needed`` (the largest record abdag sends by design)."""
    reported = broker_record_limit(bootstrap, topics)
    if reported is None:
        log.info(
            "the broker does not report its record size limit; records over %d bytes are "
            "dead-lettered as 'too large to send'",
            DEFAULT_MAX_RECORD_BYTES,
        )
        return DEFAULT_MAX_RECORD_BYTES
    limit, where = reported
    if limit < needed:
        raise RecordLimitTooSmall(
            f"the broker at {bootstrap} accepts records of at most {limit} bytes ({where}); "
            f"abdag sends records of up to {needed} bytes (one event of up to "
            f"abdag.topics.records.MAX_EVENT_BYTES with its outputs): raise {where.split()[0]} "
            f"to at least {needed}"
        )
    return min(limit, DEFAULT_MAX_RECORD_BYTES)
