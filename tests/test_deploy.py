"""docker-compose.yml, the Dockerfile and Grafana provisioning, checked without a Docker engine."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from abdag.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
KNOWN_ENV = {f"ABDAG_{f.name.upper()}" for f in fields(Settings)} | {
    "ABDAG_BROKER_KIND",
    "ABDAG_SESSION_TIMEOUT",
}


def test_compose_has_kafka_clickhouse_worker_dashboard_and_grafana():
    assert set(COMPOSE["services"]) >= {"kafka", "clickhouse", "worker", "dashboard", "grafana"}
    kafka = COMPOSE["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper


def test_worker_service_can_be_scaled():
    worker = COMPOSE["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert worker["command"][:2] == ["abdag", "worker"]
    assert worker["build"] == "."


def test_services_are_configured_by_variables_abdag_reads():
    for name in ("worker", "dashboard"):
        env = COMPOSE["services"][name]["environment"]
        unknown = {k for k in env if k.startswith("ABDAG_")} - KNOWN_ENV
        assert not unknown, f"{name} sets variables abdag does not read: {unknown}"
        assert env["ABDAG_BROKER"] == "kafka:9092"
        assert env["ABDAG_BROKER_KIND"] == "kafka"
        settings = Settings.from_env({k: str(v) for k, v in env.items()})
        assert settings.clickhouse_host_port == ("clickhouse", 8123)


def test_no_password_is_written_into_the_files():
    text = (ROOT / "docker-compose.yml").read_text()
    for line in text.splitlines():
        if "PASSWORD" in line and ":" in line:
            assert "${" in line, f"a password value is hard-coded: {line.strip()}"


def test_dockerfile_copies_every_package_it_installs():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (\S+)", dockerfile, flags=re.M):
        assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    for package in ("abdag", "agents", "topics", "models", "comparators"):
        assert f"COPY {package} " in dockerfile
    assert "torch==2.13.0" in dockerfile


def test_grafana_dashboard_queries_tables_of_the_schema():
    from abdag.comparators.schema import TABLES

    dash = json.loads((ROOT / "deploy/grafana/dashboards/abdag.json").read_text())
    names = set(TABLES)
    for panel in dash["panels"]:
        sql = panel["targets"][0]["rawSql"]
        tables = set(re.findall(r"FROM (\w+)", sql))
        assert tables and tables <= names, f"panel {panel['title']!r} reads {tables}"
    provisioning = ROOT / "deploy/grafana/provisioning"
    source = yaml.safe_load((provisioning / "datasources/clickhouse.yml").read_text())
    assert source["datasources"][0]["uid"] == dash["panels"][0]["datasource"]["uid"]
    mounted = COMPOSE["services"]["grafana"]["volumes"]
    assert any(v.startswith("./deploy/grafana/provisioning:") for v in mounted)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_config_accepts_the_file():
    env = dict(os.environ, ABDAG_CLICKHOUSE_PASSWORD="x", GRAFANA_ADMIN_PASSWORD="y")
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
