"""Where a busy worker's CPU goes: the A/B DAG under load, sampled with py-spy.

One ``abdag worker`` on the fraud A/B DAG (``tests.experiments.COMPARE_DAG``: two small
TorchScript models, labels), warmed up, then ``--n`` requests and their labels produced
while py-spy samples the worker (``--rate`` samples/s, all threads, native frames off).
Prints the share of samples per area (the top frame's package: Faust and its Kafka
client, confluent-kafka, the event loop, JSON, torch, each abdag package) and the
functions with the most samples of their own, and writes the collapsed stacks to
``bench/results/profile_worker.txt`` (for flame graphs: ``flamegraph.pl`` or speedscope).
py-spy leaves out idle samples (a thread waiting in ``select``/``epoll`` or on a lock), so
the shares are of the time the worker spent working.

Run: ``.venv/bin/python -m bench.profile_worker [--n 20000] [--rate 250]``
(py-spy: ``pip install -e '.[bench]'``; it reads another process's memory, so it needs the
right to ptrace the worker: root, or ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench._ab import AbDag, FraudStream, measure, warm_up
from bench._harness import RESULTS_DIR, Workers, local_stack

AREAS = (
    # (area, what a frame's "(file:line)" starts with; first match wins)
    ("waiting in the event loop's select", ("(selectors.py",)),
    ("abdag.agents.faust_compat", ("(agents/faust_compat/",)),
    ("abdag.agents", ("(agents/",)),
    ("abdag.topics", ("(topics/",)),
    ("abdag.models", ("(models/",)),
    ("abdag.comparators", ("(comparators/",)),
    ("the DAG's inputs functions", ("(abdag/demo/", "(tests/")),
    ("faust / mode / aiokafka", ("(faust/", "(mode/", "(aiokafka/", "(kafka/")),
    ("confluent-kafka", ("(confluent_kafka/",)),
    ("torch", ("(torch/",)),
    ("river / numpy", ("(river/", "(numpy/")),
    ("asyncio", ("(asyncio/",)),
    ("logging", ("(logging/",)),
)


def area_of(frame: str) -> str:
    for area, keys in AREAS:
        if any(k in frame or frame.replace("(/", "(").find(k) >= 0 for k in keys):
            return area
    return "other (stdlib, JSON, ...)"


def summarise(collapsed: Path, top: int = 20) -> str:
    """Shares per area and the top functions by own samples, from py-spy's raw output."""
    by_area: collections.Counter[str] = collections.Counter()
    by_fn: collections.Counter[str] = collections.Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            leaf = stack.split(";")[-1]
            by_area[area_of(leaf)] += int(count)
            by_fn[leaf] += int(count)
    busy = sum(by_area.values())
    out = [f"busy samples: {busy}", "by area (the top frame's package):"]
    out += [f"  {n / max(busy, 1):6.1%}  {area}" for area, n in by_area.most_common()]
    out.append(f"top {top} functions by own samples:")
    out += [f"  {n / max(busy, 1):6.1%}  {fn}" for fn, n in by_fn.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="requests (and labels) produced")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 0
    from abdag.demo.fraud import train_models

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / "profile_worker.txt"
    with local_stack() as stack:
        models = train_models(stack.work / "models", seed=7)
        dag = AbDag.fraud(stack, models, "prof-")
        procs = Workers(stack, "prof")
        try:
            procs.start_abdag(dag.file)
            stream = FraudStream()
            warm_up(stack, procs, dag, stream)
            pid = procs.procs[0].pid
            spy_proc = subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--format", "raw"]
                + ["--output", str(out), "--threads", "--nonblocking"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
            run = measure(stack, procs, dag, stream, args.n, labels=True)
            spy_proc.send_signal(2)  # py-spy writes its output on SIGINT
            spy_proc.wait(timeout=60)
        finally:
            procs.stop()
    print(f"{args.n} requests in {run.wall_s:.1f} s ({run.wall_rate:,.0f} requests/s) under py-spy")
    print(summarise(out))
    print(f"collapsed stacks: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
