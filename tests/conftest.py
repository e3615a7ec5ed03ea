"""Fixtures that start real parts: the Tansu broker and the ClickHouse endpoint.

One stack per test session (ports picked free, data in a temp dir), stopped at the end by
PID. Tests that need their own stack (stop/restart tests) build a LocalStack themselves.
"""

from __future__ import annotations

import os
import warnings

import pytest

from abdag.settings import Settings
from abdag.stack import LocalStack
from abdag.stack.processes import free_port

warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch")


def make_settings(data_dir) -> Settings:
    return Settings(
        broker=f"127.0.0.1:{free_port()}",
        clickhouse_url=f"http://127.0.0.1:{free_port()}",
        data_dir=data_dir,
    )


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("stack"))
    local = LocalStack(settings)
    local.up()
    try:
        yield settings
    finally:
        local.down()


@pytest.fixture
def stack_env(stack, monkeypatch):
    """Environment for subprocesses (`abdag ...`) that must use the session stack."""
    env = dict(os.environ)
    env.update(
        ABDAG_BROKER=stack.broker,
        ABDAG_CLICKHOUSE_URL=stack.clickhouse_url,
        ABDAG_DATA_DIR=str(stack.data_dir),
    )
    return env


@pytest.fixture(scope="session")
def fraud_models(tmp_path_factory):
    """The demo's two TorchScript models, trained once per test session (a few seconds)."""
    from abdag.demo.fraud import train_models

    return train_models(tmp_path_factory.mktemp("models"), seed=7)


@pytest.fixture(scope="module")
def client(tmp_path_factory, request):
    """A ClickHouse client on the real engine in-process (chdb), with abdag's schema, one
    database per test module: for tests that insert rows and read reports, no server."""
    import clickhouse_connect

    from abdag.comparators.schema import ensure_schema

    database = request.module.__name__.rpartition(".")[2]
    path = str(tmp_path_factory.mktemp("chdb") / "engine")
    boot = clickhouse_connect.get_client(interface="chdb", path=path)
    boot.command(f"CREATE DATABASE IF NOT EXISTS {database}")
    c = clickhouse_connect.get_client(interface="chdb", path=path, database=database)
    ensure_schema(c)
    yield c
    c.close()
    boot.close()
