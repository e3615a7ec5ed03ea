"""``abdag demo``: the whole story on the embedded stack, in one command.

Two fraud models (A in production, B retrained on more data and features) score the same
live transactions; chargebacks (labels) arrive later; the comparison node pairs them and
ClickHouse ends with one row per request, metrics and a verdict.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

from abdag.clickhouse import connect
from abdag.settings import Settings
from abdag.stack import LocalStack
from abdag.stack.processes import ManagedProcess, StackError

EXPERIMENT = "fraud.a_vs_b"
DAG_FILE = Path(__file__).with_name("dag.py")


def say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def worker_env(settings: Settings, models: Path) -> dict[str, str]:
    return {
        **os.environ,
        "ABDAG_BROKER": settings.broker,
        "ABDAG_CLICKHOUSE_URL": settings.clickhouse_url,
        "ABDAG_DATA_DIR": str(Path(settings.data_dir).resolve()),
        "ABDAG_DATABASE": settings.database,
        "ABDAG_DEMO_MODELS": str(models.resolve()),
        "PYTHONUNBUFFERED": "1",
    }


def start_workers(settings: Settings, count: int, env: dict[str, str]) -> list[ManagedProcess]:
    procs = []
    for i in range(1, count + 1):
        proc = ManagedProcess(f"worker-{i}", settings.run_dir())
        if proc.pid() is None:
            argv = [
                sys.executable,
                "-m",
                "abdag.cli",
                "worker",
                str(DAG_FILE),
                "--loglevel",
                "warn",
            ]
            proc.start(argv, env=env)
        procs.append(proc)
    return procs


def label_messages(events: list[dict], labels, seed: int, share: float) -> list[dict]:
    """The chargebacks the demo sends: a ``share`` of requests get their label, shuffled."""
    rng = random.Random(seed)
    msgs = [
        {"request_id": e["request_id"], "label": int(y)}
        for e, y in zip(events, labels, strict=True)
        if rng.random() < share
    ]
    rng.shuffle(msgs)
    return msgs


def send_traffic(settings: Settings, requests: int, seed: int, label_share: float) -> int:
    """Produce requests, then their labels later and shuffled; return labels sent."""
    from abdag.demo.fraud import generate
    from abdag.topics import input_topic
    from abdag.topics.producer import produce

    events, labels = generate(requests, seed)
    produce(settings.broker, input_topic("fraud", "transactions"), events, total=requests)
    labelled = label_messages(events, labels, seed, label_share)
    print(f"chargebacks arrive later: {len(labelled)} labels for {requests} requests", flush=True)
    produce(settings.broker, input_topic("fraud", "chargebacks"), labelled, total=len(labelled))
    return len(labelled)


def wait_for_pairs(settings: Settings, paired: int, labelled: int, timeout: float) -> bool:
    client = None
    deadline = time.monotonic() + timeout
    last = (-1, -1)
    while time.monotonic() < deadline:
        try:
            client = client or connect(settings)
            row = client.query(
                "SELECT countIf(stage >= 2), countIf(stage = 3) FROM pairs FINAL "
                "WHERE experiment = {e:String}",
                parameters={"e": EXPERIMENT},
            ).result_rows[0]
        except Exception:  # noqa: BLE001 - the table appears with the first insert
            row = (0, 0)
        if row != last:
            sys.stderr.write(f"\rcompared {row[0]}/{paired} requests, {row[1]}/{labelled} labelled")
            sys.stderr.flush()
            last = row
        if row[0] >= paired and row[1] >= labelled:
            sys.stderr.write("\n")
            return True
        time.sleep(0.5)
    sys.stderr.write("\n")
    return False


def run_demo(
    settings: Settings,
    *,
    requests: int = 20_000,
    workers: int = 1,
    keep_running: bool = False,
    seed: int = 11,
    label_share: float = 0.97,
    timeout: float = 600.0,
) -> int:
    from abdag.agents.loader import load_dag
    from abdag.agents.topology import dag_topics
    from abdag.comparators.report import build_report
    from abdag.demo.fraud import train_models
    from abdag.topics.admin import ensure_topics

    stack = LocalStack(settings)
    say("starting the local stack (Tansu broker + ClickHouse engine)")
    for s in stack.up():
        print(s.line())
    models = Path(settings.data_dir) / "demo" / "models"
    say("training model A (production) and model B (retrained) on synthetic fraud data")
    train_models(models, seed=7)
    print(f"models in {models}")
    env = worker_env(settings, models)
    os.environ["ABDAG_DEMO_MODELS"] = env["ABDAG_DEMO_MODELS"]
    dag = load_dag(DAG_FILE)
    ensure_topics(settings.broker, dag_topics(dag), dag.partitions)
    procs: list[ManagedProcess] = []
    try:
        say(f"starting {workers} worker(s) for {DAG_FILE.name}")
        procs = start_workers(settings, workers, env)
        say(f"producing {requests} transactions")
        labelled = send_traffic(settings, requests, seed, label_share)
        say("waiting until every request is compared")
        if not wait_for_pairs(settings, requests, labelled, timeout):
            for p in procs:
                print(f"--- {p.log_file}\n{p.log_tail(20)}")
            raise StackError(f"not every request was compared within {timeout:.0f} s")
        time.sleep(0.5)
        report = build_report(connect(settings), EXPERIMENT, margin=dag.nodes["a_vs_b"].margin)
        say(f"report for experiment {EXPERIMENT}")
        print(report.render())
        say("the SQL behind it (run any of it with `abdag sql`)")
        for statement in report.sql:
            print(statement.strip() + "\n")
        host, port = settings.clickhouse_host_port
        say("ask your own questions")
        print('abdag sql "SELECT status, count() FROM pairs FINAL GROUP BY status"')
        print(
            f"curl 'http://{host}:{port}/?readonly=1' --data-binary "
            f'"SELECT experiment, count() FROM pairs FINAL GROUP BY experiment"'
        )
    finally:
        if keep_running:
            say("left running: stop everything with `abdag down`")
        else:
            say("stopping what the demo started")
            for p in procs:
                p.stop(grace=15)
            stack.down()
    return 0
