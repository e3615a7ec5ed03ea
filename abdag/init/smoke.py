"""The smoke run: a generated DAG on a running stack with one worker process and synthetic
traffic, checked in ClickHouse (every request an A/B pair, every label joined)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abdag.agents.config import WORKER_READY
from abdag.agents.dag import Comparison, Dag, ModelNode, Source
from abdag.agents.errors import DagError
from abdag.comparators.schema import DEAD_LETTER_COUNT
from abdag.init.inputs import synthetic_events

if TYPE_CHECKING:
    from abdag.settings import Settings

_MOVING_EVERY = 2.0  # seconds between progress lines while the counts move
_STILL_EVERY = 5.0  # and while they do not


class SmokeError(DagError):
    """The smoke run did not see every request paired in ClickHouse; ``counts`` says what it
    did see."""

    def __init__(self, message: str, *, file: str, counts: dict[str, Any]) -> None:
        super().__init__(message, file=file)
        self.counts = counts


def _comparison(dag: Dag) -> Comparison:
    comparisons = [n for n in dag.topological() if isinstance(n, Comparison)]
    if not comparisons:
        raise DagError("the DAG has no comparison node (dag.compare) to check", file=dag.file)
    return comparisons[0]


def _smoke_events(source: Source, n: int, seed: int, run: str) -> list[dict[str, Any]]:
    if source.sampler is not None:
        events = source.sampler(n, seed)
    elif source.example is not None:
        events = synthetic_events(source.example, n, seed)
    else:
        raise DagError("the source has no example or sampler to make events from", node=source.name)
    if len(events) < n:
        raise DagError(f"the sampler made {len(events)} events, {n} wanted", node=source.name)
    return [{**e, "request_id": f"smoke-{run}-{i}"} for i, e in enumerate(events[:n])]


def _class_count(node: ModelNode, event: dict[str, Any]) -> int:
    """k of a multiclass model, from one forward pass (labels must be 0..k-1)."""
    import orjson

    from abdag.models import load_model
    from abdag.topics import request_from_raw

    model = load_model(
        node.path, device="cpu", model_class=node.model_class, model_kwargs=node.model_kwargs
    )
    x = node.build_input(request_from_raw(orjson.dumps(event), None, time.time()))
    x = tuple(t.unsqueeze(0) for t in x) if isinstance(x, tuple) else x.unsqueeze(0)
    return int(model(x).reshape(1, -1).shape[1])


def _smoke_labels(
    dag: Dag, comp: Comparison, events: list[dict[str, Any]], seed: int
) -> list[dict[str, Any]]:
    rng = random.Random(seed + 1)
    draw: Callable[[], float]
    if comp.task == "binary":
        draw = lambda: rng.randint(0, 1)  # noqa: E731
    elif comp.task == "multiclass":
        k = _class_count(dag.nodes[comp.a], events[0])
        draw = lambda: rng.randrange(k)  # noqa: E731
    else:
        draw = lambda: round(rng.gauss(0.0, 1.0), 6)  # noqa: E731
    return [{"request_id": e["request_id"], "label": draw()} for e in events]


_COUNTS_SQL = (
    "SELECT countIf(status = 'paired'), countIf(stage = 3), countIf(status = 'missing_a'), "
    "countIf(status = 'missing_b'), count() FROM pairs FINAL "
    "WHERE experiment = {e:String} AND startsWith(request_id, {p:String})"
)
_DEAD_SQL = (
    f"SELECT node, reason, {DEAD_LETTER_COUNT} FROM dead_letters "
    "WHERE dag = {d:String} AND startsWith(request_id, {p:String}) GROUP BY node, reason"
)


def _counts(client: Any, experiment: str, dag: str, prefix: str) -> dict[str, Any]:
    try:
        row = client.query(_COUNTS_SQL, parameters={"e": experiment, "p": prefix}).result_rows[0]
    except Exception:  # noqa: BLE001 - the table appears with the first insert
        row = (0, 0, 0, 0, 0)
    counts: dict[str, Any] = dict(
        zip(("paired", "labelled", "missing_a", "missing_b", "rows"), map(int, row), strict=True)
    )
    try:
        dead = client.query(_DEAD_SQL, parameters={"d": dag, "p": prefix}).result_rows
    except Exception:  # noqa: BLE001
        dead = []
    counts["dead_letters"] = {f"{node}: {reason}": int(c) for node, reason, c in dead}
    return counts


def _worker_env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "ABDAG_BROKER": settings.broker,
        "ABDAG_CLICKHOUSE_URL": settings.clickhouse_url,
        "ABDAG_DATA_DIR": str(Path(settings.data_dir).resolve()),
        "ABDAG_DATABASE": settings.database,
        "ABDAG_CLICKHOUSE_USER": settings.clickhouse_user,
        "ABDAG_CLICKHOUSE_PASSWORD": settings.clickhouse_password,
        "PYTHONUNBUFFERED": "1",
    }


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the worker we started (by PID), SIGKILL if it does not stop in 20 s."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _tail(log: Path, lines: int = 8) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


_WORKER_WARNING = "abdag worker: warning: "  # how the worker prints its dry run's warnings


class _WorkerLog:
    """The lines the smoke run's worker writes to its log, read as they come (the log is
    appended to: what earlier runs left is skipped)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = b""

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [line.decode(errors="replace").rstrip() for line in lines]


class _Progress:
    """``smoke run: ...`` lines on stderr: each step, the worker's readiness and warnings,
    and the counts every 2 s while they move, every 5 s while they do not."""

    def __init__(self, enabled: bool, started: float, n: int, labels: int) -> None:
        self.enabled = enabled
        self.started = started
        self.n = n
        self.labels = labels
        self.last_line = float("-inf")
        self.last_seen: tuple[int, int] | None = None
        self.worker_ready = False

    def worker(self, lines: list[str]) -> None:
        """Say when the worker is ready, and what its dry run warns about."""
        for line in lines:
            if not self.worker_ready and WORKER_READY in line:
                self.worker_ready = True
                self.say(f"worker ready ({time.monotonic() - self.started:.0f} s)")
            elif line.startswith(_WORKER_WARNING):
                self.say("the worker warns: " + line[len(_WORKER_WARNING) :])

    def say(self, text: str) -> None:
        if self.enabled:
            print(f"smoke run: {text}", file=sys.stderr, flush=True)
            self.last_line = time.monotonic()

    def counts(self, counts: dict[str, Any], then: str = "") -> None:
        """The counts, when it is time for a line (always when ``then`` says what is next)."""
        now = time.monotonic()
        seen = (counts["paired"], counts["labelled"])
        wait = _MOVING_EVERY if seen != self.last_seen else _STILL_EVERY
        if not then and now - self.last_line < wait:
            return
        self.last_seen = seen
        labelled = f", {seen[1]}/{self.labels} labelled" if self.labels else ""
        elapsed = f"{now - self.started:.0f} s"
        starting = "" if self.worker_ready else ", the worker still starting"
        self.say(f"{seen[0]}/{self.n} pairs in ClickHouse{labelled} ({elapsed}{starting}){then}")


def smoke_run(
    dag_file: Path,
    settings: Settings,
    n: int = 100,
    timeout: float = 90,
    *,
    seed: int = 0,
    log: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the DAG on ``n`` synthetic requests (plus labels) with one worker process against
    a running stack, and wait until ClickHouse holds ``n`` labelled A/B pairs.

    Requests get ids ``smoke-<run>-<i>`` so earlier runs of the same DAG never count. The
    worker's output goes to ``log`` (default ``<name>.smoke.log`` next to the DAG file);
    ``progress`` prints what the run is waiting for on stderr, a line every few seconds.
    Returns the counts (paired, labelled, missing_a, missing_b, rows, dead_letters, sent,
    seconds, experiment); raises :class:`SmokeError` with the counts when a request did not
    pair in time or the worker stopped.
    """
    from abdag.agents.loader import load_dag
    from abdag.agents.topology import dag_topics
    from abdag.agents.validate import validate
    from abdag.clickhouse import connect
    from abdag.comparators.rows import experiment_name
    from abdag.topics import input_topic
    from abdag.topics.admin import ensure_topics
    from abdag.topics.producer import produce

    dag_file = Path(dag_file).resolve()
    dag = load_dag(dag_file)
    validate(dag, load_models=False)  # the worker loads and dry-runs the models itself
    comp = _comparison(dag)
    source = dag.root_source(comp.a)
    if source is None:
        raise DagError("model A's input does not come from a source", file=str(dag_file))
    run = uuid.uuid4().hex[:8]
    prefix = f"smoke-{run}-"
    events = _smoke_events(source, n, seed, run)
    labels = _smoke_labels(dag, comp, events, seed) if comp.labels else []
    experiment = experiment_name(dag.name, comp.name)
    log = Path(log) if log is not None else dag_file.with_name(f"{dag.name}.smoke.log")
    started = time.monotonic()
    report = _Progress(progress, started, n, len(labels))
    report.say(f"creating the DAG's topics on the broker at {settings.broker}")
    ensure_topics(settings.broker, dag_topics(dag), dag.partitions)
    report.say(f"starting a worker (log: {log})")
    worker_log = _WorkerLog(log)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "abdag.cli", "worker", str(dag_file), "--loglevel", "warn"],
            env=_worker_env(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        and_labels = f" and {len(labels)} labels" if labels else ""
        report.say(f"producing {n} events{and_labels} ({input_topic(dag.name, source.name)})")
        produce(settings.broker, input_topic(dag.name, source.name), events, progress=False)
        if labels:
            produce(settings.broker, input_topic(dag.name, comp.labels), labels, progress=False)
        report.say(f"sent; waiting for {n} pairs in ClickHouse (experiment {experiment})")
        client = connect(settings)
        deadline = started + timeout
        while True:
            report.worker(worker_log.new_lines())
            counts = _counts(client, experiment, dag.name, prefix)
            done = counts["paired"] >= n and (not labels or counts["labelled"] >= n)
            decided = counts["paired"] + counts["missing_a"] + counts["missing_b"] >= n
            if done or decided:
                report.worker(worker_log.new_lines())
                report.counts(counts, then="; stopping the worker")
                break
            if proc.poll() is not None:
                raise SmokeError(
                    f"the worker exited with code {proc.returncode} after "
                    f"{time.monotonic() - started:.0f} s: {_tail(log)} (log: {log})",
                    file=str(dag_file),
                    counts=counts,
                )
            if time.monotonic() > deadline:
                report.counts(counts, then="; out of time, stopping the worker")
                break
            report.counts(counts)
            time.sleep(0.5)
    finally:
        _stop(proc)
    counts.update(
        experiment=experiment,
        sent=n,
        labels=len(labels),
        seconds=round(time.monotonic() - started, 1),
    )
    if not (counts["paired"] >= n and (not labels or counts["labelled"] >= n)):
        dead = "; ".join(f"{k} x{v}" for k, v in counts["dead_letters"].items())
        raise SmokeError(
            f"{counts['paired']}/{n} requests paired and {counts['labelled']}/{len(labels)} "
            f"labelled in {counts['seconds']} s (missing_a {counts['missing_a']}, missing_b "
            f"{counts['missing_b']}){'; dead letters: ' + dead if dead else ''} (log: {log})",
            file=str(dag_file),
            counts=counts,
        )
    return counts
