"""One settings object that every command reads.

Values come from defaults, then ``ABDAG_*`` environment variables, then CLI flags (the
CLI calls :meth:`Settings.with_overrides`). Keeping them in one place means a worker, the
dashboard and ``abdag sql`` always agree on where the broker and ClickHouse are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_BROKER_PORT = 19092
DEFAULT_CLICKHOUSE_PORT = 18123


@dataclass(frozen=True)
class Settings:
    """Where abdag finds its broker, its ClickHouse and its data directory.

    >>> s = Settings.from_env({"ABDAG_BROKER": "127.0.0.1:9092"})
    >>> s.broker
    '127.0.0.1:9092'
    >>> s.with_overrides(broker=None, database="x").database
    'x'
    """

    broker: str = f"127.0.0.1:{DEFAULT_BROKER_PORT}"
    clickhouse_url: str = f"http://127.0.0.1:{DEFAULT_CLICKHOUSE_PORT}"
    data_dir: Path = Path(".abdag")
    database: str = "default"
    clickhouse_user: str = "default"
    clickhouse_password: str = ""
    model_registry: Path | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"ABDAG_{f.name.upper()}")
            if raw:
                values[f.name] = Path(raw) if f.name in ("data_dir", "model_registry") else raw
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
        """The model registry (``ABDAG_MODEL_REGISTRY``, default ``<data_dir>/registry``)."""
        return self.model_registry or self.data_dir / "registry"

    def clickhouse_dir(self) -> Path:
        return self.data_dir / "clickhouse"
