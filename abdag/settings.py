"""One settings object that every command reads; every setting is declared here, once.

Values come from defaults, then ``ABDAG_*`` environment variables (``ABDAG_`` + the field
name in capitals), then CLI flags (the CLI calls :meth:`Settings.with_overrides`). Keeping
them in one place means a worker, the dashboard and ``abdag sql`` always agree on where the
broker and ClickHouse are, and the README's configuration table is checked against
:data:`SETTINGS` by the tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

DEFAULT_BROKER_PORT = 19092
DEFAULT_CLICKHOUSE_PORT = 18123


def _setting(default: Any, meaning: str, *, choices: tuple[str, ...] = (), kind: type = str):
    """A field of :class:`Settings`: its default, what it means, and how its environment
    value is read (``kind``: str, int, float or Path; ``choices``: the allowed strings)."""
    return field(default=default, metadata={"meaning": meaning, "choices": choices, "kind": kind})


@dataclass(frozen=True)
class Settings:
    """Where abdag finds its broker, its ClickHouse and its data, and how workers run.

    >>> s = Settings.from_env({"ABDAG_BROKER": "127.0.0.1:9092", "ABDAG_SESSION_TIMEOUT": "6"})
    >>> s.broker, s.session_timeout
    ('127.0.0.1:9092', 6.0)
    >>> s.with_overrides(broker=None, database="x").database
    'x'
    """

    broker: str = _setting(f"127.0.0.1:{DEFAULT_BROKER_PORT}", "Kafka bootstrap servers")
    clickhouse_url: str = _setting(
        f"http://127.0.0.1:{DEFAULT_CLICKHOUSE_PORT}",
        "a ClickHouse HTTP endpoint, or `chdb:///abs/path` in-process",
    )
    data_dir: Path = _setting(
        Path(".abdag"), "PID files, logs and the local ClickHouse data", kind=Path
    )
    database: str = _setting("default", "ClickHouse database")
    clickhouse_user: str = _setting("default", "ClickHouse user")
    clickhouse_password: str = _setting(
        "", "ClickHouse password (the local endpoint requires it when set)"
    )
    model_registry: Path | None = _setting(
        None, "the model registry folder (default `<data dir>/registry`)", kind=Path
    )
    broker_kind: str = _setting(
        "tansu",
        "`kafka` on Apache Kafka (drops the Tansu workarounds: agents/faust_compat/)",
        choices=("tansu", "kafka"),
    )
    session_timeout: float = _setting(4.0, "Kafka consumer session timeout, seconds", kind=float)
    replication: int = _setting(1, "replication factor of the topics abdag creates", kind=int)
    fetch_max_wait_ms: int | None = _setting(
        None,
        "fixes how long the broker may hold a fetch that finds nothing new (default on "
        "Tansu: 100 ms while records flow, 500 ms after 2 s without; on Kafka Faust's 1500)",
        kind=int,
    )
    torch_threads: int | None = _setting(
        None,
        "torch CPU threads per worker (default: torch's, one per core); leaving a core to "
        "the event loop lets a model node send one batch while it infers the next",
        kind=int,
    )
    on_broker_loss: str = _setting(
        "resume",
        "what a worker does when the broker lost its topics (a restarted local broker): "
        "`resume` (recreate them, restart itself) or `stop` (exit 75)",
        choices=("resume", "stop"),
    )
    demo_models: Path = _setting(
        Path("models"), "where the demo's DAG file finds its two models", kind=Path
    )
    webhook_url: str = _setting(
        "",
        "the URL `abdag watch` POSTs each alert to, as JSON (`--webhook` overrides it); "
        "empty: log lines only",
    )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """Defaults overridden by the ``ABDAG_*`` variables of ``environ`` (the process's
        environment by default); a value that does not parse names its variable."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(env_name(f.name))
            if raw:
                values[f.name] = _parse(f.name, raw, f.metadata)
        return cls(**values)

    def with_overrides(self, **overrides: object) -> Settings:
        """Return a copy with the given non-None values (CLI flags) applied."""
        given = {
            k: (Path(v) if k == "data_dir" else v) for k, v in overrides.items() if v is not None
        }
        return replace(self, **given)

    @property
    def broker_host_port(self) -> tuple[str, int]:
        host, _, port = self.broker.split(",")[0].rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"ABDAG_BROKER must look like host:port, got {self.broker!r}")
        return host, int(port)

    @property
    def clickhouse_host_port(self) -> tuple[str, int]:
        url = urlparse(self.clickhouse_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(
                f"ABDAG_CLICKHOUSE_URL must look like http://host:port, got {self.clickhouse_url!r}"
            )
        return url.hostname, url.port or (8443 if url.scheme == "https" else 8123)

    def run_dir(self) -> Path:
        """PID files and logs of processes started by ``abdag up``."""
        return self.data_dir / "run"

    def registry_dir(self) -> Path:
        """The model registry (``ABDAG_MODEL_REGISTRY``, default ``<data_dir>/registry``):
        where ``abdag models register`` writes and workers read."""
        return self.model_registry or self.data_dir / "registry"

    def clickhouse_dir(self) -> Path:
        return self.data_dir / "clickhouse"


def env_name(name: str) -> str:
    """The environment variable of a setting: ``ABDAG_`` + its name in capitals."""
    return f"ABDAG_{name.upper()}"


def _parse(name: str, raw: str, meta: Any) -> object:
    kind, choices = meta.get("kind", str), meta.get("choices", ())
    if kind is Path:
        return Path(raw)
    if choices:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"{env_name(name)} must be one of {list(choices)}, got {raw!r}")
        return value
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"{env_name(name)} must be {what}, got {raw!r}") from None
    return raw


SETTINGS: dict[str, str] = {
    env_name(f.name): f.metadata["meaning"] for f in fields(Settings) if "meaning" in f.metadata
}
"""Every setting's environment variable and what it means (the README's table)."""
