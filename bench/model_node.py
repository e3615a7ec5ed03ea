"""A model node's throughput against the same model offline, and against a plain Faust agent.

Three figures, taken in one run on one private stack (bench._harness.local_stack):

1. **offline torch**: the same TorchScript file loaded with ``models.load_model`` and
   called in a tight loop at the node's batch size, via ``bench.offline_torch``:
   ``forward`` (``LoadedModel.__call__``) and ``runner`` (``BatchRunner.run`` on per-item
   tensors, what the node calls per batch). Taken before the first node run and after
   each one; the medians are compared (this machine's speed drifts by 10-15% from one
   minute to the next, so node and offline runs alternate, ``--repeat`` rounds).
2. **model node**: in each round a fresh ``abdag worker`` on a DAG with one model node
   (``max_batch`` = ``--batch``). The measured events are pre-built abdag events written
   straight to the source node's topic (``abdag.<dag>.tx``), so the worker's source agent
   is idle and only the model node works: decode, build the input, batch, infer in the
   executor thread, encode, send. The event payload is just an index; the input builder
   picks a row of a fixed random matrix, so the model's cost, not JSON parsing of 512
   floats, is measured.
3. **pass-through**: ``bench.passthrough`` (consume raw, send raw, same Faust settings as
   ``abdag.agents.config.faust_settings``) on the same input bytes, in ``plain`` and ``batched``
   forms: the ceiling Faust itself puts on any node on this machine.

Throughput = (n - 1) / (t_last - t_first) over the output records' timestamps, after a
warm-up (see bench/_harness.py). The model is an MLP ``in -> hidden -> hidden -> 1``
(bench.offline_torch.MLP), default 512-8192-8192-1. The node is model-bound only when the
offline rate is well below the pass-through rate: the ``offline / pass-through`` ratio is
printed to say how model-bound the case is. (On a 2-core AMD EPYC, 512-2048-2048-1 runs at
~5,500 items/s offline at batch 64, faster than Faust passes events through, so it is not
model-bound there; 8192 wide runs at ~450 items/s. On a GPU every width here is Faust-bound.)

``--torch-threads N`` gives torch N CPU threads on both sides (offline, and the worker via
``ABDAG_TORCH_THREADS``): with every core given to torch, the worker's event loop and the
model take turns; with one core left free they overlap.

Run: ``.venv/bin/python -m bench.model_node [--quick] [--n 10000] [--batch 64]
[--device auto|cpu|cuda] [--hidden 2048] [--torch-threads N] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import torch

from abdag.agents.loader import load_dag
from abdag.agents.topology import dag_topics
from abdag.models import BatchRunner, apply_cpu_threads, load_model
from abdag.topics import Event, encode, node_topic
from bench._harness import (
    MakeRecord,
    Result,
    Stack,
    Workers,
    check_device,
    create_topics,
    local_stack,
    measure_topic_run,
    median,
    passthrough_run,
    ratio,
    rounds,
    unique_name,
)
from bench.offline_torch import MLP, _save, offline_throughput, runner_throughput

DAG = """
import torch
from abdag import Dag

X = torch.randn({rows}, {features}, generator=torch.Generator().manual_seed(0))


def features(event):
    return X[int(event.payload["i"]) % {rows}]


dag = Dag({name!r}, partitions=4)
tx = dag.source("tx", example={{"i": 0}})
dag.model(
    "mlp", tx, path={path!r}, inputs=features, output="sigmoid", device={device!r},
    max_batch={batch}, max_wait={wait},
)
"""


def event_records(ts: float | None = None) -> MakeRecord:
    """abdag events with payload ``{"i": i}`` keyed by request id ``<prefix><i>``."""

    def make(prefix: str, i: int) -> tuple[bytes, bytes]:
        rid = f"{prefix}{i}"
        ev = Event(request_id=rid, ts=ts if ts is not None else time.time(), payload={"i": i})
        return rid.encode(), encode(ev)

    return make


def offline(path: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(forward items/s, runner items/s) at ``args.batch`` for the saved model."""
    model = load_model(path, name="mlp", device=args.device)
    runner = BatchRunner(model, None, "sigmoid")
    example = torch.randn(args.in_features)
    n = max(args.n, args.batch * 20)
    return (
        offline_throughput(model, args.batch, n, example),
        runner_throughput(runner, args.batch, n, example),
    )


@dataclass(frozen=True)
class NodeRun:
    """One model node run.

    ``inside`` and ``busy`` come from the outputs: the events of a batch share its publish
    time and its inference time (``latency_ms``). ``inside`` = items / summed inference time:
    the model's own speed inside the worker; against the offline rate it shows how much the
    model itself was slowed (cores shared with the event loop, the broker, ClickHouse).
    ``busy`` = summed inference time / the span from the first inference's start to the last
    batch's publish time: how much of the time the model ran at all (the node's plumbing
    keeps it fed when this is near 1)."""

    rate: float  # events/s
    mean_batch: float
    peak_mb: float
    duplicates: int
    inside: float  # items/s while inferring
    busy: float  # share of the span


def node_run(stack: Stack, path: Path, args: argparse.Namespace) -> NodeRun:
    """One ``abdag worker`` running the model node on ``args.n`` backlogged events."""
    name = unique_name("mn")
    dag_file = stack.work / f"{name}.py"
    dag_file.write_text(
        DAG.format(
            name=name,
            rows=1024,
            features=args.in_features,
            path=str(path),
            device=args.device,
            batch=args.batch,
            wait=args.max_wait,
        )
    )
    create_topics(stack, dag_topics(load_dag(dag_file)))
    source, sink = node_topic(name, "tx"), node_topic(name, "mlp")
    with Workers(stack, name) as procs:
        threads = (
            {} if args.torch_threads is None else {"ABDAG_TORCH_THREADS": str(args.torch_threads)}
        )
        procs.start_abdag(dag_file, **threads)
        out = measure_topic_run(
            stack,
            procs,
            source,
            sink,
            event_records(),
            args.n,
            warmup=args.warmup,
            keep_values=True,
        )
        (peak,) = procs.stop()
    preds = [orjson.loads(v)["outputs"]["mlp"] for v in out.values.values()]
    sizes = [p["batch_size"] for p in preds]
    batches = {(p["ts"], p["worker"]): (p["latency_ms"], p["batch_size"]) for p in preds}
    busy_s = sum(ms for ms, _ in batches.values()) / 1000.0
    items = sum(size for _, size in batches.values())
    # from the first batch's inference start (its publish time less its inference time)
    first_ts, first_ms = min((ts, ms) for (ts, _), (ms, _) in batches.items())
    span = max(p["ts"] for p in preds) - (first_ts - first_ms / 1000.0)
    return NodeRun(
        rate=out.rate(),
        mean_batch=statistics.fmean(sizes),
        peak_mb=peak,
        duplicates=out.duplicates,
        inside=items / busy_s if busy_s else 0.0,
        busy=busy_s / span if span else 0.0,
    )


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (noisy figures)")
    parser.add_argument("--n", type=int, default=None, help="measured events (default 10000)")
    parser.add_argument("--batch", type=int, default=64, help="node max_batch = offline batch")
    parser.add_argument("--max-wait", type=float, default=0.05, help="node max_wait, seconds")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--in-features", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=8192, help="MLP width (see docstring)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch CPU threads offline and in the worker (ABDAG_TORCH_THREADS); "
        "default torch's own, one per core",
    )
    parser.add_argument("--warmup", type=int, default=None, help="warm-up events")
    parser.add_argument(
        "--repeat", type=int, default=None, help="node rounds between offline runs (3)"
    )
    parser.add_argument("--results", type=Path, default=None, help="results JSON path")
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    args.n = args.n or (1000 if args.quick else 10_000)
    args.warmup = args.warmup or max(4 * args.batch, 200)
    args.repeat = args.repeat or (1 if args.quick else 3)

    torch.manual_seed(0)
    apply_cpu_threads(args.torch_threads)
    title = "Model node vs offline torch vs Faust pass-through"
    if args.torch_threads is not None:
        title += f" (torch threads: {args.torch_threads} on both sides)"
    res = Result(
        "model_node",
        title,
        {
            "n": args.n,
            "batch": args.batch,
            "max_wait": args.max_wait,
            "device": args.device,
            "model": f"MLP {args.in_features}-{args.hidden}-{args.hidden}-1 (TorchScript)",
            "torch_threads": torch.get_num_threads(),
            "repeat": args.repeat,
            "quick": args.quick,
        },
    )
    print(f"model node bench: {res.params}", flush=True)
    with local_stack() as stack:
        example = torch.randn(args.in_features)
        path = _save(MLP(args.in_features, args.hidden).eval(), "torchscript", stack.work, example)
        offlines = [offline(path, args)]
        nodes: list[NodeRun] = []
        for r in range(args.repeat):
            nodes.append(node_run(stack, path, args))
            offlines.append(offline(path, args))
            print(
                f"round {r + 1}/{args.repeat}: node {nodes[-1].rate:,.0f} events/s, "
                f"offline runner {offlines[-2][1]:,.0f} -> {offlines[-1][1]:,.0f} items/s",
                flush=True,
            )
        make = event_records()
        plain = passthrough_run(stack, make, args.n, mode="plain")
        batched = passthrough_run(stack, make, args.n, mode="batched")

    fwd, run = median([f for f, _ in offlines]), median([r for _, r in offlines])
    rate, inside = median([n.rate for n in nodes]), median([n.inside for n in nodes])
    busy = median([n.busy for n in nodes])
    sec = "throughput"
    res.add(sec, "offline torch forward", fwd, "items/s", note=rounds([f for f, _ in offlines]))
    res.add(sec, "offline BatchRunner.run", run, "items/s", note=rounds([r for _, r in offlines]))
    res.add(
        sec,
        "model node (abdag worker)",
        rate,
        "events/s",
        ratio=ratio(rate, run),
        vs="offline runner",
        note="; ".join(
            part
            for part in (
                f"mean batch {median([n.mean_batch for n in nodes]):.1f}",
                f"re-delivered {sum(n.duplicates for n in nodes)}",
                rounds([n.rate for n in nodes]),
            )
            if part
        ),
    )
    res.add(sec, "model node", rate, "events/s", ratio=ratio(rate, fwd), vs="offline forward")
    res.add(
        sec,
        "the model inside the node (inference time only)",
        inside,
        "items/s",
        ratio=ratio(inside, run),
        vs="offline runner",
        note=f"model busy {busy:.0%} of the span",
    )
    res.add(
        sec, "pass-through, plain", plain.rate, "events/s", note=f"peak {plain.peak_mb:.0f} MiB"
    )
    res.add(
        sec,
        "pass-through, batched (take+gather)",
        batched.rate,
        "events/s",
        note=f"peak {batched.peak_mb:.0f} MiB",
    )
    res.add(sec, "model node", rate, "events/s", ratio=ratio(rate, plain.rate), vs="pass-through")
    res.add(
        sec,
        "offline runner (model-boundness)",
        run,
        "items/s",
        ratio=ratio(run, plain.rate),
        vs="pass-through",
        note="model-bound (<< 1)"
        if (ratio(run, plain.rate) or 1) < 0.3
        else "NOT model-bound: Faust bounds the node",
    )
    res.add("memory", "model node worker peak RSS", max(n.peak_mb for n in nodes), "MiB")
    target = ratio(rate, run)
    if target is not None:
        res.note(
            f"model node / offline runner = {target:.2f} (target >= 0.9 in the model-bound case)"
        )
    res.save(args.results)
    return res


if __name__ == "__main__":
    main()
