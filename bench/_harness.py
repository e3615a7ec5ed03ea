"""Shared machinery of the abdag benchmarks: a private stack, pre-filled topics, worker
processes, output-based throughput, peak memory, and a results file.

How every throughput figure is taken (one definition for all scripts):

* the workers are started and **warmed up** first (a few warm-up events go through and
  their outputs are awaited, so start-up, group join, model load and TorchScript's
  profiling runs are outside the measurement; with several workers, warm-up rounds repeat
  until outputs come from every worker);
* then the measured events are produced in one burst (a backlog; confluent-kafka produces
  them far faster than any worker consumes) or at a fixed rate;
* **events/s = (n - 1) / (t_last - t_first)** over the ``n`` distinct measured outputs,
  where ``t`` is the output record's timestamp: the Kafka CreateTime that the worker's
  producer stamps on each output record, or, for rows in ClickHouse, ``paired_ts`` (the
  moment the comparison node emitted the pair). It is the steady rate at which a worker
  drains a backlog; re-deliveries (duplicate keys) are counted once and reported.
* end-to-end figures instead use wall time: from the first produce call until every
  expected row is visible in ClickHouse (polled; the poll interval bounds the error).

Peak memory is ``VmHWM`` (peak resident set) from ``/proc/<pid>/status`` of each worker,
read just before it is stopped.

Workers are stopped by PID (SIGTERM, then SIGKILL after a grace period) before the stack;
the stack (Tansu + ClickHouse endpoint on free ports in a temp dir) is stopped by
``LocalStack.down()``, which signals only the PIDs it recorded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from abdag.clickhouse import connect
from abdag.settings import Settings
from abdag.stack import LocalStack
from abdag.stack.processes import free_port
from abdag.topics.admin import ensure_topics
from abdag.topics.packs import is_pack, packs_by_partition, partition_for, unpack
from abdag.topics.producer import pace

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
PARTITIONS = 4


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """Stop at once, with a one-line reason, when ``--device cuda`` asks for a GPU this
    machine lacks (rather than after the stack started, with a traceback)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: CUDA is not available here (torch {torch.__version__})")


# -- the stack ---------------------------------------------------------------------------
@dataclass
class Stack:
    """A running private stack: its settings and a scratch directory for DAG files, logs."""

    settings: Settings
    work: Path

    @property
    def bootstrap(self) -> str:
        return self.settings.broker

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for `abdag worker` and bench worker subprocesses on this stack."""
        env = dict(os.environ)
        env.update(
            ABDAG_BROKER=self.settings.broker,
            ABDAG_CLICKHOUSE_URL=self.settings.clickhouse_url,
            ABDAG_DATA_DIR=str(self.settings.data_dir),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
        )
        env.update(extra)
        return env

    def clickhouse(self) -> Any:
        return connect(self.settings)


@contextmanager
def local_stack(keep: bool = False) -> Iterator[Stack]:
    """Start Tansu and the ClickHouse endpoint on free ports in a temp dir; stop them after.

    The temp dir (logs included) is removed unless ``keep`` or the body raised.
    """
    tmp = Path(tempfile.mkdtemp(prefix="abdag-bench-"))
    settings = Settings(
        broker=f"127.0.0.1:{free_port()}",
        clickhouse_url=f"http://127.0.0.1:{free_port()}",
        data_dir=tmp / "stack",
    )
    local = LocalStack(settings)
    failed = False
    try:
        local.up()
        work = tmp / "work"
        work.mkdir()
        yield Stack(settings, work)
    except BaseException:
        failed = True
        raise
    finally:
        local.down()
        if failed or keep:
            print(f"[bench] stack files kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def create_topics(stack: Stack, names: Sequence[str], partitions: int = PARTITIONS) -> None:
    ensure_topics(stack.bootstrap, list(names), partitions)


# -- producing ---------------------------------------------------------------------------
Record = tuple[bytes | None, bytes]


def produce(
    bootstrap: str,
    topic: str,
    make: Callable[[int], Record],
    n: int,
    *,
    rate: float | None = None,
) -> float:
    """Send ``make(i)`` for ``i < n`` (key, value); return the seconds it took (flush included).

    The key is partitioned like the Java client and Faust (murmur2), so records with the
    same key land in the same partition number on every topic. With ``rate``, records are
    spaced to that many per second and ``make`` is called at send time (so a timestamp it
    puts in the value is the produce time).
    """
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 0 if rate else 5,
            "partitioner": "murmur2_random",
            "queue.buffering.max.messages": 1_000_000,
            "log_level": 0,
        }
    )
    errors: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    start = time.monotonic()
    for i in range(n):
        if rate:
            pace(producer, start + i / rate)
        key, value = make(i)
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    left = producer.flush(60)
    elapsed = time.monotonic() - start
    if left or errors:
        raise RuntimeError(f"{left + len(errors)} of {n} records to {topic} not delivered")
    return elapsed


def produce_packs(
    bootstrap: str, topic: str, make: Callable[[int], Record], n: int, *, per_pack: int = 100
) -> None:
    """Send ``make(i)`` for ``i < n`` to a node topic as an upstream node does under load:
    packs of ``per_pack`` records (abdag.topics.packs), each in its keys' partition."""
    entries = []
    for i in range(n):
        key, value = make(i)
        entries.append((partition_for(key, PARTITIONS), value, None))
    packs = list(packs_by_partition(entries, max_records=per_pack))
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "log_level": 0})
    for partition, value in packs:
        producer.produce(topic, value=value, partition=partition)
        producer.poll(0)
    if producer.flush(60):
        raise RuntimeError(f"packs to {topic} not delivered")


# -- reading outputs ---------------------------------------------------------------------
@dataclass
class Outputs:
    """Distinct output records of one topic whose key starts with a prefix."""

    ts: dict[bytes, float] = field(default_factory=dict)  # key -> first record time (s)
    values: dict[bytes, bytes] = field(default_factory=dict)
    duplicates: int = 0
    started: float = float("nan")  # epoch s when the measured records' produce call began

    def __len__(self) -> int:
        return len(self.ts)

    def rate(self) -> float:
        """Outputs/s between the first and the last output (start-up and tail left out)."""
        return span_rate(list(self.ts.values()))

    def wall_rate(self) -> float:
        """Outputs/s from the first produce call to the last output (fill and tail in)."""
        if not self.ts:
            return float("nan")
        return len(self.ts) / max(max(self.ts.values()) - self.started, 1e-9)


def read_outputs(
    bootstrap: str,
    topic: str,
    *,
    prefix: bytes,
    expect: int,
    timeout: float,
    keep_values: bool = False,
    partitions: int = PARTITIONS,
) -> Outputs:
    """Read ``topic`` from the start (assign, no group) until ``expect`` distinct keys with
    ``prefix`` were seen or ``timeout`` passed; record each key's first timestamp."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "abdag-bench-reader",
            "enable.auto.commit": False,
            "log_level": 0,
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out = Outputs()
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expect and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=0.2):
                if msg.error():
                    continue
                for key, value in _keyed(msg):
                    if not key.startswith(prefix):
                        continue
                    if key in out.ts:
                        out.duplicates += 1
                        continue
                    out.ts[key] = msg.timestamp()[1] / 1000.0
                    if keep_values:
                        out.values[key] = value
    finally:
        consumer.close()
    return out


def _keyed(msg: Any) -> list[tuple[bytes, bytes]]:
    """``(key, value)`` of a record, or, for a pack of a node topic (no key), of each of
    its records keyed by request id."""
    if msg.key() is not None or not is_pack(msg.value()):
        return [(msg.key() or b"", msg.value())]
    return [
        (str(r.body.get("request_id", "")).encode(), orjson.dumps(r.body))
        for r in unpack(msg.value())
    ]


def raw_consume_rate(bootstrap: str, topic: str, n: int, partitions: int = PARTITIONS) -> float:
    """Records/s of a confluent-kafka consumer reading ``n`` records of ``topic`` from the
    start (assign, no group). Timed from the first batch received (connection set-up
    excluded) to the last record; the first batch's records are not counted."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "abdag-bench-raw",
            "enable.auto.commit": False,
            "log_level": 0,
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    seen = counted = 0
    first = last = 0.0
    deadline = time.monotonic() + 120
    try:
        while seen < n and time.monotonic() < deadline:
            got = sum(1 for m in consumer.consume(1000, timeout=0.5) if not m.error())
            if not got:
                continue
            now = time.perf_counter()
            if not first:
                first = now
            else:
                counted += got
                last = now
            seen += got
    finally:
        consumer.close()
    return counted / (last - first) if last > first else float("nan")


def span_rate(timestamps: Sequence[float]) -> float:
    """(n - 1) / (max - min): the rate between the first and the last output."""
    if len(timestamps) < 2:
        return float("nan")
    span = max(timestamps) - min(timestamps)
    return (len(timestamps) - 1) / span if span > 0 else float("inf")


# -- ClickHouse pairs --------------------------------------------------------------------
def pairs_visible(stack: Stack, experiments: Sequence[str], prefix: str, stage: int) -> int:
    """Distinct request ids with ``prefix`` at ``stage`` or above, summed over experiments
    (no FINAL: cheap enough to poll)."""
    try:
        rows = (
            stack.clickhouse()
            .query(
                "SELECT uniqExact(experiment, request_id) FROM pairs "
                "WHERE experiment IN {e:Array(String)} AND startsWith(request_id, {p:String}) "
                "AND stage >= {s:UInt8} AND status = 'paired'",
                parameters={"e": list(experiments), "p": prefix, "s": stage},
            )
            .result_rows
        )
    except Exception:  # noqa: BLE001 - the table appears with the first insert
        return 0
    return int(rows[0][0])


def wait_pairs(
    stack: Stack,
    experiments: Sequence[str],
    prefix: str,
    expect: int,
    *,
    stage: int = 2,
    timeout: float,
    interval: float = 0.5,
    procs: Workers | None = None,
) -> tuple[int, float]:
    """Poll until ``expect`` pairs are visible; return (count, monotonic time seen)."""
    deadline = time.monotonic() + timeout
    while True:
        count = pairs_visible(stack, experiments, prefix, stage)
        now = time.monotonic()
        if count >= expect or now >= deadline:
            return count, now
        if procs is not None:
            procs.check_alive()
        time.sleep(interval)


@dataclass
class PairStats:
    n: int
    rate: float  # (n - 1) / paired_ts span
    p50_ms: float
    p99_ms: float
    workers: int  # distinct workers that wrote the pairs
    last_ts: float  # the newest paired_ts (epoch seconds)


def pair_stats(stack: Stack, experiments: Sequence[str], prefix: str) -> PairStats:
    """From ``pairs FINAL``: pair rate over paired_ts and paired_ts - request_ts quantiles."""
    row = (
        stack.clickhouse()
        .query(
            "SELECT count(), toFloat64(max(paired_ts)) - toFloat64(min(paired_ts)), "
            "quantileExact(0.5)(dateDiff('millisecond', request_ts, paired_ts)), "
            "quantileExact(0.99)(dateDiff('millisecond', request_ts, paired_ts)), "
            "uniqExact(worker), toFloat64(max(paired_ts)) "
            "FROM pairs FINAL WHERE experiment IN {e:Array(String)} "
            "AND startsWith(request_id, {p:String}) AND status = 'paired'",
            parameters={"e": list(experiments), "p": prefix},
        )
        .result_rows[0]
    )
    n, span, p50, p99, workers, last = row
    rate = (n - 1) / span if n > 1 and span > 0 else float("nan")
    return PairStats(int(n), rate, float(p50), float(p99), int(workers), float(last or 0.0))


# -- worker processes --------------------------------------------------------------------
def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of a live process in MiB; NaN if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process used so far; NaN if unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all cores ran this machine's processes since boot (user, nice, system,
    irq, softirq; not idle, I/O wait, or time the hypervisor stole)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = ticks
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class CpuShare:
    """Who used the cores while a block ran: each worker's CPU and everything else's (the
    broker, ClickHouse, the bench driver), in % of one core, sampled every ``interval`` s.

    :meth:`between` narrows the figures to a time window (epoch seconds), e.g. the span of
    the pairs a run measured, so start-up and the drain tail do not dilute them.
    """

    def __init__(self, procs: Workers, interval: float = 0.2) -> None:
        self.procs, self.interval = procs, interval
        self.samples: list[tuple[float, list[float], float]] = []  # (epoch, workers, busy)
        self._stop = threading.Event()
        self.workers: list[float] = []
        self.rest = float("nan")

    def _sample(self) -> None:
        self.samples.append((time.time(), self.procs.cpu_s(), machine_busy_s()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> CpuShare:
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.between(self.samples[0][0], self.samples[-1][0])

    def between(self, start: float, end: float) -> CpuShare:
        """Set :attr:`workers` and :attr:`rest` to the shares between the samples that
        enclose ``start`` .. ``end``."""
        first = max((s for s in self.samples if s[0] <= start), default=self.samples[0])
        last = min((s for s in self.samples if s[0] >= end), default=self.samples[-1])
        wall = max(last[0] - first[0], 1e-9)
        used = [b - a for a, b in zip(first[1], last[1], strict=True)]
        self.workers = [100.0 * u / wall for u in used]
        self.rest = 100.0 * (last[2] - first[2] - sum(used)) / wall
        return self

    @property
    def cores(self) -> float:
        """How many cores the workers used together."""
        return sum(self.workers) / 100.0

    def __str__(self) -> str:
        shares = ", ".join(f"{w:.0f}%" for w in self.workers)
        return f"CPU: worker(s) {shares} of a core, all else {self.rest:.0f}%"


class WorkerDied(RuntimeError):
    pass


class Workers:
    """Worker processes started by a benchmark; stopped by PID, peak memory read first."""

    def __init__(self, stack: Stack, name: str) -> None:
        self.stack = stack
        self.name = name
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.peak_mb: list[float] = []

    def start_abdag(self, dag_file: Path, count: int = 1, *, pin: bool = False, **env: str) -> None:
        """``count`` `abdag worker DAG_FILE` processes (the argv of tests.workers.start_worker).

        ``pin``: worker i may run on CPU ``i % cores`` only (its threads included), to
        emulate one core per worker on a small machine.
        """
        for i in range(count):
            argv = ["-m", "abdag.cli", "worker", str(dag_file), "--loglevel", "warn"]
            cpus = {i % (os.cpu_count() or 1)} if pin else None
            self._start(argv, env, cpus)

    def _start(self, args: Sequence[str], env: dict[str, str], cpus: set[int] | None) -> None:
        log = self.stack.work / f"{self.name}-{len(self.procs)}.log"

        def pin() -> None:  # in the child, before exec: every thread inherits it
            if cpus:
                os.sched_setaffinity(0, cpus)

        fh = open(log, "ab")  # noqa: SIM115 - the child owns it
        self.procs.append(
            subprocess.Popen(
                [sys.executable, *args],
                env={**self.stack.env(**env), "PYTHONUNBUFFERED": "1"},
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO,
                preexec_fn=pin if cpus else None,
            )
        )
        fh.close()
        self.logs.append(log)

    def start_module(
        self, module: str, args: Sequence[str], *, cpu: int | None = None, **env: str
    ) -> None:
        """``python -m module args...`` (a bench process of our own); ``cpu``: pinned to it."""
        self._start(["-m", module, *args], env, None if cpu is None else {cpu})

    def outputs(self, timeout: float) -> list[str]:
        """Wait for processes that end by themselves; return each one's output (its log).
        Raises :class:`WorkerDied` naming the first that failed."""
        for proc in self.procs:
            proc.wait(timeout)
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.returncode:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                raise WorkerDied(f"{proc.pid} exited ({proc.returncode}); log {log}:\n{tail}")
        return [log.read_text(errors="replace") for log in self.logs]

    def cpu_s(self) -> list[float]:
        """CPU seconds each worker used so far."""
        return [process_cpu_s(p.pid) for p in self.procs]

    def check_alive(self) -> None:
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                raise WorkerDied(
                    f"worker {proc.pid} exited ({proc.returncode}); log {log}:\n{tail}"
                )

    def stop(self) -> list[float]:
        """Record each worker's VmHWM, then stop them (by PID); return the peaks in MiB."""
        self.peak_mb = [vm_hwm_mb(p.pid) for p in self.procs]
        for proc in self.procs:  # all at once: they shut down in parallel
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 8
        for proc in self.procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        return self.peak_mb

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.procs and not self.peak_mb:
            self.stop()


def wait_outputs(
    stack: Stack,
    procs: Workers,
    topic: str,
    *,
    prefix: bytes,
    expect: int,
    timeout: float,
    keep_values: bool = False,
) -> Outputs:
    """``read_outputs`` in slices, failing fast if a worker died."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        out = read_outputs(
            stack.bootstrap,
            topic,
            prefix=prefix,
            expect=expect,
            timeout=min(left, 5.0),
            keep_values=keep_values,
        )
        if len(out) >= expect or time.monotonic() >= deadline:
            return out
        procs.check_alive()


# -- results -----------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, versions and GPU name (if any) of this machine."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = float("nan")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("faust-streaming", "aiokafka", "confluent-kafka", "chdb", "clickhouse-connect"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:  # noqa: BLE001
            pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram_gib, 1),
        "gpu": gpu,
        "versions": versions,
        "platform": platform.platform(),
    }


@dataclass
class Result:
    """One benchmark's figures, printed as they come and saved as JSON for run_all."""

    bench: str
    title: str
    params: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(
        self,
        section: str,
        case: str,
        value: float,
        unit: str,
        *,
        ratio: float | None = None,
        vs: str | None = None,
        note: str = "",
    ) -> None:
        row = {
            "section": section,
            "case": case,
            "value": value,
            "unit": unit,
            "ratio": ratio,
            "vs": vs,
            "note": note,
        }
        self.rows.append(row)
        r = f"  {fmt_ratio(ratio)} {vs}" if ratio is not None else ""
        print(f"[{section}] {case:<48} {fmt(value):>12} {unit}{r}  {note}".rstrip(), flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def save(self, path: Path | None = None) -> Path:
        path = path or RESULTS_DIR / f"{self.bench}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "bench": self.bench,
            "title": self.title,
            "command": command_line(),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "params": self.params,
            "rows": self.rows,
            "notes": self.notes,
        }
        path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"results written to {path}", flush=True)
        return path


def command_line() -> str:
    """How this script was invoked, as a user would type it from the repository root."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    prog = f"-m {spec.name}" if spec is not None and spec.name else sys.argv[0]
    return " ".join([".venv/bin/python", prog, *sys.argv[1:]])


def ratio(a: float, b: float) -> float | None:
    if not b or b != b or a != a:
        return None
    return a / b


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def fmt(value: float) -> str:
    if value != value:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.2f}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rounds(values: Sequence[float]) -> str:
    """A note listing the figures a median was taken of (empty for a single run)."""
    if len(values) < 2:
        return ""
    return f"median of {len(values)} runs: " + ", ".join(f"{v:,.0f}" for v in values)


def unique_name(prefix: str) -> str:
    """A DAG or app name not used before on this stack (fresh topics and consumer group)."""
    return f"{prefix}{os.getpid() % 10000}{time.monotonic_ns() % 10**8:08d}"


# -- measured runs -----------------------------------------------------------------------
MakeRecord = Callable[[str, int], Record]  # (key prefix, index) -> (key, value)
WARM = "w-"
MEASURED = "m-"


def drain_timeout(n: int, slowest_rate: float = 100.0) -> float:
    """A generous deadline for ``n`` events at a pessimistic rate."""
    return 60.0 + n / slowest_rate


def measure_topic_run(
    stack: Stack,
    procs: Workers,
    source: str,
    sink: str,
    make: MakeRecord,
    n: int,
    *,
    warmup: int,
    keep_values: bool = False,
) -> Outputs:
    """Warm the running worker(s) up, produce ``n`` measured records in one burst to
    ``source``, and collect the distinct outputs on ``sink``."""
    produce(stack.bootstrap, source, lambda i: make(WARM, i), warmup)
    warm = wait_outputs(
        stack, procs, sink, prefix=WARM.encode(), expect=warmup, timeout=drain_timeout(warmup)
    )
    if len(warm) < warmup:
        raise RuntimeError(f"warm-up: {len(warm)} of {warmup} outputs on {sink}")
    started = time.time()
    produce(stack.bootstrap, source, lambda i: make(MEASURED, i), n)
    out = wait_outputs(
        stack,
        procs,
        sink,
        prefix=MEASURED.encode(),
        expect=n,
        timeout=drain_timeout(n),
        keep_values=keep_values,
    )
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} of {n} outputs on {sink} before the deadline")
    out.started = started
    return out


@dataclass
class PassThrough:
    rate: float  # over the outputs' span
    wall_rate: float  # from the first produce call to the last output
    peak_mb: float
    duplicates: int


def passthrough_run(
    stack: Stack, make: MakeRecord, n: int, *, mode: str, warmup: int = 200
) -> PassThrough:
    """Events/s of the bench pass-through agent (bench.passthrough) on ``make``'s records."""
    app_id = unique_name(f"pt-{mode}-")
    source, sink = f"bench.{app_id}.in", f"bench.{app_id}.out"
    create_topics(stack, [source, sink])
    with Workers(stack, app_id) as procs:
        procs.start_module(
            "bench.passthrough",
            ["--app-id", app_id, "--source", source, "--sink", sink, "--mode", mode],
        )
        out = measure_topic_run(stack, procs, source, sink, make, n, warmup=warmup)
        (peak,) = procs.stop()
    return PassThrough(out.rate(), out.wall_rate(), peak, out.duplicates)
