"""Rough edges of issue 19 (item 6): each test failed on the code before its fix.

`abdag produce` argument order, a missing or bad JSON-lines file (on the real broker),
`abdag sql` on statements that are not SELECTs, the dashboard's numeric parameters, two
library log lines that ordinary operation triggered, and a raw pickle given as a model.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import MethodType, SimpleNamespace

import pytest
import torch
from torch import nn

from abdag import cli
from abdag.agents import logfilters
from abdag.agents.logfilters import (
    CLICKHOUSE_HTTP_LOGGER,
    FAUST_CONSUMER_LOGGER,
    DroppedMessage,
    install_log_filters,
)
from abdag.clickhouse import connect
from abdag.comparators.schema import ensure_schema
from abdag.dashboard import make_server
from abdag.models import ModelError, load_model
from abdag.settings import Settings
from abdag.stack.processes import free_port
from abdag.topics import input_topic
from tests.test_dashboard import _insert, _pair_rows
from tests.workers import read_topic

SOURCE_DAG = """
from abdag import Dag

dag = Dag({name!r}, partitions=4)
tx = dag.source("tx")
"""


def abdag(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "abdag.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def source_dag(tmp_path: Path) -> tuple[Path, str]:
    name = f"rough_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.py"
    path.write_text(SOURCE_DAG.format(name=name))
    return path, name


def events_file(path: Path, n: int, *, bad_line: int | None = None) -> Path:
    lines = [json.dumps({"request_id": f"r{i}", "x": i}) for i in range(1, n + 1)]
    if bad_line is not None:
        lines[bad_line - 1] = '{"request_id": "r6", "x": '  # cut short
    path.write_text("\n".join(lines) + "\n")
    return path


# -- 1. produce: options before or after FILE ------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["d.py", "ev.jsonl", "--source", "tx"],
        ["d.py", "--source", "tx", "ev.jsonl"],  # the README's order
        ["d.py", "--source", "tx", "--rate", "50", "ev.jsonl", "--seed", "3"],
        ["--source", "tx", "d.py", "ev.jsonl"],
    ],
)
def test_produce_takes_source_and_rate_before_or_after_the_file(argv):
    args = cli.build_parser().parse_args(["produce", *argv])
    assert (args.dag_file, args.file, args.source, args.synthetic) == (
        "d.py",
        "ev.jsonl",
        "tx",
        None,
    )


def test_produce_file_and_synthetic_stay_mutually_exclusive(capsys):
    args = cli.build_parser().parse_args(["produce", "d.py", "--source", "tx", "--synthetic", "5"])
    assert (args.file, args.synthetic) == (None, 5)
    for argv, error in (
        (["d.py", "--source", "tx", "ev.jsonl", "--synthetic", "5"], "not both"),
        (["d.py", "--source", "tx"], "give FILE or --synthetic N"),
    ):
        with pytest.raises(SystemExit) as info:
            cli.build_parser().parse_args(["produce", *argv])
        assert info.value.code == 2
        assert capsys.readouterr().err.rstrip().endswith(error)


# -- 2, 3. produce: a missing file, a bad line ------------------------------------------


def test_produce_a_missing_file_is_one_line_naming_it(stack_env, tmp_path):
    dag, _ = source_dag(tmp_path)
    missing = tmp_path / "nowhere.jsonl"
    got = abdag(stack_env, "produce", str(dag), "--source", "tx", str(missing))
    assert got.returncode == 2
    assert "Traceback" not in got.stderr
    assert got.stderr.strip() == (
        f"abdag produce: {missing}: cannot read the events file: No such file or directory"
    )


def test_produce_stops_at_a_bad_line_after_delivering_the_lines_before_it(
    stack, stack_env, tmp_path
):
    dag, name = source_dag(tmp_path)
    events = events_file(tmp_path / "events.jsonl", 9, bad_line=6)
    got = abdag(stack_env, "produce", str(dag), "--source", "tx", str(events))
    assert got.returncode == 2, got.stderr
    assert "Traceback" not in got.stderr
    last = got.stderr.strip().splitlines()[-1]
    assert last.startswith(f"abdag produce: {events} line 6: not JSON (")
    assert last.endswith("); 5 events were sent before it")
    records = read_topic(stack.broker, input_topic(name, "tx"), expect=5, timeout=30)
    assert sorted(body["request_id"] for _, _, body in records) == [f"r{i}" for i in range(1, 6)]


def test_produce_sends_an_800_kb_event_and_stops_at_a_5_mb_one_naming_it(
    stack, stack_env, tmp_path
):
    dag, name = source_dag(tmp_path)
    events = tmp_path / "large.jsonl"
    lines = [json.dumps({"request_id": f"r{i}", "x": i}) for i in (1, 2)]
    lines.append(json.dumps({"request_id": "big", "blob": "x" * 800_000}))
    lines.append(json.dumps({"request_id": "huge", "blob": "x" * 5_000_000}))
    events.write_text("\n".join(lines) + "\n")
    got = abdag(stack_env, "produce", str(dag), "--source", "tx", str(events))
    assert got.returncode == 2 and "Traceback" not in got.stderr, got.stderr
    last = got.stderr.strip().splitlines()[-1]
    assert last.startswith("abdag produce: event 4 (5000034 bytes) not sent: ")
    assert last.endswith("; 3 events were sent before it")
    records = read_topic(stack.broker, input_topic(name, "tx"), expect=3, timeout=30)
    assert sorted(body["request_id"] for _, _, body in records) == ["big", "r1", "r2"]


def test_produce_in_the_readme_order_delivers_the_file(stack, stack_env, tmp_path):
    dag, name = source_dag(tmp_path)
    events = events_file(tmp_path / "events.jsonl", 4)
    got = abdag(stack_env, "produce", str(dag), "--source", "tx", str(events), "--rate", "100")
    assert got.returncode == 0, got.stderr
    assert f"4 events delivered to {input_topic(name, 'tx')}" in got.stdout
    assert len(read_topic(stack.broker, input_topic(name, "tx"), expect=4, timeout=30)) == 4


# -- 4. abdag sql on statements that are not SELECTs -------------------------------------


def sql(stack: Settings, capsys, query: str, fmt: str = "table") -> tuple[int, str, str]:
    code = cli.main(["--clickhouse-url", stack.clickhouse_url, "sql", "--format", fmt, query])
    out, err = capsys.readouterr()
    return code, out, err


def test_sql_kill_query_prints_its_table_with_column_names(stack, capsys):
    code, out, err = sql(stack, capsys, "KILL QUERY WHERE 1")
    assert code == 0, err
    header = out.splitlines()[0].split()
    assert header == ["kill_status", "query_id", "user", "query"]
    assert out.rstrip().endswith("row)") or out.rstrip().endswith("rows)")
    code, out, _ = sql(stack, capsys, "KILL QUERY WHERE 1", "json")
    assert code == 0 and all("kill_status" in row for row in json.loads(out))


def test_sql_statements_without_a_table_say_so(stack, capsys):
    assert sql(stack, capsys, "KILL QUERY WHERE 0")[:2] == (
        0,
        "ok: the statement returned no table\n",
    )
    assert sql(stack, capsys, "KILL QUERY WHERE 0", "json")[:2] == (0, "[]\n")
    code, out, err = sql(stack, capsys, "SET max_threads = 1")  # refused: readonly
    assert code == 2 and out == "" and err.startswith("abdag sql: ") and "READONLY" in err
    assert len(err.splitlines()) == 1


def test_sql_other_non_select_statements_print_tables(stack, capsys):
    ensure_schema(connect(stack))
    code, out, err = sql(stack, capsys, "EXISTS TABLE pairs")
    assert code == 0 and out.split() == ["result", "------", "1", "(1", "row)"], err
    code, out, _ = sql(stack, capsys, "DESCRIBE pairs")
    assert code == 0 and out.split()[:2] == ["name", "type"] and "experiment" in out
    code, out, _ = sql(stack, capsys, "SHOW TABLES")
    assert code == 0 and out.splitlines()[0] == "name" and "pairs" in out.split()


# -- 5. the dashboard's numeric parameters ----------------------------------------------


@pytest.fixture(scope="module")
def dashboard(stack):
    experiment = f"rough_{uuid.uuid4().hex[:6]}.ab"
    client = connect(stack)
    ensure_schema(client)
    _insert(client, _pair_rows(experiment, 80, seed=3))
    client.close()
    srv = make_server(stack, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.url, experiment
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0", "abc", "1.5", "1e999", "4e9"])
def test_dashboard_bad_bucket_is_a_400_naming_it_and_its_range(dashboard, value):
    url, experiment = dashboard
    status, body = _get(f"{url}api/timeline?experiment={experiment}&bucket={value}")
    assert status == 400, body
    assert body["error"] == (f"bucket must be a whole number from 1 to 31622400, got {value!r}")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-0.1", "abc"])
def test_dashboard_bad_margin_is_a_400_naming_it_and_its_range(dashboard, value):
    url, experiment = dashboard
    status, body = _get(f"{url}api/report?experiment={experiment}&margin={value}")
    assert status == 400, body
    assert body["error"] == f"margin must be a number >= 0, got {value!r}"


def test_dashboard_good_numbers_still_answer(dashboard):
    url, experiment = dashboard
    status, body = _get(f"{url}api/timeline?experiment={experiment}&bucket=60")
    assert status == 200 and body["bucket_seconds"] == 60
    status, body = _get(f"{url}api/report?experiment={experiment}&margin=0.05")
    assert status == 200 and body["margin"] == 0.05


# -- 6. two library log lines ------------------------------------------------------------


@pytest.fixture
def no_filters():
    """Start and end without abdag's filters on the two loggers (they are process-wide),
    and without any other filter on them meanwhile (the broker watch's repeat limiter,
    installed by a worker test in this process, would hold these test messages back)."""
    loggers = [logging.getLogger(n) for n in (CLICKHOUSE_HTTP_LOGGER, FAUST_CONSUMER_LOGGER)]
    others = {
        lg.name: [f for f in lg.filters if not isinstance(f, DroppedMessage)] for lg in loggers
    }

    def strip() -> None:
        for lg in loggers:
            for f in list(lg.filters):
                lg.removeFilter(f)

    strip()
    yield
    strip()
    for lg in loggers:
        for f in others[lg.name]:
            lg.addFilter(f)


def test_filters_name_the_loggers_and_messages_the_libraries_use():
    from clickhouse_connect.driver._backend import http_sync
    from faust.transport.drivers import aiokafka

    assert http_sync.logger.name == CLICKHOUSE_HTTP_LOGGER
    assert f'"{logfilters.CLICKHOUSE_HTTP_FAILED}"' in inspect.getsource(http_sync)
    assert aiokafka.logger.name == FAUST_CONSUMER_LOGGER
    assert (
        logfilters.FAUST_STREAM_IDLE_SINCE_START == aiokafka.SLOW_PROCESSING_STREAM_IDLE_SINCE_START
    )


def test_clickhouse_driver_warning_is_dropped_and_its_neighbours_kept(no_filters, caplog):
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import OperationalError

    def failed_connect() -> list[str]:
        caplog.clear()
        with (
            caplog.at_level(logging.DEBUG, logger=CLICKHOUSE_HTTP_LOGGER),
            pytest.raises(OperationalError),  # the error the caller handles still comes
        ):
            clickhouse_connect.get_client(host="127.0.0.1", port=free_port())
        return [r.getMessage() for r in caplog.records if r.name == CLICKHOUSE_HTTP_LOGGER]

    assert "Unexpected Http Driver Exception" in failed_connect()  # the line, reproduced
    install_log_filters()
    install_log_filters()  # idempotent
    assert len(logging.getLogger(CLICKHOUSE_HTTP_LOGGER).filters) == 1
    messages = failed_connect()
    assert "Unexpected Http Driver Exception" not in messages
    assert any("Non-retryable HTTP transport error" in m for m in messages)  # DEBUG kept
    caplog.clear()
    driver = logging.getLogger(CLICKHOUSE_HTTP_LOGGER)
    driver.warning("Unexpected Http Driver Exception in a new place")
    driver.warning("Unexpected Http Driver")
    assert [r.getMessage() for r in caplog.records] == [
        "Unexpected Http Driver Exception in a new place",
        "Unexpected Http Driver",
    ]


def _faust_consumer_thread() -> SimpleNamespace:
    """Enough of an AIOKafkaConsumerThread to run Faust's own stall-report code."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
    from mode.utils.logging import CompositeLogger

    conf = SimpleNamespace(
        stream_processing_timeout=300.0, broker_commit_livelock_soft_timeout=300.0
    )
    fake = SimpleNamespace(
        consumer=SimpleNamespace(app=SimpleNamespace(conf=conf)),
        log=CompositeLogger(
            logging.getLogger(FAUST_CONSUMER_LOGGER),
            formatter=lambda severity, msg, *a, **kw: f"[^---AIOKafkaConsumerThread]: {msg}",
        ),
    )
    for name in (
        "_log_slow_processing_stream",
        "_log_slow_processing_commit",
        "_log_slow_processing",
        "_make_slow_processing_error",
    ):
        setattr(fake, name, MethodType(getattr(AIOKafkaConsumerThread, name), fake))
    return fake


def test_faust_stream_idle_since_start_is_dropped_and_real_stalls_kept(no_filters, caplog):
    from faust.transport.drivers import aiokafka
    from faust.types import TP

    thread = _faust_consumer_thread()
    tp = TP("abdag.rough.tx", 2)

    def report() -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=FAUST_CONSUMER_LOGGER):
            for template in (
                aiokafka.SLOW_PROCESSING_STREAM_IDLE_SINCE_START,
                aiokafka.SLOW_PROCESSING_STREAM_IDLE,
            ):
                thread._log_slow_processing_stream(template, tp, "15.56 minutes ago")
            thread._log_slow_processing_commit(
                aiokafka.SLOW_PROCESSING_NO_RECENT_COMMIT, tp, "15.56 minutes ago"
            )
            thread.log.error("Stream has not started processing, a message of our own")
        return [r.getMessage().splitlines()[0] for r in caplog.records]

    assert report()[0] == (
        "[^---AIOKafkaConsumerThread]: Stream has not started processing "
        "TP(topic='abdag.rough.tx', partition=2) (started 15.56 minutes ago). "
    )
    install_log_filters()
    assert report() == [
        "[^---AIOKafkaConsumerThread]: Stream stopped processing, or is slow for "
        "TP(topic='abdag.rough.tx', partition=2) (last inbound 15.56 minutes ago). ",
        "[^---AIOKafkaConsumerThread]: Has not committed "
        "TP(topic='abdag.rough.tx', partition=2) (last commit 15.56 minutes ago). ",
        "[^---AIOKafkaConsumerThread]: Stream has not started processing, a message of our own",
    ]


def test_the_worker_command_runs_with_the_filters_installed(no_filters, monkeypatch):
    seen: dict[str, list] = {}

    def fake_worker(args, settings) -> int:
        for name in (CLICKHOUSE_HTTP_LOGGER, FAUST_CONSUMER_LOGGER):
            seen[name] = [
                f for f in logging.getLogger(name).filters if isinstance(f, DroppedMessage)
            ]
        return 0

    from abdag import commands

    monkeypatch.setitem(commands.COMMANDS, "worker", fake_worker)
    assert cli.main(["worker", "dag.py"]) == 0
    assert {name: len(fs) for name, fs in seen.items()} == {
        CLICKHOUSE_HTTP_LOGGER: 1,
        FAUST_CONSUMER_LOGGER: 1,
    }


def test_abdag_sql_with_clickhouse_down_prints_one_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "ABDAG_CLICKHOUSE_URL": url, "ABDAG_DATA_DIR": str(tmp_path)}
    got = abdag(env, "sql", "SELECT 1")
    assert got.returncode == 2
    assert "Unexpected Http Driver Exception" not in got.stderr
    assert got.stderr.startswith("abdag sql: ClickHouse is unreachable at http://127.0.0.1:")
    assert len(got.stderr.strip().splitlines()) == 1


# -- 7. a raw pickle given as a model ----------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "kind"),
    [
        (nn.Linear(3, 1), "torch.nn.modules.linear.Linear"),
        (nn.Linear(3, 1).state_dict(), "collections.OrderedDict"),
        ({"weights": [1.0, 2.0]}, "dict"),
    ],
)
@pytest.mark.parametrize("model_class", [None, "torch.nn:Linear"])
def test_a_raw_pickle_says_what_it_holds_and_what_to_do(tmp_path, obj, kind, model_class):
    path = tmp_path / "model.pkl"
    with path.open("wb") as fh:
        pickle.dump(obj, fh)
    kwargs = {"in_features": 3, "out_features": 1} if model_class else None
    with pytest.raises(ModelError) as info:
        load_model(path, model_class=model_class, model_kwargs=kwargs)
    message = str(info.value)
    assert message.startswith(f"{path}: is a pickle of a {kind} (not a torch.save state_dict)")
    assert "plain state_dict" not in message
    assert "torch.jit.save" in message and "model.state_dict()" in message
    assert "model_class=" in message


def test_a_legacy_torch_save_is_still_a_state_dict(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.manual_seed(0)
    torch.save(nn.Linear(3, 1).state_dict(), path, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelError, match="is a plain state_dict"):
        load_model(path)
    model = load_model(
        path, model_class="torch.nn:Linear", model_kwargs={"in_features": 3, "out_features": 1}
    )
    assert model.format == "state_dict"


def test_registering_a_raw_pickle_says_what_it_holds_not_state_dict(tmp_path):
    import pickle

    from abdag.models import ModelError
    from abdag.models.registry import ModelRegistry

    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(torch.nn.Linear(2, 1)))
    with pytest.raises(ModelError) as refused:
        ModelRegistry(tmp_path / "registry").register("m", path)
    said = str(refused.value)
    assert "is a pickle of a torch.nn.modules.linear.Linear" in said
    assert "plain state_dict" not in said
