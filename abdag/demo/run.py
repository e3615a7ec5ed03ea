"""``abdag demo``: the whole story on the embedded stack, in one command.

Two fraud models (A in production, B retrained on more data and features) score the same
live transactions; chargebacks (labels) arrive later; the comparison node pairs them and
ClickHouse ends with one row per request, metrics and a verdict. Two findings besides it:
the sales channel where B is worse although better overall (``channel=kiosk`` in
``a_vs_b``'s segments), and a split ``canary`` of B whose verdict the sample-ratio mismatch
check withholds (its feature lookup times out on foreign transactions).
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from abdag.clickhouse import connect
from abdag.settings import Settings
from abdag.stack import LocalStack
from abdag.stack.processes import ManagedProcess, StackError

EXPERIMENT = "fraud.a_vs_b"
CANARY = "fraud.canary"
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


@dataclass(frozen=True)
class Expected:
    """The rows one experiment ends with in ``pairs FINAL``: ``paired`` with both answers
    (stage 2 or 3), ``labelled`` of them with their label (stage 3), and ``unpaired`` with
    one answer only (stage 1, once ``join_timeout`` expired)."""

    experiment: str
    paired: int
    labelled: int
    unpaired: int = 0


def expected_rows(events: list[dict], labelled: list[dict]) -> list[Expected]:
    """What each experiment of the demo's DAG ends with for these events and labels:
    ``a_vs_b`` pairs every request; the canary never answers the requests its feature
    lookup times out on (``canary_lookup_times_out``), which stay unpaired and unlabelled."""
    from abdag.demo.fraud import canary_lookup_times_out

    ids = {m["request_id"] for m in labelled}
    refused = {e["request_id"] for e in events if canary_lookup_times_out(e)}
    return [
        Expected(EXPERIMENT, len(events), len(ids)),
        Expected(CANARY, len(events) - len(refused), len(ids - refused), len(refused)),
    ]


def send_traffic(
    settings: Settings, requests: int, seed: int, label_share: float
) -> list[Expected]:
    """Produce requests, then their labels later and shuffled; return what each experiment
    should end with (:func:`expected_rows`)."""
    from abdag.demo.fraud import generate
    from abdag.topics import input_topic
    from abdag.topics.producer import produce

    events, labels = generate(requests, seed, channels=True)
    produce(settings.broker, input_topic("fraud", "transactions"), events, total=requests)
    labelled = label_messages(events, labels, seed, label_share)
    print(f"chargebacks arrive later: {len(labelled)} labels for {requests} requests", flush=True)
    produce(settings.broker, input_topic("fraud", "chargebacks"), labelled, total=len(labelled))
    return expected_rows(events, labelled)


def wait_for_pairs(settings: Settings, expected: list[Expected], timeout: float) -> bool:
    """Wait until every experiment has the rows it should end with (True), or ``timeout``."""
    client = None
    deadline = time.monotonic() + timeout
    last: list[tuple[int, int, int]] = []
    while time.monotonic() < deadline:
        rows = []
        for exp in expected:
            try:
                client = client or connect(settings)
                rows.append(
                    tuple(
                        client.query(
                            "SELECT countIf(stage >= 2), countIf(stage = 3), countIf(stage = 1) "
                            "FROM pairs FINAL WHERE experiment = {e:String}",
                            parameters={"e": exp.experiment},
                        ).result_rows[0]
                    )
                )
            except Exception:  # noqa: BLE001 - the table appears with the first insert
                rows.append((0, 0, 0))
        if rows != last:
            line = "; ".join(_progress(e, r) for e, r in zip(expected, rows, strict=True))
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
            last = rows
        if all(
            r[0] >= e.paired and r[1] >= e.labelled and r[2] >= e.unpaired
            for e, r in zip(expected, rows, strict=True)
        ):
            sys.stderr.write("\n")
            return True
        time.sleep(0.5)
    sys.stderr.write("\n")
    return False


def _progress(e: Expected, row: tuple[int, int, int]) -> str:
    name = e.experiment.split(".", 1)[1]
    line = f"{name}: compared {row[0]}/{e.paired}, {row[1]}/{e.labelled} labelled"
    return line + (f", {row[2]}/{e.unpaired} missing B" if e.unpaired else "")


def segment_finding(report) -> str:
    """One line on the segments of ``a_vs_b``: where B is worse although better overall."""
    s = report.segments
    worse = s.worse() if s is not None else []
    if not worse:
        return (
            "-> Segments: no channel where B is significantly worse at this size (the kiosk "
            "effect shows at the default 20,000 requests)."
        )
    where = ", ".join(f"{v.label} ({', '.join(v.worse())})" for v in worse)
    head = "B is better overall but" if s.hidden() else "B is"
    why = (
        ": the kiosks came after B's retraining data, and at kiosks fraud peaks in the "
        "afternoon, which B's hour features learnt as safe (A ignores the hour)"
        if any(v.label == "channel=kiosk" for v in worse)
        else ""
    )
    return f"-> Segments: {head} significantly worse for {where}{why}."


def srm_finding(report) -> str:
    """One line on the canary: its verdict withheld for a sample-ratio mismatch, or not."""
    r = report.srm
    if r is not None and r.fired:
        sv = report.statistical_verdict
        said = f" (the tests alone say {sv.label})" if sv is not None else ""
        dead = report.dead_letters.get("bad input", 0)
        return (
            f"-> Canary: verdict withheld{said}: B served {r.observed:.1%} of the answers, "
            f"not {r.declared:.0%}: its feature lookup times out on foreign transactions "
            f"({dead} dead letters, bad input), so the {r.not_served} routed to it got no "
            "answer out."
        )
    return (
        "-> Canary: no sample-ratio mismatch detected at this size (B's missing answers on "
        "foreign transactions show at the default 20,000 requests)."
    )


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
        expected = send_traffic(settings, requests, seed, label_share)
        say("waiting until every request is compared")
        if not wait_for_pairs(settings, expected, timeout):
            for p in procs:
                print(f"--- {p.log_file}\n{p.log_tail(20)}")
            raise StackError(f"not every request was compared within {timeout:.0f} s")
        time.sleep(0.5)
        client = connect(settings)
        report = build_report(client, EXPERIMENT, margin=dag.nodes["a_vs_b"].margin)
        say(f"report for experiment {EXPERIMENT}")
        print(report.render())
        print("\n" + segment_finding(report))
        canary = build_report(client, CANARY, margin=dag.nodes["canary"].margin)
        say(f"report for experiment {CANARY} (B's model as fraud_b_canary, serving 10%)")
        print(canary.render())
        print("\n" + srm_finding(canary))
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
