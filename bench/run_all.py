"""Run every abdag benchmark and write ``docs/benchmarks.md``.

Each benchmark runs as its own process (``python -m bench.<name>``, its own private
stack) and saves its figures as JSON under ``bench/results/``; this script then renders
one Markdown table per benchmark section with the figures, the ratios measured in the same
run, the machine (CPU model, cores, RAM, Python/torch versions, GPU if any), the date and
the exact commands.

The peer, Quix Streams (bench.quix_peer), runs under its own interpreter (quixstreams needs
an older confluent-kafka than abdag pins); without one it prints how to make it and is
skipped. Its section is followed by the ratios of abdag's and Faust's figures of the same
run to Quix's ("not run" where a bench's figure is missing).

Run: ``.venv/bin/python -m bench.run_all [--quick]
[--only model_node,model_node_1thread,comparison,end_to_end,quix_peer]
[--device auto|cpu|cuda] [--render-only]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._harness import REPO, RESULTS_DIR, check_device, command_line, fmt, fmt_ratio
from bench.quix_peer import CASE_FAUST, CASE_JOIN, CASE_PASS, CASE_PASS_WALL, INSTALL_HINT

BENCHES = ("model_node", "model_node_1thread", "comparison", "end_to_end", "quix_peer")
VARIANTS = {"model_node_1thread": ("model_node", ["--torch-threads", "1"])}
"""Benchmarks run as another one with extra arguments: (module, arguments)."""
DOC = REPO / "docs" / "benchmarks.md"
PEER = "quix_peer"
PEER_RATIOS = (
    (
        "abdag A/B DAG end to end (wall) / Quix pass-through (wall)",
        ("end_to_end", "A/B DAG end to end (wall, until in ClickHouse)"),
        (PEER, CASE_PASS_WALL),
    ),
    (
        "abdag comparison node alone (join + sinks) / Quix join",
        ("comparison", "comparison node alone (join + sinks)"),
        (PEER, CASE_JOIN),
    ),
    ("Faust pass-through, plain / Quix pass-through", (PEER, CASE_FAUST), (PEER, CASE_PASS)),
)
"""The peer section: (what, numerator (bench, case), denominator (bench, case))."""
PEER_TEXT = """\
Ratios of this run's figures to the Quix Streams peer's. Each bench has its own private stack
(the same Tansu broker and ClickHouse endpoint, one bench after another); the Faust
pass-through ran in the peer bench's own rounds, on its stack. The end-to-end figure is wall
time until the pairs are in ClickHouse (and covers the labels, as many records again, and
the ClickHouse sink), against the Quix pass-through's wall time (first produce call -> last
output). The comparison node reads A, B and labels in packs of 100 and writes pairs and
snapshots to ClickHouse; the Quix join reads A and B as one JSON record per request and
writes pairs to a topic.
"""

METHOD = """\
How the figures are taken (details in each script's docstring and `bench/_harness.py`):

- Every run starts its own stack (Tansu broker + ClickHouse endpoint on free ports in a
  temp dir) and real `abdag worker` processes; workers are warmed up (warm-up events go
  through first, and with several workers until outputs come from each) before measuring.
- **Throughput** of a backlog: the measured events are produced in one burst and
  **events/s = (n - 1) / (t_last - t_first)** over the n distinct outputs, with t the
  output record's Kafka timestamp (stamped by the worker's producer) or, for pairs,
  `paired_ts` in ClickHouse (`pairs FINAL`). Start-up and the drain tail are excluded.
- **End-to-end** requests/s use wall time: first produce call until every expected pair is
  visible in ClickHouse (polled every 0.25 s), over 20,000 requests (5,000 before
  2026-11-23 17:30: start and drain, ~0.8 s, weighed more), in 3 rounds alternating with
  the pass-through (a fresh worker each), medians compared. Since 2026-11-23 19:30 against
  the pass-through's own wall time (first produce call -> last output); before, against
  its outputs' span, which leaves its start and tail out (a stricter comparison).
- **Latency** = `paired_ts - request_ts` per request, `request_ts` being the `ts` the
  producer put in the event at send time; request i is sent at `start + i / rate`
  (`abdag.topics.producer.pace`; runs before 2026-11-23 09:00 were sent faster than their rate).
- **Peak RSS** = `VmHWM` of the worker process from `/proc/<pid>/status`.
- Between nodes, records travel in packs (`abdag.topics.packs`, since 2026-11-23 11:40: one
  record per partition and batch, not per request); the comparison node alone is fed
  packs of 100 as the model nodes send them under load. Earlier figures had one record
  per request on every topic.
- Workers (and the pass-through) run with the worker's interpreter settings
  (`abdag.agents.config.tune_interpreter`): since 2026-11-23 17:30 these include fewer
  garbage collections, which took ~11% of a busy worker's CPU.
- **Scale-out** (since 2026-11-23 19:00) runs two MLPs 512-2048-2048-1 over 16 steps per
  request: compute-bound, the machine alone scales it ~1.95x on 2 cores. Before, two MLPs
  512-8192-8192-1 read 272 MB of weights per batch and waited on memory: the machine
  alone scaled them only 1.67-1.81x, which capped what 2 workers could show.
- **Sink** baseline (since 2026-11-23 19:00): `client.insert` with one insert context made
  beforehand, as the sink does since then (without it the client asks the column types
  before every insert).
- Ratios are between figures of the same run. The broker, ClickHouse, the workers and the
  bench driver share the machine's cores, so absolute figures are machine-bound.
"""


def run(bench: str, args: argparse.Namespace) -> bool:
    """Run one benchmark; False if it exited without writing results (skipped)."""
    out = RESULTS_DIR / f"{bench}.json"
    module, extra = VARIANTS.get(bench, (bench, []))
    argv = [sys.executable, "-m", f"bench.{module}", "--results", str(out.relative_to(REPO))]
    argv += extra
    if args.quick:
        argv.append("--quick")
    if args.device and module in ("model_node", "end_to_end"):
        argv += ["--device", args.device]
    print(f"\n=== {' '.join(argv[1:])}", flush=True)
    started, began = time.monotonic(), time.time()
    subprocess.run(argv, cwd=REPO, check=True)
    print(f"=== {bench} took {time.monotonic() - started:.0f} s", flush=True)
    return out.exists() and out.stat().st_mtime >= began - 1


def find_row(results: list[dict[str, Any]], bench: str, case: str) -> dict[str, Any] | None:
    """The first row ``case`` of ``bench``'s results, with the bench's date added."""
    for r in results:
        if r["bench"] == bench:
            for row in r["rows"]:
                if row["case"] == case and row["value"] is not None:
                    return {**row, "bench": bench, "date": r["date"]}
    return None


def render_peer(results: list[dict[str, Any]], skipped: dict[str, str]) -> list[str]:
    """The peer section: abdag's and Faust's figures over Quix's, "not run" where missing."""
    lines = ["## Peer ratios: abdag and Faust over Quix Streams", ""]
    if PEER in skipped:
        lines += [f"The Quix Streams peer was not run: {skipped[PEER]}.", ""]
    lines += [
        PEER_TEXT,
        "| ratio | value | numerator | denominator |",
        "| --- | ---: | --- | --- |",
    ]

    def cell(row: dict[str, Any] | None, bench: str) -> str:
        if row is None:
            return f"not run ({bench})"
        return f"{fmt(row['value'])} {row['unit']} ({bench}, {row['date']})"

    for what, (num_bench, num_case), (den_bench, den_case) in PEER_RATIOS:
        num = find_row(results, num_bench, num_case)
        den = find_row(results, den_bench, den_case)
        value = "not run"
        if num and den and den["value"] and den["value"] == den["value"]:
            value = fmt_ratio(num["value"] / den["value"])
        lines.append(f"| {what} | {value} | {cell(num, num_bench)} | {cell(den, den_bench)} |")
    return [*lines, ""]


def render(
    results: list[dict[str, Any]],
    command: str,
    *,
    peer: bool = False,
    skipped: dict[str, str] | None = None,
) -> str:
    """The Markdown page; ``peer``: end with the peer ratios (bench.quix_peer was asked for)."""
    skipped = skipped or {}
    if not results:
        text = "# Benchmarks\n\nNo results yet: run `.venv/bin/python -m bench.run_all`.\n"
        if peer:
            text += "\n" + "\n".join(render_peer(results, skipped))
        return text
    quick = any(r["params"].get("quick") for r in results)
    m = results[0]["machine"]
    v = m["versions"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{command}` on {results[-1]['date']}.",
        "",
    ]
    if quick:
        lines += [
            "> **Quick run** (`--quick`): small sizes, figures are noisy. Run without",
            "> `--quick` for the reference figures.",
            "",
        ]
    lines += [
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; RAM {m['ram_gib']} GiB",
        f"- GPU: {m['gpu'] or 'none'}",
        "- " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- {m['platform']}",
        "",
        "## Method",
        "",
        METHOD,
    ]
    for r in results:
        lines += [f"## {r['title']}", "", f"Command: `{r['command']}` ({r['date']})", ""]
        params = ", ".join(f"{k}={val}" for k, val in r["params"].items())
        lines += [f"Parameters: {params}", ""]
        sections: dict[str, list[dict[str, Any]]] = {}
        for row in r["rows"]:
            sections.setdefault(row["section"], []).append(row)
        for section, rows in sections.items():
            lines += [
                f"### {section}",
                "",
                "| case | value | unit | ratio | note |",
                "| --- | ---: | --- | --- | --- |",
            ]
            for row in rows:
                has = row.get("ratio") is not None
                rat = f"{fmt_ratio(row['ratio'])} {row['vs']}" if has else ""
                value = fmt(row["value"]) if row["value"] is not None else "n/a"
                lines.append(
                    f"| {row['case']} | {value} | {row['unit']} | {rat} | {row['note'] or ''} |"
                )
            lines.append("")
        if r["notes"]:
            lines += [f"- {n}" for n in r["notes"]] + [""]
    if peer:
        lines += render_peer(results, skipped)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (noisy figures)")
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated benches")
    parser.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"))
    parser.add_argument("--render-only", action="store_true", help="re-render saved results")
    parser.add_argument("--out", type=Path, default=DOC)
    args = parser.parse_args(argv)
    if args.device:
        check_device(parser, args.device)
    only = [b for b in args.only.split(",") if b]
    unknown = set(only) - set(BENCHES)
    if unknown:
        parser.error(f"unknown benchmark(s): {sorted(unknown)}; choose from {BENCHES}")

    failed = []
    skipped: dict[str, str] = {}
    for bench in only:
        if args.render_only:
            continue
        try:
            if not run(bench, args):
                skipped[bench] = INSTALL_HINT if bench == PEER else "it wrote no results"
                print(f"=== {bench} skipped: {skipped[bench]}", flush=True)
        except subprocess.CalledProcessError as exc:
            failed.append(bench)
            print(f"=== {bench} failed (exit {exc.returncode})", file=sys.stderr, flush=True)
    results = []
    for bench in BENCHES:
        path = RESULTS_DIR / f"{bench}.json"
        if bench in only and bench not in failed and bench not in skipped and path.exists():
            results.append(json.loads(path.read_text()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    page = render(results, command_line(), peer=PEER in only, skipped=skipped)
    args.out.write_text(page + "\n")
    print(f"\nwrote {args.out}", flush=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
