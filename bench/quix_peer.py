"""The peer: Quix Streams against Faust and abdag, on the bench's own private stack.

Two Quix Streams apps, each one process on the same Tansu broker as the other benches
(bench._harness.local_stack: Tansu + ClickHouse on free ports in a temp dir), 4-partition
topics (bench._harness.PARTITIONS), measured like bench.passthrough:

* **Quix pass-through**: ``app.dataframe(topic).to_topic(out)``, JSON in, JSON out, on the
  same request bytes as the Faust pass-through (bench._ab.FraudStream.request).
  Events/s = (n - 1) / span of the output records' Kafka timestamps (the harness's
  definition, bench._harness.span_rate), after a warm-up of 200 records came through.
* **Quix join**: two source topics (A's and B's predictions for each request, JSON, with
  the request's payload as abdag's model nodes send it), ``sdf_a.concat(sdf_b)`` then
  ``sdf.apply(join, stateful=True)`` (RocksDB state, changelog topic): a request's first
  side is kept in state, the second emits one pair and deletes the first. All A records
  are produced, then all B records (as bench.comparison's join-only run does). Pairs/s =
  (n - 1) / (newest pair's timestamp - the moment the join took its first measured
  record, logged by the app): from the join's first work to its last pair, so reading A
  counts, as the changelog start does for abdag's comparison node.
* **Faust pass-through** (bench.passthrough ``plain``): in the same rounds on the same
  stack, so the Faust / Quix ratio is like for like.

Quix Streams stamps an output record with its input's timestamp (the producer's, here),
so both apps set the output timestamp to the processing time
(``sdf.set_timestamp(lambda *_: now_ms())``) right before ``to_topic``: the Kafka
CreateTime of an output is then when the app produced it, as for Faust's producer.
Wall rates (n / (last output - first produce call)) are printed too, as peers.md had them.

Both apps run with ``consumer_poll_timeout=0.1`` (Quix's default is 1.0 s): reading two
topics, Quix aligns them by timestamp, and when a partition's buffer runs dry it refills it
with ``consume(10000 messages, timeout)``, which waits out the whole timeout once fewer
than 10,000 records are left. A finite backlog thus showed a 1.0 s stall near its end (and
one at the A -> B switch): ~1,750 instead of ~16,000 pairs/s over 2,000 pairs. A live stream
above 10,000 records/s would not stall; the pass-through (one topic, no alignment) polls
record by record and is not affected.
Rounds alternate Quix pass-through, Faust pass-through and Quix join (fresh apps, topics
and consumer groups each); medians are compared.

quixstreams (3.28.1, the latest) requires ``confluent-kafka<2.13`` while abdag pins
2.16.1, so the Quix apps run under their own interpreter: ``--quix-python``, else
``$ABDAG_QUIX_PYTHON``, else this interpreter if it has quixstreams, else
``.venv-quix/bin/python``. Without one the bench says how to make it and exits 0 without
results. This module imports only the standard library at the top: the worker side
(``--worker``) runs in the Quix venv, which has neither abdag nor its pins.

Tansu: a stateful Quix app derives its changelog topic's config from the source topics'
``retention.ms`` / ``retention.bytes``, which Tansu reports only for topics created with
them, so the source topics are created with ``QUIX_SOURCE_CONFIG``.

Run: ``.venv/bin/python -m bench.quix_peer [--quick] [--n 20000] [--repeat 3]
[--quix-python PATH]``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench._ab import FraudStream
    from bench._harness import Outputs, Result, Stack, Workers

REPO = Path(__file__).resolve().parent.parent
QUIX_PIN = "quixstreams==3.28.1"
QUIX_VENV = REPO / ".venv-quix"
INSTALL_HINT = (
    f"quixstreams is not installed; it needs confluent-kafka<2.13 (abdag pins 2.16.1), so "
    f"give it its own venv: python3 -m venv .venv-quix && .venv-quix/bin/pip install "
    f"{QUIX_PIN} (or set ABDAG_QUIX_PYTHON to a python that has it)"
)
QUIX_SOURCE_CONFIG = {"retention.ms": "604800000", "retention.bytes": "-1"}
FIRST_MEASURED = "quix-peer first measured record at"
WARMUP = 200
POLL_TIMEOUT = 0.1  # Quix's default 1.0 stalls a finite backlog's tail (module docstring)
# Case names read by bench.run_all's peer section.
CASE_PASS = "Quix pass-through (to_topic, JSON in/out)"
CASE_PASS_WALL = "Quix pass-through, wall (first produce call -> last output)"
CASE_FAUST = "Faust pass-through, plain (bench.passthrough)"
CASE_JOIN = "Quix join (stateful apply, RocksDB + changelog)"


# -- the Quix apps (run under the Quix interpreter) --------------------------------------
def now_ms(*_: Any) -> int:
    return int(time.time() * 1000)


def quix_app(args: argparse.Namespace) -> None:
    from quixstreams import Application

    app = Application(
        broker_address=args.broker,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        state_dir=args.state_dir,
        loglevel="WARNING",
        consumer_poll_timeout=POLL_TIMEOUT,
    )
    out = app.topic(args.sink, key_serializer="bytes", value_serializer="json")
    topics = [
        app.topic(name, key_deserializer="bytes", value_deserializer="json")
        for name in args.source.split(",")
    ]
    if args.worker == "passthrough":
        sdf = app.dataframe(topics[0])
    else:
        sdf = app.dataframe(topics[0]).concat(app.dataframe(topics[1]))
        first: list[float] = []

        def join(value: dict, state: Any) -> dict | None:
            if not first and value["request_id"].startswith(args.measured):
                first.append(time.time())
                print(f"{FIRST_MEASURED} {first[0]!r}", flush=True)
            side = value["side"]
            other = "b" if side == "a" else "a"
            kept = state.get(other)
            if kept is None:
                state.set(side, {**value["prediction"], "request_ts": value["ts"]})
                return None
            state.delete(other)
            mine = {**value["prediction"], "request_ts": value["ts"]}
            return {"request_id": value["request_id"], side: mine, other: kept}

        sdf = sdf.apply(join, stateful=True).filter(lambda pair: pair is not None)
    sdf.set_timestamp(now_ms).to_topic(out)
    app.run()


# -- the driver (abdag's venv) ------------------------------------------------------------
def quix_python(explicit: str | None) -> str | None:
    """The interpreter that runs the Quix apps, or None when none has quixstreams."""
    candidates = [explicit, os.environ.get("ABDAG_QUIX_PYTHON")]
    if explicit or candidates[1]:
        return next(c for c in candidates if c)
    import importlib.util

    if importlib.util.find_spec("quixstreams") is not None:
        return sys.executable
    venv = QUIX_VENV / "bin" / "python"
    return str(venv) if venv.exists() else None


def quix_versions(python: str) -> dict[str, str]:
    """quixstreams and confluent-kafka versions under ``python`` (raises if it lacks them)."""
    code = (
        "import quixstreams, confluent_kafka; "
        "print(quixstreams.__version__, confluent_kafka.__version__)"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"quix_peer: {python} cannot import quixstreams ({tail})")
    quix, kafka = out.stdout.split()
    return {"quixstreams": quix, "confluent-kafka": kafka}


def create_source_topics(stack: Stack, names: list[str]) -> None:
    """Topics a Quix app reads, created with the retention configs Tansu must report."""
    from confluent_kafka.admin import NewTopic

    from abdag.topics.admin import admin_client
    from bench._harness import PARTITIONS

    admin = admin_client(stack.bootstrap)  # kept alive until the futures are done
    futures = admin.create_topics(
        [NewTopic(n, num_partitions=PARTITIONS, config=QUIX_SOURCE_CONFIG) for n in names]
    )
    for fut in futures.values():
        fut.result(timeout=10)


def start_quix(procs: Workers, python: str, args: list[str]) -> None:
    """``python -m bench.quix_peer --worker ...`` under the Quix interpreter, as one of
    ``procs`` (so it is stopped by PID and its peak memory read like any worker)."""
    log = procs.stack.work / f"{procs.name}-{len(procs.procs)}.log"
    with open(log, "ab") as fh:
        procs.procs.append(
            subprocess.Popen(
                [python, "-m", "bench.quix_peer", "--worker", *args],
                env={**procs.stack.env(), "PYTHONUNBUFFERED": "1"},
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO,
            )
        )
    procs.logs.append(log)


def prediction_record(stream: FraudStream, side: str, prefix: str, i: int) -> tuple[bytes, bytes]:
    """What model ``side`` sends for request ``<prefix><i>``: its prediction and the
    request's payload (as bench.comparison.node_records, in JSON)."""
    import orjson

    rid = f"{prefix}{i}"
    now = time.time()
    score = 0.1 + 0.8 * ((i * 7919) % 1000) / 1000 if side == "a" else 0.1 + (i % 800) / 1000
    pred = {
        "model": f"model_{side}",
        "version": "bench",
        "score": score,
        "label": int(score >= 0.5),
        "latency_ms": 0.2,
    }
    body = stream.bodies[i % len(stream.bodies)]
    value = {"request_id": rid, "ts": now, "side": side, "prediction": pred, "payload": body}
    return rid.encode(), orjson.dumps(value)


def passthrough_round(stack: Stack, python: str, stream: FraudStream, n: int) -> Any:
    from bench._harness import (
        PassThrough,
        Workers,
        create_topics,
        measure_topic_run,
        unique_name,
    )

    app_id = unique_name("quix-pt-")
    source, sink = f"bench.{app_id}.in", f"bench.{app_id}.out"
    create_source_topics(stack, [source])
    create_topics(stack, [sink])
    with Workers(stack, app_id) as procs:
        start_quix(procs, python, worker_args(stack, app_id, "passthrough", [source], sink))
        out = measure_topic_run(stack, procs, source, sink, stream.request, n, warmup=WARMUP)
        (peak,) = procs.stop()
    return PassThrough(out.rate(), out.wall_rate(), peak, out.duplicates)


def join_round(stack: Stack, python: str, stream: FraudStream, n: int) -> dict[str, float]:
    """One Quix join run: (pairs/s from the first measured record taken, pairs' span rate,
    wall rate, peak MiB, duplicates)."""
    from bench._harness import (
        MEASURED,
        WARM,
        Workers,
        create_topics,
        drain_timeout,
        produce,
        unique_name,
        wait_outputs,
    )

    app_id = unique_name("quix-join-")
    sources = [f"bench.{app_id}.a", f"bench.{app_id}.b"]
    sink = f"bench.{app_id}.pairs"
    create_source_topics(stack, sources)
    create_topics(stack, [sink])

    def both(prefix: str, count: int) -> None:
        for side, topic in zip("ab", sources, strict=True):
            produce(
                stack.bootstrap,
                topic,
                lambda i, s=side: prediction_record(stream, s, prefix, i),
                count,
            )

    def pairs(procs: Workers, prefix: str, count: int) -> Outputs:
        out = wait_outputs(
            stack, procs, sink, prefix=prefix.encode(), expect=count, timeout=drain_timeout(count)
        )
        if len(out) < count:
            raise RuntimeError(f"Quix join: {len(out)} of {count} pairs on {sink}")
        return out

    with Workers(stack, app_id) as procs:
        start_quix(procs, python, worker_args(stack, app_id, "join", sources, sink))
        both(WARM, WARMUP)
        pairs(procs, WARM, WARMUP)
        started = time.time()
        both(MEASURED, n)
        out = pairs(procs, MEASURED, n)
        (peak,) = procs.stop()
    log = procs.logs[0].read_text(errors="replace")
    found = re.findall(rf"{FIRST_MEASURED} ([0-9.]+)", log)
    if not found:
        raise RuntimeError(f"Quix join: no '{FIRST_MEASURED}' line in {procs.logs[0]}")
    last = max(out.ts.values())
    return {
        "rate": (n - 1) / max(last - float(found[0]), 1e-9),
        "span_rate": out.rate(),
        "wall_rate": n / max(last - started, 1e-9),
        "peak": peak,
        "duplicates": out.duplicates,
    }


def worker_args(stack: Stack, app_id: str, kind: str, sources: list[str], sink: str) -> list[str]:
    from bench._harness import MEASURED

    state = stack.work / f"{app_id}-state"
    base = [kind, "--broker", stack.bootstrap, "--group", app_id, "--source", ",".join(sources)]
    return [*base, "--sink", sink, "--state-dir", str(state), "--measured", MEASURED]


def notes(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def measure_all(args: argparse.Namespace, python: str, versions: dict[str, str]) -> Result:
    from bench._ab import FraudStream
    from bench._harness import Result, local_stack, median, passthrough_run, ratio, rounds

    res = Result(
        "quix_peer",
        f"Peer: Quix Streams {versions['quixstreams']} vs Faust pass-through, same broker",
        {
            "n": args.n,
            "warmup": WARMUP,
            "repeat": args.repeat,
            "quixstreams": versions["quixstreams"],
            "quix confluent-kafka": versions["confluent-kafka"],
            "quix consumer_poll_timeout": POLL_TIMEOUT,
            "quick": args.quick,
        },
    )
    print(f"quix peer bench: {res.params} (Quix apps run by {python})", flush=True)
    stream = FraudStream()
    quix, faust, joins = [], [], []
    with local_stack() as stack:
        for r in range(args.repeat):
            quix.append(passthrough_round(stack, python, stream, args.n))
            faust.append(passthrough_run(stack, stream.request, args.n, mode="plain"))
            joins.append(join_round(stack, python, stream, args.n))
            print(
                f"round {r + 1}/{args.repeat}: Quix pass-through {quix[-1].rate:,.0f} events/s, "
                f"Faust plain {faust[-1].rate:,.0f} events/s, "
                f"Quix join {joins[-1]['rate']:,.0f} pairs/s",
                flush=True,
            )

    sec = "pass-through (1 process each, 4 partitions, JSON request records)"
    q_rate = median([p.rate for p in quix])
    q_wall = median([p.wall_rate for p in quix])
    f_rate = median([p.rate for p in faust])
    f_wall = median([p.wall_rate for p in faust])
    peaks = ", ".join(f"{p.peak_mb:.0f}" for p in quix)
    res.add(
        sec,
        CASE_PASS,
        q_rate,
        "events/s",
        note=notes(f"peak RSS {peaks} MiB", rounds([p.rate for p in quix])),
    )
    res.add(sec, CASE_PASS_WALL, q_wall, "events/s", note=rounds([p.wall_rate for p in quix]))
    res.add(
        sec,
        CASE_FAUST,
        f_rate,
        "events/s",
        ratio=ratio(f_rate, q_rate),
        vs="Quix pass-through",
        note=notes(f"peak RSS {faust[0].peak_mb:.0f} MiB", rounds([p.rate for p in faust])),
    )
    res.add(
        sec,
        "Faust pass-through, plain, wall",
        f_wall,
        "events/s",
        ratio=ratio(f_wall, q_wall),
        vs="Quix pass-through, wall",
    )
    sec = "stateful join of A and B by request id (1 process, 2 source topics, pairs out)"
    j_rate = median([j["rate"] for j in joins])
    res.add(
        sec,
        CASE_JOIN,
        j_rate,
        "pairs/s",
        ratio=ratio(j_rate, q_rate),
        vs="Quix pass-through",
        note=notes(
            f"{args.n} pairs per run",
            f"peak RSS {joins[0]['peak']:.0f} MiB",
            rounds([j["rate"] for j in joins]),
        ),
    )
    res.add(
        sec,
        "Quix join, events in (A + B per pair)",
        2 * j_rate,
        "events/s",
        ratio=ratio(2 * j_rate, q_rate),
        vs="Quix pass-through",
    )
    res.add(
        sec,
        "Quix join, pairs' span only (B phase)",
        median([j["span_rate"] for j in joins]),
        "pairs/s",
        note="the A records, read first, are outside this span",
    )
    res.add(
        sec,
        "Quix join, wall (first produce call -> last pair)",
        median([j["wall_rate"] for j in joins]),
        "pairs/s",
    )
    dups = sum(p.duplicates for p in quix) + sum(int(j["duplicates"]) for j in joins)
    res.note(
        f"Quix apps: {QUIX_PIN.split('==')[0]} {versions['quixstreams']} with confluent-kafka "
        f"{versions['confluent-kafka']} in their own venv; output timestamps set to the "
        f"processing time before to_topic; re-delivered outputs: {dups}"
    )
    res.save(args.results)
    return res


def main(argv: list[str] | None = None) -> Result | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (noisy figures)")
    parser.add_argument("--n", type=int, default=None, help="measured records (20000)")
    parser.add_argument("--repeat", type=int, default=None, help="alternating rounds (3)")
    parser.add_argument("--quix-python", default=None, help="interpreter with quixstreams")
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--worker", choices=("passthrough", "join"), help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--group", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--sink", help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", help=argparse.SUPPRESS)
    parser.add_argument("--measured", default="m-", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        quix_app(args)
        return None
    python = quix_python(args.quix_python)
    if python is None:
        print(f"quix_peer: skipped: {INSTALL_HINT}", flush=True)
        return None
    versions = quix_versions(python)
    args.n = args.n or (5000 if args.quick else 20000)
    args.repeat = args.repeat or (1 if args.quick else 3)
    return measure_all(args, python, versions)


if __name__ == "__main__":
    main()
