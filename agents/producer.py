"""Where the agents' output records go: librdkafka (confluent-kafka), not Faust's producer.

Faust's producer is aiokafka's, in Python on the event loop: its send path was ~20% of a
busy worker's time, and a Faust pass-through agent sending with a confluent-kafka producer
ran 3.3x faster (3.0k -> 9.8k events/s on a 2-core machine). In abdag, sending the
comparison node's join-table changelog here too (``agents.tables``) was the largest of the
steps that took the comparison node alone from 810 to 1,777 pairs/s in one session
(bench.comparison, back to back). librdkafka batches, sends and retries in its own threads.

At-least-once needs every record an event caused to be delivered before the event's offset
is committed. Faust flushes only its own producer before a commit, so abdag's consumer
awaits :meth:`OutputProducer.delivered` first (``agents.consumer``): it waits for the
records queued before the commit began, not for an empty queue (agents keep producing
while a commit is in flight). A record that failed for good fails the commit and crashes
the worker: its events are read again from the last commit, by this worker restarted or
by another.

Records keep Faust's placement: keys go through the Java client's murmur2 partitioner (the
one aiokafka and Faust use), so a request's records land in the same partition number on
every topic, and a table's changelog partition (Faust's) matches its key's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, NamedTuple

from confluent_kafka import KafkaException, Producer

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


class OutputProducer:
    """Queues the agents' records and tells when the ones queued so far are delivered.

    ``config`` adds to / overrides the librdkafka settings (e.g. security for a real cluster).
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        delivery_timeout: float = 120.0,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.delivery_timeout = delivery_timeout
        settings = {
            "bootstrap.servers": bootstrap,
            "partitioner": "murmur2_random",  # Faust's (the Java client's) for keyed records
            "linger.ms": 5,
            "acks": "all",
            "message.timeout.ms": int(delivery_timeout * 1000),
            "log_level": 3,
        }
        settings.update(config or {})
        self._producer = Producer(settings)
        self._next = 0  # sequence number of the next record queued
        self._pending: set[int] = set()
        self._failures: list[str] = []
        self.failed = 0
        self.sent = 0

    def _on_delivery(self, seq: int, err: Any, msg: Any) -> None:
        self._settled(seq, err, f"{msg.topic()}[{msg.partition()}]")

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

    def _produce(self, seq: int, record: OutRecord) -> bool:
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
        except KafkaException as exc:  # refused at once, e.g. no such partition
            self._settled(seq, exc.args[0], f"{topic}[{partition}]")
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
        except KafkaException as exc:  # pragma: no cover - librdkafka fatal error
            log.error("output producer: %s", exc)
            return
        if left:
            log.error("output producer closed with %d records not delivered", left)
