"""The embedded local stack: a real Kafka-protocol broker and the real ClickHouse engine.

``abdag up`` starts both bound to 127.0.0.1 and waits until each answers (a metadata
request, a ClickHouse ``/ping``); ``abdag down`` stops only what ``up`` started.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from abdag.clickhouse import ping
from abdag.settings import Settings
from abdag.stack.broker import broker_answers, broker_argv
from abdag.stack.processes import ManagedProcess, StackError, port_is_free, wait_until

__all__ = ["LocalStack", "ServiceStatus", "StackError"]


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    address: str
    pid: int | None
    answers: bool
    log: str

    def line(self) -> str:
        state = "up" if self.answers else ("started, not answering" if self.pid else "down")
        pid = f"pid {self.pid}" if self.pid else "no pid"
        return f"{self.name:<11} {state:<22} {self.address:<28} {pid:<10} log {self.log}"


class LocalStack:
    """Start, stop and inspect the broker and the ClickHouse endpoint of one data dir."""

    def __init__(self, settings: Settings, *, ready_timeout: float = 30.0) -> None:
        self.settings = settings
        self.ready_timeout = ready_timeout
        run_dir = settings.run_dir()
        self.broker = ManagedProcess("broker", run_dir)
        self.clickhouse = ManagedProcess("clickhouse", run_dir)

    def _check_local(self) -> None:
        for what, (host, _) in (
            ("ABDAG_BROKER", self.settings.broker_host_port),
            ("ABDAG_CLICKHOUSE_URL", self.settings.clickhouse_host_port),
        ):
            if host not in ("127.0.0.1", "localhost"):
                raise StackError(
                    f"{what} points at {host}: the local stack binds 127.0.0.1 only; "
                    "for a remote broker or ClickHouse, do not run `abdag up`"
                )

    def up(self) -> list[ServiceStatus]:
        """Start whatever is not running yet; idempotent."""
        self._check_local()
        host, port = self.settings.broker_host_port
        self._start(self.broker, broker_argv(host, port), host, port)
        ch_host, ch_port = self.settings.clickhouse_host_port
        self.settings.clickhouse_dir().mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "abdag.stack.clickhouse_http",
            "--data-dir",
            str(self.settings.clickhouse_dir().resolve()),
            "--host",
            ch_host,
            "--port",
            str(ch_port),
        ]
        # The endpoint reads the credentials from its environment (never its argv): exactly
        # the settings' own, whatever the calling shell exports.
        credentials = {
            "ABDAG_CLICKHOUSE_USER": self.settings.clickhouse_user,
            "ABDAG_CLICKHOUSE_PASSWORD": self.settings.clickhouse_password,
        }
        self._start(self.clickhouse, argv, ch_host, ch_port, env={**os.environ, **credentials})
        self._wait("broker", self.broker, lambda: broker_answers(self.settings.broker))
        self._wait("clickhouse", self.clickhouse, lambda: ping(self.settings.clickhouse_url))
        return self.status()

    def _start(
        self,
        proc: ManagedProcess,
        argv: list[str],
        host: str,
        port: int,
        env: dict[str, str] | None = None,
    ) -> None:
        if proc.pid() is not None:
            return
        if proc.is_stale():
            proc.pid_file.unlink()
        if not port_is_free(host, port):
            raise StackError(
                f"{proc.name}: port {port} on {host} is taken by another process; stop it or "
                f"choose another port (ABDAG_BROKER / ABDAG_CLICKHOUSE_URL)"
            )
        proc.start(argv, env)

    def _wait(self, name: str, proc: ManagedProcess, check) -> None:
        def ready() -> bool:
            if proc.pid() is None:
                raise StackError(f"{name} exited at start:\n{proc.log_tail()}")
            return check()

        if not wait_until(ready, timeout=self.ready_timeout):
            raise StackError(
                f"{name} did not answer within {self.ready_timeout:.0f} s; "
                f"log {proc.log_file}:\n{proc.log_tail()}"
            )

    def down(self) -> list[str]:
        """Stop workers, then ClickHouse (it flushes), then the broker; return what stopped."""
        stopped = []
        for pid_file in sorted(self.settings.run_dir().glob("worker-*.pid")):
            if ManagedProcess(pid_file.stem, self.settings.run_dir()).stop(grace=15):
                stopped.append(pid_file.stem)  # workers before the broker, or they hang
        if self.clickhouse.stop(grace=10):
            stopped.append("clickhouse")
        if self.broker.stop(hard=True):  # memory storage: nothing to flush
            stopped.append("broker")
        return stopped

    def status(self) -> list[ServiceStatus]:
        ch_pid = self.clickhouse.pid()
        broker_pid = self.broker.pid()
        return [
            ServiceStatus(
                "broker",
                self.settings.broker,
                broker_pid,
                broker_answers(self.settings.broker, timeout=1.0) if broker_pid else False,
                str(self.broker.log_file),
            ),
            ServiceStatus(
                "clickhouse",
                self.settings.clickhouse_url,
                ch_pid,
                ping(self.settings.clickhouse_url) if ch_pid else False,
                str(self.clickhouse.log_file),
            ),
        ]
