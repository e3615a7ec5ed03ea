"""Paired comparisons per second of one worker, against Faust's and Kafka's own rates, and
the ClickHouse sink against a raw insert.

Figures, all from one run on one private stack (bench._harness.local_stack):

* **full A/B DAG**: one ``abdag worker`` on ``tests.experiments.COMPARE_DAG`` (source,
  labels, two small TorchScript fraud models, comparison ``ab`` with a join table, pairs
  and snapshot sinks). Labels are produced first, then the requests, in one burst.
  Pairs/s = (n - 1) / span of ``paired_ts`` over the n stage-3 (paired + labelled) rows in
  ``pairs FINAL``: the whole DAG's rate, every agent sharing one process (the labels,
  read first, are mostly outside that span; bench.end_to_end's wall rate includes them).
* **comparison node alone**: the same worker; abdag events carrying model A's (resp. B's)
  prediction and the labels are written straight to the node topics the join reads
  (``abdag.<dag>.model_a`` / ``model_b`` / ``labels``), in packs of 100 as the model and
  label nodes send them under load (abdag.topics.packs), so only the join agent and the
  ClickHouse sinks work. Pairs/s = (n - 1) / (newest ``paired_ts`` - the join table's
  first changelog record of a measured request), so reading the labels and A outputs
  counts (see :func:`join_only`). Each pair is three events in (A, B, label), against one
  in and one out for a pass-through: the bench also prints the join's events in per
  second (3 x pairs/s) against the pass-through's.
* **pass-through**: bench.passthrough (same Faust settings) on the same request bytes:
  ``plain`` (await send per event), ``batched`` (take 500 + asyncio.gather of the sends,
  the form abdag's agents use) and ``take+sequential`` (take 500, then await each send in
  turn). Events/s = (n - 1) / span of the output records' Kafka timestamps.
* **raw consume**: a confluent-kafka consumer reading 50,000 request records (the same
  bytes) from the start of a topic: records / wall time from the first batch received to
  the last record.
* **sink**: ``abdag.comparators.sink.ClickHouseSink.write`` of N pair rows (built with
  ``abdag.comparators.rows.pair_row`` / ``to_insert_values`` from real ``PairJoin`` emissions) in
  batches of 5000 (the pairs sink agent's ``take(5000)``), after one 1-row write that
  connects and runs ``ensure_schema`` (a worker pays that once), against
  ``clickhouse_connect`` ``client.insert`` of the same rows and batches with one insert
  context made beforehand (as the sink does: without it the client asks the column types
  before every insert); median of 3 alternating repetitions, rows / wall seconds.

The join and the pass-throughs run in ``--repeat`` alternating rounds (a fresh worker each
round; the full DAG in the first) and the medians are compared: this machine's speed drifts
by tens of percent within minutes, and one pair of runs moved the ratio from 0.28 to 0.48.

Run: ``.venv/bin/python -m bench.comparison [--quick] [--n 5000] [--sink-rows 50000]
[--repeat 3]``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import orjson

from abdag.agents.dag import Comparison
from abdag.comparators.join import PairJoin
from abdag.comparators.rows import PAIR_COLUMNS, pair_row, to_insert_values
from abdag.comparators.schema import ensure_schema
from abdag.comparators.sink import ClickHouseSink
from abdag.demo.fraud import train_models
from abdag.topics import Event, Label, Prediction, encode, node_topic
from bench._ab import AbDag, FraudStream, measure, warm_up
from bench._harness import (
    Result,
    Stack,
    Workers,
    create_topics,
    drain_timeout,
    local_stack,
    median,
    pair_stats,
    produce,
    produce_packs,
    ratio,
    raw_consume_rate,
    read_outputs,
    rounds,
    wait_pairs,
)
from bench._harness import passthrough_run as _passthrough_run

SINK_BATCH = 5000
RAW_CONSUME_RECORDS = 50_000


def node_records(stream: FraudStream, side: str, prefix: str, i: int) -> tuple[bytes, bytes]:
    """What model node ``model_<side>`` publishes for request ``<prefix><i>``."""
    rid = f"{prefix}{i}"
    now = time.time()
    score = 0.1 + 0.8 * ((i * 7919) % 1000) / 1000 if side == "a" else 0.1 + (i % 800) / 1000
    pred = Prediction(
        model=f"model_{side}",
        version="bench",
        output=score,
        score=score,
        label=int(score >= 0.5),
        latency_ms=0.2,
        worker="bench",
        batch_size=64,
        ts=now,
    )
    body = stream.bodies[i % len(stream.bodies)]
    ev = Event(request_id=rid, ts=now, payload=dict(body), outputs={f"model_{side}": asdict(pred)})
    return rid.encode(), encode(ev)


def join_only(
    stack: Stack, procs: Workers, dag: AbDag, stream: FraudStream, n: int, prefix: str = "j-"
) -> tuple[float, float]:
    """(pairs/s, wall s) with only the comparison node at work.

    Pairs/s = (n - 1) / (newest paired_ts - the first changelog record of a measured
    request): from the join's first flushed batch to its last pair, so the labels and the
    A outputs count as work too. (A paired_ts span alone counts only the B phase when the
    worker happens to read labels and A's first: up to 3x too high, 1.8k-4.8k across rounds.)
    """
    started = time.monotonic()
    produce_packs(
        stack.bootstrap,
        node_topic(dag.name, "labels"),
        lambda i: (
            f"{prefix}{i}".encode(),
            encode(
                Label(f"{prefix}{i}", float(stream.labels[i % len(stream.labels)]), time.time())
            ),
        ),
        n,
    )
    for side in ("a", "b"):
        produce_packs(
            stack.bootstrap,
            node_topic(dag.name, f"model_{side}"),
            lambda i, s=side: node_records(stream, s, prefix, i),
            n,
        )
    seen, at = wait_pairs(
        stack, dag.experiments, prefix, n, stage=3, timeout=drain_timeout(n, 20), procs=procs
    )
    if seen < n:
        raise RuntimeError(f"join only: {seen} of {n} pairs")
    changelog = read_outputs(
        stack.bootstrap,
        f"abdag-{dag.name}-ab-join-changelog",
        prefix=prefix.encode(),
        expect=n,
        timeout=30,
    )
    first = min(changelog.ts.values())
    last = pair_stats(stack, dag.experiments, prefix).last_ts
    return (n - 1) / (last - first), at - started


def sink_rows(n: int, experiment: str) -> list[list]:
    """``n`` pairs rows as the comparison node builds them (stage 3, paired)."""
    node = Comparison("ab", ("model_a", "model_b", "labels"), a="model_a", b="model_b")
    join = PairJoin(join_timeout=30, label_timeout=3600, store={})
    rows = []
    now = time.time()
    for i in range(n):
        rid = f"s-{i}"
        for side, score in (("a", 0.3), ("b", 0.6)):
            pred = {"score": score, "label": int(score >= 0.5), "version": "v1", "latency_ms": 0.5}
            emitted = join.offer_prediction(side, rid, {**pred, "request_ts": now}, now)
        emitted = join.offer_label(rid, float(i % 2), now, now) or emitted
        row = pair_row(experiment, node, emitted, i % 4, "bench", now)
        rows.append(to_insert_values(orjson.loads(orjson.dumps(row))))
    return rows


def sink_bench(stack: Stack, n: int, reps: int = 3) -> tuple[float, float]:
    """(ClickHouseSink rows/s, raw client.insert rows/s), medians of ``reps``."""
    client = stack.clickhouse()
    ensure_schema(client)
    sink_times, raw_times = [], []
    for r in range(reps):
        sink = ClickHouseSink(
            stack.clickhouse, "pairs", PAIR_COLUMNS, on_connect=ensure_schema, max_backoff=1
        )
        # connect + ensure_schema happen at the first write; a worker pays them once
        sink.write(sink_rows(1, f"bench.sink{r}.first"))
        rows = sink_rows(n, f"bench.sink{r}")
        start = time.perf_counter()
        for k in range(0, n, SINK_BATCH):
            if sink.write(rows[k : k + SINK_BATCH]):
                raise RuntimeError("ClickHouse refused sink rows")
        sink_times.append(time.perf_counter() - start)

        rows = sink_rows(n, f"bench.raw{r}")
        raw = stack.clickhouse()
        context = raw.create_insert_context("pairs", column_names=PAIR_COLUMNS)
        start = time.perf_counter()
        for k in range(0, n, SINK_BATCH):
            raw.insert(data=rows[k : k + SINK_BATCH], context=context)
        raw_times.append(time.perf_counter() - start)
    return n / median(sink_times), n / median(raw_times)


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (noisy figures)")
    parser.add_argument("--n", type=int, default=None, help="measured requests (default 5000)")
    parser.add_argument("--sink-rows", type=int, default=None, help="default 50000")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument(
        "--repeat", type=int, default=None, help="alternating join/pass-through rounds (3)"
    )
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args(argv)
    n = args.n or (600 if args.quick else 5000)
    sink_n = args.sink_rows or (5000 if args.quick else 50_000)
    repeat = args.repeat or (1 if args.quick else 3)
    res = Result(
        "comparison",
        "Comparison node vs pass-through vs raw consume; ClickHouse sink vs raw insert",
        {
            "n": n,
            "sink_rows": sink_n,
            "sink_batch": SINK_BATCH,
            "repeat": repeat,
            "quick": args.quick,
        },
    )
    print(f"comparison bench: {res.params}", flush=True)
    stream = FraudStream()
    joins: list[float] = []
    peaks: list[float] = []
    runs: dict[str, list[float]] = {"plain": [], "batched": [], "take_seq": []}
    with local_stack() as stack:
        models = train_models(stack.work / "models", seed=7)
        for r in range(repeat):
            # a fresh worker and DAG per round, stopped before the pass-throughs run
            dag = AbDag.fraud(stack, models, "cmp")
            with Workers(stack, dag.name) as procs:
                procs.start_abdag(dag.file)
                warm_up(stack, procs, dag, stream, count=args.warmup)
                if r == 0:
                    full = measure(stack, procs, dag, stream, n, labels=True)
                joins.append(join_only(stack, procs, dag, stream, n)[0])
                peaks.append(procs.stop()[0])
            for mode in ("plain", "batched") if r else runs:
                runs[mode].append(_passthrough_run(stack, stream.request, n, mode=mode).rate)
            print(
                f"round {r + 1}/{repeat}: join {joins[-1]:,.0f} pairs/s, pass-through "
                f"plain {runs['plain'][-1]:,.0f} events/s",
                flush=True,
            )
        raw_topic = f"bench.{dag.name}.raw"
        create_topics(stack, [raw_topic])
        raw_n = max(n, RAW_CONSUME_RECORDS)
        produce(stack.bootstrap, raw_topic, lambda i: stream.request("r-", i), raw_n)
        raw = raw_consume_rate(stack.bootstrap, raw_topic, raw_n)
        sink_rate, raw_insert = sink_bench(stack, sink_n)

    join_rate, peak = median(joins), peaks[0]
    passes = {mode: median(rates) for mode, rates in runs.items()}
    plain = passes["plain"]
    sec = "comparison node (1 worker)"
    res.add(
        sec,
        "full A/B DAG, paired+labelled",
        full.stats.rate,
        "pairs/s",
        ratio=ratio(full.stats.rate, plain),
        vs="pass-through plain",
        note=f"{full.stats.n} pairs",
    )
    res.add(
        sec,
        "comparison node alone (join + sinks)",
        join_rate,
        "pairs/s",
        ratio=ratio(join_rate, plain),
        vs="pass-through plain",
    )
    res.add(
        sec,
        "comparison node alone",
        join_rate,
        "pairs/s",
        ratio=ratio(join_rate, passes["batched"]),
        vs="pass-through batched",
        note=rounds(joins),
    )
    res.add(
        sec,
        "comparison node alone, events in (A + B + label per pair)",
        3 * join_rate,
        "events/s",
        ratio=ratio(3 * join_rate, passes["batched"]),
        vs="pass-through batched",
    )
    labels = {"plain": "plain", "batched": "batched (take+gather)", "take_seq": "take+sequential"}
    for mode, rate in passes.items():
        res.add(
            sec,
            f"pass-through, {labels[mode]}",
            rate,
            "events/s",
            ratio=ratio(rate, raw),
            vs="raw consume",
            note=rounds(runs[mode]),
        )
    res.add(sec, "raw consume (confluent-kafka)", raw, "records/s")
    res.add(sec, "full DAG worker peak RSS", peak, "MiB")
    res.add(
        "ClickHouse sink",
        f"ClickHouseSink.write ({SINK_BATCH}-row batches)",
        sink_rate,
        "rows/s",
        ratio=ratio(sink_rate, raw_insert),
        vs="raw insert",
    )
    res.add(
        "ClickHouse sink",
        "clickhouse-connect client.insert (one insert context)",
        raw_insert,
        "rows/s",
    )
    r = ratio(join_rate, plain)
    if r is not None:
        res.note(f"comparison node alone / pass-through plain = {r:.2f} (goal >= 0.5)")
    res.save(args.results)
    return res


if __name__ == "__main__":
    main()
