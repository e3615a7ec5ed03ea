"""Producing events to a DAG's input topic (what `abdag produce` does).

Any Kafka client can do the same with plain JSON; this one adds a rate limit, a progress
line, and reports delivery failures instead of losing them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from confluent_kafka import KafkaException, Producer

from abdag.topics.admin import BrokerUnreachable
from abdag.topics.records import MAX_EVENT_BYTES


class BadEventFile(ValueError):
    """A JSON-lines input that cannot be sent as it is: missing, unreadable, or a line that
    is not a JSON object; the message names the file (and the line)."""


def read_jsonl(path: str | Path) -> Iterator[bytes]:
    """Lines of a JSON-lines file, checked to be JSON objects (line numbers in errors).

    The file is opened here, not at the first ``next()``, so a missing file is reported
    before anything connects to the broker.
    """
    path = Path(path)
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise BadEventFile(f"{path}: cannot read the events file: {exc.strerror or exc}") from None
    return _jsonl_lines(path, fh)


def _jsonl_lines(path: Path, fh: BinaryIO) -> Iterator[bytes]:
    with fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise BadEventFile(f"{path} line {lineno}: not JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise BadEventFile(
                    f"{path} line {lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            yield line


def produce(
    bootstrap: str,
    topic: str,
    events: Iterable[dict[str, Any] | bytes],
    *,
    total: int | None = None,
    rate: float | None = None,
    progress: bool = True,
    key_field: str = "request_id",
) -> int:
    """Send ``events`` (dicts or JSON bytes); return how many the broker acknowledged.

    When ``events`` raises (a bad line of a file), what was sent before it is still
    delivered (flushed) before the error goes on; a :class:`BadEventFile` then says how
    many events were sent before the bad line.
    """
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 5,
            "partitioner": "murmur2_random",  # the Java client's partitioner, as Faust uses
            "message.timeout.ms": 30000,
            "log_level": 0,
        }
    )
    errors: list[str] = []
    delivered = 0

    def on_delivery(err, msg) -> None:
        nonlocal delivered
        if err is not None:
            errors.append(str(err))
        else:
            delivered += 1

    start = time.monotonic()
    last_print = 0.0
    sent = 0
    stopped: Exception | None = None
    source = iter(events)
    while True:
        try:
            ev = next(source)
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001 - re-raised below, once the sent ones are out
            stopped = exc
            break
        value = ev if isinstance(ev, bytes) else orjson.dumps(ev)
        key = None
        if isinstance(ev, dict) and ev.get(key_field) is not None:
            key = str(ev[key_field]).encode()
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
            except KafkaException as exc:  # e.g. over the record size limit: this event's fault
                stopped = BadEventFile(
                    f"event {sent + 1} ({len(value)} bytes) not sent: {exc.args[0].str()} "
                    f"(the DAG refuses events over {MAX_EVENT_BYTES} bytes anyway)"
                )
                break
        if stopped is not None:
            break
        sent += 1
        producer.poll(0)
        if rate:
            pace(producer, start + sent / rate)
        now = time.monotonic()
        if progress and now - last_print > 0.5:
            last_print = now
            _progress(sent, total, now - start)
        if errors:
            break
    remaining = producer.flush(30)
    if progress:
        _progress(sent, total, time.monotonic() - start, end=True)
    if errors or remaining:
        raise BrokerUnreachable(
            f"{len(errors) + remaining} of {sent} events were not delivered to {topic} at "
            f"{bootstrap}: {errors[0] if errors else 'flush timed out'}"
        )
    if isinstance(stopped, BadEventFile):
        were = "event was" if delivered == 1 else "events were"
        raise BadEventFile(f"{stopped}; {delivered} {were} sent before it") from None
    if stopped is not None:
        raise stopped
    return delivered


def pace(producer: Producer, until: float) -> None:
    """Serve delivery reports until ``until`` (``time.monotonic()``) to hold a send rate.

    One ``poll(t)`` is not a sleep: it returns as soon as it has served a delivery report,
    so a loop that relied on it sent a "50 events/s" stream in about a second."""
    while (left := until - time.monotonic()) > 0:
        producer.poll(left)


def _progress(sent: int, total: int | None, elapsed: float, end: bool = False) -> None:
    rate = sent / elapsed if elapsed > 0 else 0.0
    of = f"/{total}" if total else ""
    pct = f" {100 * sent / total:5.1f}%" if total else ""
    sys.stderr.write(f"\rproduced {sent}{of}{pct}  {rate:,.0f} events/s")
    if end:
        sys.stderr.write("\n")
    sys.stderr.flush()
