"""The handlers behind ``abdag COMMAND``; each imports what it needs when it runs.

The CLI (:mod:`abdag.cli`) parses the arguments and calls ``COMMANDS[name]``; handlers
never import the CLI back.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from abdag.errors import UserError
from abdag.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], int]
COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    """Register the handler of ``abdag NAME``."""

    def register(fn: Handler) -> Handler:
        COMMANDS[name] = fn
        return fn

    return register


@command("up")
def up(args: argparse.Namespace, settings: Settings) -> int:
    from abdag.stack import LocalStack

    for s in LocalStack(settings).up():
        print(s.line())
    return 0


@command("down")
def down(args: argparse.Namespace, settings: Settings) -> int:
    from abdag.stack import LocalStack

    stopped = LocalStack(settings).down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


@command("status")
def status(args: argparse.Namespace, settings: Settings) -> int:
    from abdag.stack import LocalStack
    from abdag.stack.broker import broker_report

    rows = LocalStack(settings).status()
    for s in rows:
        print(s.line())
    if rows and rows[0].answers:  # the broker: its start, durability, the workers on it
        for line in broker_report(settings.broker, settings.run_dir()):
            print(line)
    return 0 if all(s.answers for s in rows) else 1


def _load_valid_dag(path: str, *, load_models: bool = True, command: str = ""):
    """Load and validate a DAG file; with ``load_models``, dry-run its models and print
    what the dry run warns about (``abdag COMMAND: warning: ...``) on stderr."""
    from abdag.agents.loader import load_dag
    from abdag.agents.validate import validate

    dag = load_dag(path)
    validate(dag, load_models=load_models)
    if load_models:
        _print_output_warnings(dag, command)
    return dag


def _print_output_warnings(dag, command: str) -> None:
    from abdag.agents.nodes.model import output_warnings

    for line in output_warnings(dag):
        print(f"abdag {command}: warning: {line}", file=sys.stderr, flush=True)


@command("topics")
def topics(args: argparse.Namespace, settings: Settings) -> int:
    from abdag.agents.topology import dag_topics
    from abdag.agents.validate import validate
    from abdag.models import ModelError
    from abdag.topics.admin import ensure_topics

    dag = _load_valid_dag(args.dag_file, load_models=False)
    try:  # the models' dry run too, for its warnings: a model that fails stops only workers
        validate(dag)
    except (ValueError, ModelError) as exc:
        print(f"abdag topics: note: models not dry-run: {exc}", file=sys.stderr, flush=True)
    else:
        _print_output_warnings(dag, "topics")
    for info in ensure_topics(settings.broker, dag_topics(dag), dag.partitions):
        state = "created" if info.created else "exists"
        print(f"{info.name:<60} {info.partitions:>3} partitions  {state}")
    return 0


@command("worker")
def worker(args: argparse.Namespace, settings: Settings) -> int:

    from abdag.agents.app import REQUIRED_RECORD_BYTES, build_app
    from abdag.agents.config import freeze_startup_heap, tune_interpreter
    from abdag.agents.faust_compat import hold_log_level, run_worker
    from abdag.agents.producer import RecordLimitTooSmall, record_limit
    from abdag.agents.topology import dag_topics
    from abdag.models import ModelError, apply_cpu_threads
    from abdag.topics.admin import ensure_topics

    tune_interpreter()
    try:
        apply_cpu_threads(settings.torch_threads)
    except ModelError as exc:
        raise UserError(str(exc)) from exc
    dag = _load_valid_dag(args.dag_file, command="worker")
    topics = dag_topics(dag)
    ensure_topics(settings.broker, topics, dag.partitions)
    try:
        limit = record_limit(settings.broker, list(topics), REQUIRED_RECORD_BYTES)
    except RecordLimitTooSmall as exc:
        raise UserError(str(exc)) from exc
    app, _ = build_app(dag, settings, max_record_bytes=limit)
    hold_log_level(app, args.loglevel)
    freeze_startup_heap()
    run_worker(app, args.loglevel, args.web_port)
    return 0


@command("produce")
def produce(args: argparse.Namespace, settings: Settings) -> int:
    from abdag.agents.dag import Source
    from abdag.agents.topology import dag_topics
    from abdag.topics import input_topic
    from abdag.topics.admin import ensure_topics
    from abdag.topics.producer import produce as send
    from abdag.topics.producer import read_jsonl

    dag = _load_valid_dag(args.dag_file, load_models=False)
    node = dag.nodes.get(args.source)
    if node is None or not node.takes_input:
        sources = [n.name for n in dag.nodes.values() if n.takes_input]
        raise UserError(f"{args.source!r} is not a source of DAG {dag.name!r}; sources: {sources}")
    if args.synthetic is not None:
        if not isinstance(node, Source) or node.sampler is None:
            raise UserError(f"source {node.name!r} has no sampler for --synthetic")
        events = node.sampler(args.synthetic, args.seed)
        total = len(events)
    else:  # opened now: a missing file is one line (BadEventFile) before any broker call
        events, total = read_jsonl(args.file), None
    ensure_topics(settings.broker, dag_topics(dag), dag.partitions)
    topic = input_topic(dag.name, node.name)
    n = send(settings.broker, topic, events, total=total, rate=args.rate)
    print(f"{n} events delivered to {topic}")
    return 0


@command("sql")
def sql(args: argparse.Namespace, settings: Settings) -> int:
    from clickhouse_connect.driver.exceptions import DatabaseError

    from abdag.clickhouse import connect
    from abdag.tables import render

    client = connect(settings, readonly=True)
    try:
        table = _sql_table(client, args.query)
    except DatabaseError as exc:
        raise UserError(str(exc).strip().splitlines()[0]) from None
    if table is None:  # KILL QUERY that matched nothing, USE ...: nothing to print but that
        print({"json": "[]", "csv": ""}.get(args.format, "ok: the statement returned no table"))
        return 0
    columns, rows = table
    if not columns and not rows and args.format == "table":
        print("(0 rows)")  # a SELECT of no rows: the server may send no header either
        return 0
    print(render(columns, rows, args.format))
    return 0


def _sql_table(client, query: str) -> tuple[list[str], list] | None:
    """``(columns, rows)`` of a statement's result, or None when it returns no table.

    clickhouse-connect runs statements that start like a command (KILL, CHECK, SET, USE,
    ...) through ``command()``, which returns bare rows without column names: ``KILL QUERY
    WHERE 1`` came back as one four-value row under no columns (``zip()`` failed on it).
    Those are asked for as JSONCompact, which carries the names; a statement that takes no
    FORMAT clause (SET, USE) is a syntax error that way and runs as the command it is.
    """
    import json

    from clickhouse_connect.driver.exceptions import DatabaseError

    if not client.create_query_context(query=query).is_command:
        result = client.query(query)
        return list(result.column_names), result.result_rows
    try:
        body = client.raw_query(query, fmt="JSONCompact")
    except DatabaseError as exc:
        if "SYNTAX_ERROR" not in str(exc) and "Syntax error" not in str(exc):
            raise
        client.command(query)  # the statement's own error, if it has one, is raised here
        return None
    if not body.strip():
        return None
    doc = json.loads(body)
    return [m["name"] for m in doc["meta"]], doc["data"]


@command("demo")
def demo(args: argparse.Namespace, settings: Settings) -> int:
    from abdag.demo.run import run_demo

    return run_demo(
        settings, requests=args.requests, workers=args.workers, keep_running=args.keep_running
    )


@command("report")
def report(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from abdag.clickhouse import connect
    from abdag.comparators.report import build_reports, group_members, list_experiments

    client = connect(settings, readonly=True)
    known = list_experiments(client)
    members = (
        [args.experiment] if args.experiment in known else group_members(client, args.experiment)
    )
    if not members:
        raise UserError(
            f"no experiment or group {args.experiment!r} in ClickHouse; "
            f"experiments: {known or 'none yet'}"
        )
    # a group's segments: Benjamini-Hochberg over every challenger's tests together
    reports = build_reports(client, members, margin=args.margin)
    if args.json:
        out = [r.to_dict() for r in reports]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
        return 0
    for r in reports:
        print(r.render() + "\n")
        if args.show_sql:
            print("-- the SQL behind this report")
            for statement in r.sql:
                print(statement.strip() + ";\n")
    if len(reports) > 1:
        print(f"{len(reports)} challengers against the champion (alpha split over them):")
        for r in reports:
            action = {
                "B worse": "retire it: abdag retire " + r.experiment,
                "B better": "a candidate: abdag promote " + r.experiment,
                "withheld": "the served split is not the declared one (SRM): find why first",
            }
            print(f"  {r.model_b:<20} {r.verdict.label:<16} {action.get(r.verdict.label, '')}")
    return 0


@command("watch")
def watch(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from abdag.clickhouse import connect
    from abdag.watch import Watcher, check_webhook_url

    if not 0 < args.every < float("inf"):
        raise UserError(f"--every must be a positive number of seconds, got {args.every:g}")
    url = args.webhook or settings.webhook_url
    if url:
        check_webhook_url(url)
    watcher = Watcher(
        connect(settings),
        args.experiment,
        webhook_url=url,
        log=lambda line: print(line, flush=True),
    )
    what = ", ".join(args.experiment) or "every experiment"
    to = f"; alerts to webhook {watcher.webhook.host}" if watcher.webhook else ""
    print(f"watching {what} every {args.every:g} s{to}", flush=True)
    failed = False
    try:
        while True:
            started = time.monotonic()
            try:
                watcher.run_round()
                failed = False
            except Exception as exc:  # noqa: BLE001 - ClickHouse away: try again next round
                failed = True
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                print(f"watch: round failed: {first}", flush=True)
            if args.once:
                break
            time.sleep(max(0.0, args.every - (time.monotonic() - started)))
    except KeyboardInterrupt:
        watcher.close(timeout=5.0)  # stopped: running deliveries get 5 s, then give up
        raise
    watcher.close()  # every delivery delivered or given up (~80 s at most), and recorded
    return 1 if failed else 0


@command("dashboard")
def dashboard(args: argparse.Namespace, settings: Settings) -> int:
    from abdag.dashboard import serve

    serve(settings, host=args.host, port=args.port)
    return 0


def _registry(settings: Settings):
    from abdag.models.registry import ModelRegistry

    return ModelRegistry(settings.registry_dir())  # where workers read it too


def _model_file(ref: str, settings: Settings):
    """A model file path, or a registry reference (name, name@v2) resolved to its file."""
    from pathlib import Path

    return Path(ref) if Path(ref).is_file() else _registry(settings).resolve(ref)


@command("init")
def init(args: argparse.Namespace, settings: Settings) -> int:
    import json
    from pathlib import Path

    from abdag.init import init_experiment, smoke_run

    source = Path(args.example or args.schema)
    try:
        doc = json.loads(source.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{source}: cannot read JSON: {exc}") from None
    result = init_experiment(
        args.name,
        _model_file(args.a, settings),
        _model_file(args.b, settings),
        example=doc if args.example else None,
        schema=doc if args.schema else None,
        task=args.task,
        out_dir=Path(args.out or args.name),
        model_class_a=args.model_class_a,
        model_class_b=args.model_class_b,
        force=args.force,
    )
    print(result.render())
    if not args.no_check:
        print("\nchecking it on 100 synthetic events against the local stack ...", flush=True)
        counts = smoke_run(result.dag_file, settings)
        print(f"ok: {counts['paired']} of {counts['sent']} requests compared")
        print(f"see: abdag report {result.experiment}")
    return 0


@command("models")
def models_command(args: argparse.Namespace, settings: Settings) -> int:
    registry = _registry(settings)
    if args.models_command == "register":
        v = registry.register(args.name, args.file, task=args.task, model_class=args.model_class)
        print(f"{v.ref}  {v.format}  sha256 {v.sha256[:12]}  {v.path}")
        return 0
    versions = registry.all()
    if not versions:
        print(
            f"no models registered in {registry.root}; "
            "add one with: abdag models register NAME FILE"
        )
        return 0
    for v in versions:
        print(f"{v.ref:<30} {v.format:<12} {v.sha256[:12]}  {v.created}  {v.task or ''}")
    return 0


def _record_decision(args: argparse.Namespace, settings: Settings, action: str) -> int:
    from abdag.clickhouse import connect
    from abdag.comparators.decisions import PromotionRefused, decide_promotion, decide_retirement

    decide = decide_promotion if action == "promote" else decide_retirement
    try:
        d = decide(connect(settings), args.experiment, force=args.force, note=args.note)
    except PromotionRefused as exc:
        raise UserError(str(exc)) from None
    forced = " (forced, against the verdict: recorded)" if d.forced else ""
    what = "B is now the served model" if action == "promote" else "challenger retired"
    print(f"{d.experiment}: {what}{forced}; verdict {d.verdict!r}")
    return 0


@command("promote")
def promote(args: argparse.Namespace, settings: Settings) -> int:
    return _record_decision(args, settings, "promote")


@command("retire")
def retire(args: argparse.Namespace, settings: Settings) -> int:
    return _record_decision(args, settings, "retire")


@command("undo")
def undo(args: argparse.Namespace, settings: Settings) -> int:
    from abdag.clickhouse import connect
    from abdag.comparators.decisions import NothingToUndo
    from abdag.comparators.decisions import undo as undo_decision

    try:
        d = undo_decision(connect(settings), args.experiment, note=args.note)
    except NothingToUndo as exc:
        raise UserError(str(exc)) from None
    print(f"{d.experiment}: undone, {d.action} recorded (the state before it); {d.served} serves")
    return 0
