"""The ``abdag`` command line.

Every subcommand reads one :class:`~abdag.settings.Settings` (env ``ABDAG_*``, overridden by
the global flags) and reports problems as one clear line on stderr with exit code 2,
never a traceback for a user error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from abdag.agents.config import LOG_LEVELS
from abdag.agents.logfilters import install_log_filters
from abdag.errors import UserError
from abdag.settings import Settings


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that can take a subcommand's options between its positionals.

    argparse fills every positional it can at the first positional it meets, so for
    ``produce DAG --source S FILE`` it gave ``FILE``'s slot nothing at ``DAG`` and then
    refused ``FILE``; ``intermixed=True`` parses options first, then the positionals (as
    ``parse_intermixed_args`` does). ``one_of`` maps dests to their names on the command
    line: exactly one must be given (argparse's exclusive groups cannot hold a positional
    that is parsed this way).
    """

    def __init__(
        self, *args: Any, intermixed: bool = False, one_of: dict[str, str] | None = None, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self._intermixed = intermixed
        self._one_of = one_of or {}
        self._in_parse = False

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if not self._intermixed or self._in_parse:  # parse_known_intermixed_args calls back
            return super().parse_known_args(args, namespace)
        self._in_parse = True
        try:
            ns, extras = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._in_parse = False
        given = [flag for dest, flag in self._one_of.items() if getattr(ns, dest, None) is not None]
        if self._one_of and len(given) != 1:
            names = " or ".join(self._one_of.values())
            self.error(f"give {names}, not both" if given else f"give {names}")
        return ns, extras


TASKS = ["binary", "multiclass", "regression"]
TASK_HELP = "binary (one score), multiclass (one score per class) or regression (a value)"


def _command(sub: Any, name: str, help: str, **kw: Any) -> argparse.ArgumentParser:
    """A subcommand whose ``abdag NAME -h`` starts with the line ``abdag -h`` lists."""
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", **kw)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="abdag",
        description="A/B test a retrained ML model (B) against the one in production (A) on "
        "live Kafka traffic: a DAG of Faust workers, ClickHouse metrics and a verdict.",
        epilog="abdag COMMAND -h tells about one command.",
    )
    p.add_argument("--broker", help="Kafka bootstrap host:port (env ABDAG_BROKER)")
    p.add_argument(
        "--clickhouse-url",
        help="http://host:port or chdb:///abs/path (env ABDAG_CLICKHOUSE_URL)",
    )
    p.add_argument("--data-dir", help="local stack data directory (env ABDAG_DATA_DIR)")
    p.add_argument("--database", help="ClickHouse database (env ABDAG_DATABASE)")
    sub = p.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="what to do (abdag COMMAND -h)"
    )
    dag_help = "the DAG file (a Python file that builds a Dag)"
    experiment_help = "the experiment, <dag>.<comparison> (as abdag report names it)"

    _command(sub, "up", "start the local broker and ClickHouse endpoint")
    _command(sub, "down", "stop what `abdag up` started")
    _command(sub, "status", "show the local stack")

    w = _command(sub, "worker", "run one Faust worker for a DAG file")
    w.add_argument("dag_file", metavar="DAG_FILE", help=dag_help)
    w.add_argument(
        "--loglevel",
        default="warn",
        choices=list(LOG_LEVELS),
        help="the least severe level the worker logs (default: warn)",
    )
    w.add_argument("--web-port", type=int, default=None, help="serve Faust's web UI here")

    t = _command(sub, "topics", "create and describe a DAG's topics")
    t.add_argument("dag_file", metavar="DAG_FILE", help=dag_help)

    pr = _command(
        sub,
        "produce",
        "send events to a DAG source's input topic",
        usage="abdag produce DAG_FILE --source NAME (FILE | --synthetic N) [--rate R] [--seed S]",
        intermixed=True,  # options before or after FILE
        one_of={"file": "FILE", "synthetic": "--synthetic N"},
    )
    pr.add_argument("dag_file", metavar="DAG_FILE", help=dag_help)
    pr.add_argument("--source", required=True, help="name of the source node")
    pr.add_argument("file", nargs="?", help="a JSON-lines file, one event per line")
    pr.add_argument("--synthetic", type=int, metavar="N", help="N events from the source's sampler")
    pr.add_argument("--rate", type=float, default=None, help="events per second (default: max)")
    pr.add_argument(
        "--seed", type=int, default=0, help="seed of the --synthetic events (default: 0)"
    )

    s = _command(sub, "sql", "run a read-only SQL query on ClickHouse")
    s.add_argument("query", help='the query, e.g. "SELECT count() FROM pairs FINAL"')
    s.add_argument(
        "--format",
        choices=["table", "csv", "json"],
        default="table",
        help="how to print the rows (default: table)",
    )

    r = _command(sub, "report", "A against B for one experiment, with the verdict")
    r.add_argument("experiment", help="<dag>.<comparison>, or a champion-and-challengers group")
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.add_argument(
        "--margin",
        type=float,
        default=None,
        help="non-inferiority margin (default: the one the comparison declares)",
    )
    r.add_argument("--show-sql", action="store_true", help="print the SQL behind the report")

    i = _command(sub, "init", "write a runnable A/B DAG for two model files, and check it")
    i.add_argument("name", help="the DAG's name (experiment NAME.ab; files NAME_dag.py, ...)")
    i.add_argument("--a", required=True, help="model A: a file or a registry ref name@vN")
    i.add_argument("--b", required=True, help="model B: a file or a registry ref name@vN")
    ex = i.add_mutually_exclusive_group(required=True)
    ex.add_argument("--example", help="an example event (JSON file)")
    ex.add_argument("--schema", help="a JSON schema of the event")
    i.add_argument(
        "--task", choices=TASKS, help=TASK_HELP + " (default: told from the models' outputs)"
    )
    i.add_argument("--out", help="output folder (default: ./NAME)")
    i.add_argument("--model-class-a", help="package.module:Class for a state_dict A")
    i.add_argument("--model-class-b", help="package.module:Class for a state_dict B")
    i.add_argument("--force", action="store_true", help="overwrite an existing DAG file")
    i.add_argument("--no-check", action="store_true", help="skip the 100-event smoke run")

    m = _command(sub, "models", "the local model registry")
    msub = m.add_subparsers(
        dest="models_command", required=True, metavar="ACTION", help="register or list"
    )
    reg = _command(msub, "register", "copy a model file in as a new version")
    reg.add_argument("name", help="the model's name in the registry (a DAG reads registry:NAME)")
    reg.add_argument("file", help="the model file (TorchScript, .pt2, state_dict or ONNX)")
    reg.add_argument("--task", choices=TASKS, help=TASK_HELP + ", recorded with the version")
    reg.add_argument("--model-class", help="package.module:Class for a state_dict")
    _command(msub, "list", "every registered version")

    pm = _command(sub, "promote", "make B the served model, if the verdict allows it")
    pm.add_argument("experiment", help=experiment_help)
    pm.add_argument("--force", action="store_true", help="promote against the verdict (recorded)")
    pm.add_argument("--note", default="", help="why, for the record")

    rt = _command(sub, "retire", "retire challenger B, if the verdict says it is worse")
    rt.add_argument("experiment", help=experiment_help)
    rt.add_argument("--force", action="store_true", help="retire against the verdict (recorded)")
    rt.add_argument("--note", default="", help="why, for the record")

    ud = _command(sub, "undo", "reverse the decision in force (a person's or a policy's)")
    ud.add_argument("experiment", help=experiment_help)
    ud.add_argument("--note", default="", help="why, for the record")

    wt = _command(sub, "watch", "alert when a verdict, an SRM check or a decision changes")
    wt.add_argument(
        "experiment",
        nargs="*",
        metavar="EXPERIMENT",
        help="experiments or groups to watch (default: every experiment in ClickHouse)",
    )
    wt.add_argument(
        "--every",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds between two reads of the reports (default: 30)",
    )
    wt.add_argument(
        "--webhook",
        metavar="URL",
        help="POST each alert as JSON to this http(s) URL (env ABDAG_WEBHOOK_URL)",
    )
    wt.add_argument("--once", action="store_true", help="one round, then exit (for cron)")

    db = _command(sub, "dashboard", "serve the A/B dashboard in a browser")
    db.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    db.add_argument("--port", type=int, default=8050, help="port to listen on (default: 8050)")

    d = _command(sub, "demo", "the whole story on the embedded stack")
    d.add_argument("--requests", type=int, default=20_000, help="requests to send (default: 20000)")
    d.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    d.add_argument("--keep-running", action="store_true", help="leave stack and workers up")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    install_log_filters()  # before any command: workers, the dashboard and sql log through it
    from abdag.commands import COMMANDS

    try:
        settings = Settings.from_env().with_overrides(
            broker=args.broker,
            clickhouse_url=args.clickhouse_url,
            data_dir=args.data_dir,
            database=args.database,
        )
        return COMMANDS[args.command](args, settings)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - turn known user errors into one line
        if _is_user_error(exc):
            print(f"abdag {args.command}: {exc}", file=sys.stderr)
            return 2
        raise


def _is_user_error(exc: Exception) -> bool:
    from abdag.clickhouse import ClickHouseUnreachable
    from abdag.stack.processes import StackError
    from abdag.topics.admin import BrokerUnreachable

    known: tuple[type[Exception], ...] = (
        UserError,
        StackError,
        ClickHouseUnreachable,
        BrokerUnreachable,
        ValueError,
    )
    from abdag.agents.errors import DagError
    from abdag.models.errors import ModelError

    known += (DagError, ModelError)
    return isinstance(exc, known)


if __name__ == "__main__":
    sys.exit(main())
