"""End-to-end: requests/s and latency of the A/B DAG, scale-out, and many experiments.

All on one private stack (bench._harness.local_stack), in one run:

1. **throughput**: one ``abdag worker`` on ``tests.experiments.COMPARE_DAG`` (two small
   TorchScript fraud models, labels produced before the requests). Requests/s =
   n / wall time from the first produce call until all n paired+labelled rows are visible
   in ClickHouse (polled every 0.25 s), so it includes the pipeline's fill and the pairs
   sink's batching. Against bench.passthrough (``plain``) on the same request bytes, in
   ``--repeat`` alternating rounds (a fresh worker each; default 3), medians compared like
   for like: wall against the pass-through's wall (first produce call -> last output
   record), and the pairs' ``paired_ts`` span against the span of the pass-through's
   outputs (start-up and tail left out of both). The A/B wall also covers producing the
   labels (as many again) and the ClickHouse sink's flush and the 0.25 s polls.
2. **latency**: the same warm worker; requests produced at fixed rates (``--rates``,
   default 50/s and 200/s) with ``ts`` set by the producer at send time, no labels.
   Latency per request = ``paired_ts - request_ts`` from ``pairs FINAL`` (produce -> pair
   emitted by the comparison node; the sink's batching, up to 0.5 s, comes after). p50 and
   p99 per rate.
3. **scale-out**: a model-bound A/B DAG (two MLPs ``in -> hidden -> hidden -> 1`` over
   ``--steps`` steps per request, bench.offline_torch.MLP, default 512-2048-2048-1 x 16
   steps; inputs picked by index from a fixed tensor, no labels) with
   1 worker, then 2 workers, unpinned and pinned to one core per worker (``--pin``). Each
   worker runs with ``OMP_NUM_THREADS=--threads`` (default 1: torch's own threads would
   otherwise take both cores for one model). Pairs/s = (n - 1) / span of ``paired_ts``,
   after warm-up rounds that show pairs from every worker (ClickHouse is polled every 2 s
   meanwhile, not every 0.25 s: on 2 cores the polls took CPU from the workers). Each
   model's offline rate (same threads, batch 64, bench.offline_torch.runner_throughput)
   and the rate of A then B on one core are printed to show how model-bound it is, and
   A then B offline in 1 and in 2 processes at once, one pinned per core: how far the
   machine itself scales this work (shared memory bandwidth and caches, a shared host),
   the ceiling for 2 workers against 1.
4. **many experiments**: a generated DAG with M comparisons of the same two small model
   nodes (no labels), M in ``--experiments`` (default 1,10,50): requests/s (wall, until all
   n x M pairs are visible), pair rows/s, the worker's peak RSS and its start-up time
   (worker start -> the first warm-up pairs of every experiment visible).

Peak RSS is VmHWM of each worker process. Run:
``.venv/bin/python -m bench.end_to_end [--quick] [--n 20000] [--repeat 3] [--rates 50,200]
[--duration 20] [--scale-n 3000] [--hidden 2048] [--steps 16] [--threads 1] [--pin both]
[--experiments 1,10,50] [--device auto] [--skip e2e,scale,many]``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from abdag.demo.fraud import train_models
from abdag.models import BatchRunner, load_model
from bench._ab import AbDag, FraudStream, IndexStream, measure, warm_up
from bench._harness import (
    CpuShare,
    Result,
    Stack,
    Workers,
    check_device,
    local_stack,
    median,
    passthrough_run,
    ratio,
    rounds,
    unique_name,
)
from bench.offline_torch import MLP, _save, item_shape, runner_throughput

BIG_AB_DAG = """
import torch
from abdag import Dag

X = torch.randn(64, *{shape}, generator=torch.Generator().manual_seed(0))


def features(event):
    return X[int(event.payload["i"]) % 64]


dag = Dag({name!r}, partitions=4)
tx = dag.source("tx", example={{"i": 0}})
a = dag.model("model_a", tx, path={a!r}, inputs=features, device={device!r}, max_batch=64,
              max_wait=0.05)
b = dag.model("model_b", tx, path={b!r}, inputs=features, device={device!r}, max_batch=64,
              max_wait=0.05)
dag.compare("ab", a=a, b=b, task="binary", join_timeout=30.0)
"""

MANY_DAG_HEAD = """
from abdag.demo.fraud import features_tensor
from abdag import Dag

dag = Dag({name!r}, partitions=4)
tx = dag.source("tx")


def features(event):
    return features_tensor(event.payload)


a = dag.model("model_a", tx, path={a!r}, inputs=features)
b = dag.model("model_b", tx, path={b!r}, inputs=features)
"""


def many_dag(path: Path, name: str, models: tuple[Path, Path], m: int) -> AbDag:
    """Write a DAG file with ``m`` comparisons ``ab0..ab{m-1}`` of the same two models."""
    lines = [MANY_DAG_HEAD.format(name=name, a=str(models[0]), b=str(models[1]))]
    names = [f"ab{i}" for i in range(m)]
    lines += [f'dag.compare("{c}", a=a, b=b, task="binary", join_timeout=30.0)' for c in names]
    path.write_text("\n".join(lines) + "\n")
    return AbDag(name, path, names, has_labels=False)


def throughput_and_latency(
    stack: Stack, models: tuple[Path, Path], args: argparse.Namespace, res: Result
) -> None:
    stream = FraudStream()
    runs, plains, plain_walls, peaks, lats = [], [], [], [], []
    for r in range(args.repeat):  # alternating rounds: this machine's speed drifts
        dag = AbDag.fraud(stack, models, f"e2e{r}-")
        with Workers(stack, dag.name) as procs:
            procs.start_abdag(dag.file)
            warm_up(stack, procs, dag, stream, count=args.warmup)
            runs.append(measure(stack, procs, dag, stream, args.n, labels=True))
            if r == 0:
                for k, rate in enumerate(args.rates):
                    count = int(rate * args.duration)
                    lats.append(
                        measure(
                            stack,
                            procs,
                            dag,
                            stream,
                            count,
                            labels=False,
                            rate=rate,
                            prefix=f"l{k}-",
                        )
                    )
            peaks += procs.stop()
        plain_run = passthrough_run(stack, stream.request, args.n, mode="plain")
        plains.append(plain_run.rate)
        plain_walls.append(plain_run.wall_rate)
        print(
            f"round {r + 1}/{args.repeat}: A/B DAG {runs[-1].wall_rate:,.0f} requests/s wall, "
            f"pass-through {plain_walls[-1]:,.0f} events/s wall",
            flush=True,
        )
    wall = median([run.wall_rate for run in runs])
    span = median([run.stats.rate for run in runs])
    plain, plain_wall = median(plains), median(plain_walls)

    sec = "throughput (1 worker, fraud A/B DAG, labels)"
    res.add(
        sec,
        "A/B DAG end to end (wall, until in ClickHouse)",
        wall,
        "requests/s",
        ratio=ratio(wall, plain_wall),
        vs="pass-through plain, wall",
        note=f"{args.n} requests per run; " + rounds([run.wall_rate for run in runs]),
    )
    res.add(
        sec,
        "A/B DAG pairs (paired_ts span)",
        span,
        "pairs/s",
        ratio=ratio(span, plain),
        vs="pass-through plain, span",
        note=rounds([run.stats.rate for run in runs]),
    )
    res.add(
        sec,
        "pass-through, plain, wall (first produce call -> last output)",
        plain_wall,
        "events/s",
        note=rounds(plain_walls),
    )
    res.add(sec, "pass-through, plain (outputs' span)", plain, "events/s", note=rounds(plains))
    res.add(sec, "A/B DAG worker peak RSS", max(peaks), "MiB")

    for rate, lat in zip(args.rates, lats, strict=True):
        sec = f"latency at {rate:g} requests/s for {args.duration:g} s (1 worker, no labels)"
        achieved = lat.requests / max(lat.wall_s, 1e-9)
        res.add(sec, "p50 produce -> pair", lat.stats.p50_ms, "ms")
        res.add(sec, "p99 produce -> pair", lat.stats.p99_ms, "ms")
        res.add(
            sec,
            "requests paired / wall (incl. drain)",
            achieved,
            "requests/s",
            note=f"{lat.stats.n} pairs; a backlog shows as p99 near the run length",
        )


def offline_rates(paths: tuple[Path, Path], args: argparse.Namespace) -> list[float]:
    """BatchRunner items/s of each model alone (same torch threads as a worker, batch 64)."""
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads or before)
    try:
        rates = []
        for path in paths:
            model = load_model(path, name="mlp", device=args.device)
            example = torch.randn(*item_shape(args.in_features, args.steps))
            runner = BatchRunner(model, None, "sigmoid")
            n = 320 if args.quick else 1280
            rates.append(runner_throughput(runner, 64, n, example, warmup=2))
    finally:
        torch.set_num_threads(before)
    return rates


def offline_per_core(
    stack: Stack, paths: tuple[Path, Path], args: argparse.Namespace, cores: int
) -> float:
    """Requests/s of A then B offline in ``cores`` processes at once, one pinned per core
    (bench.offline_torch --pair): how far the machine itself scales this model-bound work."""
    argv = ["--pair", *map(str, paths), "--in-features", str(args.in_features)]
    argv += ["--steps", str(args.steps)]
    argv += ["--threads", str(args.threads or 1), "--seconds", "3" if args.quick else "8"]
    with Workers(stack, unique_name(f"offline{cores}-")) as procs:
        for core in range(cores):
            procs.start_module(
                "bench.offline_torch", argv, cpu=core, OMP_NUM_THREADS=str(args.threads or 1)
            )
        outputs = procs.outputs(timeout=300)
    return sum(float(out.split("pair_rate")[-1]) for out in outputs)


def scale_out(stack: Stack, args: argparse.Namespace, res: Result) -> None:
    paths = []
    for k in (0, 1):
        torch.manual_seed(k)
        folder = stack.work / f"big{k}"
        folder.mkdir()
        example = torch.randn(*item_shape(args.in_features, args.steps))
        paths.append(
            _save(MLP(args.in_features, args.hidden).eval(), "torchscript", folder, example)
        )
    model_rates = offline_rates((paths[0], paths[1]), args)
    cores = min(2, os.cpu_count() or 1)
    machine = {k: offline_per_core(stack, (paths[0], paths[1]), args, k) for k in (1, cores)}
    serial = machine[1]  # A then B on one core
    stream = IndexStream(size=16)
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    title = (
        f"scale-out (model-bound A/B: 2 x MLP {args.in_features}-{args.hidden}-{args.hidden}-1"
        f"{f' over {args.steps} steps' if args.steps > 1 else ''}, "
        f"{args.threads or 'default'} torch thread(s) per model)"
    )
    for pin in args.pin_modes:
        sec = f"{title}, {'one core per worker (pinned)' if pin else 'unpinned'}"
        rates: dict[int, float] = {}
        per_core: dict[int, float] = {}
        for workers in (1, 2):
            name = unique_name(f"sc{workers}")
            file = stack.work / f"{name}.py"
            file.write_text(
                BIG_AB_DAG.format(
                    name=name,
                    shape=item_shape(args.in_features, args.steps),
                    a=str(paths[0]),
                    b=str(paths[1]),
                    device=args.device,
                )
            )
            dag = AbDag(name, file, ["ab"], has_labels=False)
            dag.create_topics(stack)
            with Workers(stack, dag.name) as procs:
                procs.start_abdag(dag.file, workers, pin=pin, **env)
                warm_up(stack, procs, dag, stream, count=args.warmup, workers=workers, labels=False)
                # pairs/s come from paired_ts, not wall time: poll rarely, leaving the
                # cores to the workers (polling every 0.25 s took ~7% of a core)
                with CpuShare(procs) as cpu:
                    run = measure(stack, procs, dag, stream, args.scale_n, labels=False, poll=2.0)
                peaks = procs.stop()
            rates[workers] = run.stats.rate
            first_pair = run.stats.last_ts - (run.stats.n - 1) / run.stats.rate
            cpu.between(first_pair, run.stats.last_ts)  # the measured span only
            per_core[workers] = run.stats.rate / cpu.cores
            res.add(
                sec,
                f"{workers} worker(s)",
                run.stats.rate,
                "pairs/s",
                ratio=ratio(run.stats.rate, rates[1]) if workers > 1 else None,
                vs="1 worker" if workers > 1 else None,
                note=f"pairs from {run.stats.workers} worker(s); peak RSS "
                + ", ".join(f"{p:.0f}" for p in peaks)
                + f" MiB; {cpu} (over the pairs' span)",
            )
            res.add(
                sec,
                f"{workers} worker(s): pairs/s per core the workers got",
                per_core[workers],
                "pairs/s",
                ratio=ratio(per_core[workers], per_core[1]) if workers > 1 else None,
                vs="1 worker" if workers > 1 else None,
                note=f"workers used {cpu.cores:.2f} cores",
            )
        res.add(
            sec,
            "offline: A then B on one core",
            serial,
            "requests/s",
            ratio=ratio(rates[1], serial),
            vs="(1 worker / this)",
            note="models A, B alone: " + ", ".join(f"{r:,.0f}" for r in model_rates) + " items/s",
        )
    sec = f"{title}: the machine alone (offline, A then B, one process pinned per core)"
    for k, rate in machine.items():
        res.add(
            sec,
            f"{k} process(es) at once",
            rate,
            "requests/s",
            ratio=ratio(rate, machine[1]) if k > 1 else None,
            vs="1 process" if k > 1 else None,
            note="no Kafka, Faust or ClickHouse: the ceiling for 2 workers against 1",
        )
    res.note(
        "scale-out: a worker runs model A and B in parallel executor threads, so one unpinned "
        "worker can already use 2 cores; on a 2-core machine (shared with the broker and "
        "ClickHouse) 2 workers cannot show 1.8x unpinned. The pinned case gives each worker "
        "one core (broker and ClickHouse float) to show how the worker design scales out; "
        "'pairs/s per core the workers got' divides by the CPU the workers used over the "
        "pairs' span, so it shows how the work scales apart from what the broker and "
        "ClickHouse took from the same cores."
    )


def many_experiments(
    stack: Stack, models: tuple[Path, Path], args: argparse.Namespace, res: Result
) -> None:
    stream = FraudStream()
    sec = "many experiments (1 worker, M comparisons of the same 2 small models, no labels)"
    base: float | None = None
    for m in args.experiments:
        name = unique_name(f"many{m}-")
        dag = many_dag(stack.work / f"{name}.py", name, models, m)
        dag.create_topics(stack)
        with Workers(stack, dag.name) as procs:
            started = time.monotonic()
            procs.start_abdag(dag.file)
            warm_up(stack, procs, dag, stream, count=args.many_warmup, labels=False)
            startup = time.monotonic() - started
            run = measure(stack, procs, dag, stream, args.many_n, labels=False)
            (peak,) = procs.stop()
        base = base or run.wall_rate
        res.add(
            sec,
            f"M={m}: requests/s (wall, all M pairs in ClickHouse)",
            run.wall_rate,
            "requests/s",
            ratio=ratio(run.wall_rate, base),
            vs=f"M={args.experiments[0]}",
            note=f"{run.stats.n} pair rows, {run.stats.n / run.wall_s:,.0f} rows/s",
        )
        res.add(sec, f"M={m}: worker peak RSS", peak, "MiB", note=f"start-up {startup:.1f} s")


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (noisy figures)")
    parser.add_argument("--n", type=int, default=None, help="throughput requests (20000)")
    parser.add_argument("--rates", default="50,200", help="latency runs, requests/s, comma-sep.")
    parser.add_argument("--duration", type=float, default=None, help="latency run seconds (20)")
    parser.add_argument("--scale-n", type=int, default=None, help="scale-out requests (3000)")
    parser.add_argument("--in-features", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=2048, help="scale-out MLP width")
    parser.add_argument("--steps", type=int, default=16, help="scale-out steps per request")
    parser.add_argument("--threads", type=int, default=1, help="torch threads/worker (0: default)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--pin", choices=("both", "no", "yes"), default="both", help="scale-out CPU pinning"
    )
    parser.add_argument("--experiments", default=None, help="M values, comma-separated (1,10,50)")
    parser.add_argument("--many-n", type=int, default=None, help="requests per M run (500)")
    parser.add_argument(
        "--repeat", type=int, default=None, help="alternating A/B / pass-through rounds (3)"
    )
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--many-warmup", type=int, default=20)
    parser.add_argument("--skip", default="", help="comma-separated: e2e,scale,many")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    q = args.quick
    args.n = args.n or (600 if q else 20000)
    args.repeat = args.repeat or (1 if q else 3)
    args.duration = args.duration or (3.0 if q else 20.0)
    args.scale_n = args.scale_n or (300 if q else 3000)
    args.many_n = args.many_n or (200 if q else 500)
    args.experiments = [
        int(x) for x in (args.experiments or ("1,3" if q else "1,10,50")).split(",")
    ]
    args.rates = [float(x) for x in args.rates.split(",")]
    args.pin_modes = {"both": [False, True], "no": [False], "yes": [True]}[args.pin]
    skip = set(filter(None, args.skip.split(",")))

    res = Result(
        "end_to_end",
        "End to end: A/B DAG throughput and latency, scale-out, many experiments",
        {
            k: getattr(args, k)
            for k in (
                "n",
                "repeat",
                "rates",
                "duration",
                "scale_n",
                "in_features",
                "hidden",
                "steps",
                "threads",
                "device",
                "pin",
                "experiments",
                "many_n",
                "quick",
            )
        },
    )
    print(f"end-to-end bench: {res.params}", flush=True)
    with local_stack() as stack:
        models = train_models(stack.work / "models", seed=7)
        if "e2e" not in skip:
            throughput_and_latency(stack, models, args, res)
        if "scale" not in skip:
            scale_out(stack, args, res)
        if "many" not in skip:
            many_experiments(stack, models, args, res)
    res.save(args.results)
    return res


if __name__ == "__main__":
    main()
