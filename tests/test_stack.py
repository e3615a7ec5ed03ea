"""`abdag up / status / down` on real processes, and a round-trip through the broker."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from abdag.stack import LocalStack, StackError
from tests.conftest import make_settings


def abdag(settings, *args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        ABDAG_BROKER=settings.broker,
        ABDAG_CLICKHOUSE_URL=settings.clickhouse_url,
        ABDAG_DATA_DIR=str(settings.data_dir),
    )
    return subprocess.run(
        [sys.executable, "-m", "abdag.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_up_status_down_cycle_is_idempotent_and_keeps_clickhouse_data(tmp_path):
    settings = make_settings(tmp_path / "data")
    up = abdag(settings, "up")
    assert up.returncode == 0, up.stderr
    try:
        first_pids = LocalStack(settings).status()
        assert all(s.answers for s in first_pids)
        again = abdag(settings, "up")  # idempotent: nothing new started
        assert again.returncode == 0, again.stderr
        assert [s.pid for s in LocalStack(settings).status()] == [s.pid for s in first_pids]
        status = abdag(settings, "status")
        assert status.returncode == 0 and status.stdout.count(" up ") == 2, status.stdout

        from abdag.clickhouse import connect

        client = connect(settings)
        client.command("CREATE TABLE kept (x UInt32) ENGINE = MergeTree ORDER BY x")
        client.insert("kept", [[1], [2], [3]], column_names=["x"])
    finally:
        down = abdag(settings, "down")
    assert down.returncode == 0 and "clickhouse" in down.stdout and "broker" in down.stdout
    assert abdag(settings, "status").returncode == 1
    assert "nothing was running" in abdag(settings, "down").stdout

    assert abdag(settings, "up").returncode == 0
    try:
        from abdag.clickhouse import connect

        assert connect(settings).query("SELECT sum(x) FROM kept").result_rows == [(6,)]
    finally:
        abdag(settings, "down")


def test_up_refuses_a_taken_port_with_a_clear_message(tmp_path):
    settings = make_settings(tmp_path / "data")
    host, port = settings.broker_host_port
    blocker = socket.socket()
    blocker.bind((host, port))
    blocker.listen()
    try:
        result = abdag(settings, "up")
    finally:
        blocker.close()
        abdag(settings, "down")
    assert result.returncode == 2
    assert f"port {port}" in result.stderr and "taken" in result.stderr
    assert "Traceback" not in result.stderr


def test_stale_pid_file_is_ignored_and_replaced(tmp_path):
    settings = make_settings(tmp_path / "data")
    run = settings.run_dir()
    run.mkdir(parents=True)
    (run / "broker.pid").write_text('{"pid": 999999, "argv": ["tansu"]}')
    stack = LocalStack(settings)
    assert stack.broker.is_stale()
    try:
        statuses = stack.up()
        assert statuses[0].answers and statuses[0].pid != 999999
    finally:
        stack.down()


def test_remote_addresses_are_refused_by_up(tmp_path):
    settings = make_settings(tmp_path / "data").with_overrides(broker="10.1.2.3:9092")
    with pytest.raises(StackError, match="127.0.0.1 only"):
        LocalStack(settings).up()


def test_confluent_kafka_round_trip_through_the_broker(stack):
    topic = f"roundtrip-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": stack.broker})
    sent = [f"message-{i}".encode() for i in range(100)]
    for value in sent:
        producer.produce(topic, value=value, partition=0)
    assert producer.flush(20) == 0
    consumer = Consumer(
        {"bootstrap.servers": stack.broker, "group.id": "t", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    got = []
    try:
        while len(got) < len(sent):
            msg = consumer.poll(10)
            assert msg is not None, f"timed out after {len(got)} messages"
            assert msg.error() is None, msg.error()
            got.append(msg.value())
    finally:
        consumer.close()
    assert got == sent


def test_credentials_set_for_up_are_required_by_the_endpoint_and_work_for_abdag_sql(tmp_path):
    import base64
    import urllib.request

    settings = make_settings(tmp_path / "data")
    secret = f"pw-{uuid.uuid4().hex}"
    creds = {"ABDAG_CLICKHOUSE_USER": "alice", "ABDAG_CLICKHOUSE_PASSWORD": secret}

    def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if not k.startswith("ABDAG_CLICKHOUSE_")}
        base.update(
            ABDAG_BROKER=settings.broker,
            ABDAG_CLICKHOUSE_URL=settings.clickhouse_url,
            ABDAG_DATA_DIR=str(settings.data_dir),
            **env,
        )
        return subprocess.run(
            [sys.executable, "-m", "abdag.cli", *args],
            env=base,
            capture_output=True,
            text=True,
            timeout=120,
        )

    up = run("up", env=creds)
    assert up.returncode == 0, up.stderr
    try:
        ok = run("sql", "SELECT 40 + 2 AS answer", "--format", "csv", env=creds)
        assert ok.returncode == 0 and ok.stdout.strip().splitlines()[-1] == "42", ok.stderr
        refused = run("sql", "SELECT 1", env={})
        assert refused.returncode == 2 and "refused user 'default'" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and secret not in refused.stderr
        request = urllib.request.Request(  # curl -u alice:... does the same
            settings.clickhouse_url + "/", data=b"SELECT 7", method="POST"
        )
        token = base64.b64encode(f"alice:{secret}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.read().strip() == b"7"
        log = (settings.run_dir() / "clickhouse.log").read_text(errors="replace")
        assert secret not in log
    finally:
        run("down", env=creds)
