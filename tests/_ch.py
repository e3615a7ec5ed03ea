"""Helpers to run the chdb-backed ClickHouse HTTP endpoint as a real subprocess in tests.

The endpoint is started with ``--port 0`` so the kernel picks a free port (no race between
choosing a port and binding it); the port is read from the endpoint's "listening on" line in
its log file. Processes are stopped by PID only.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

_LISTENING = re.compile(r"listening on http://([^:\s]+):(\d+)")


@dataclass
class Endpoint:
    """A running endpoint process and where it listens."""

    proc: subprocess.Popen
    host: str
    port: int
    data_dir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_clickhouse_endpoint(
    data_dir: Path, port: int = 0, log_path: Path | None = None
) -> tuple[subprocess.Popen, Path]:
    """Start ``python -m abdag.stack.clickhouse_http`` on data_dir; stderr goes to a log file."""
    data_dir = Path(data_dir)
    log_path = log_path or data_dir.parent / f"{data_dir.name}-endpoint.log"
    log = open(log_path, "ab")  # noqa: SIM115 - the child keeps the descriptor
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "abdag.stack.clickhouse_http",
                "--data-dir",
                str(data_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
        )
    finally:
        log.close()
    return proc, log_path


def wait_ready(
    proc: subprocess.Popen, log_path: Path, timeout: float = 20.0, log_offset: int = 0
) -> tuple[str, int]:
    """Wait until the endpoint logs its address and answers /ping; return (host, port).

    log_offset: where this process's output starts in a log file shared with earlier runs.
    """
    deadline = time.monotonic() + timeout
    address = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"endpoint exited with {proc.returncode}: {log_path.read_text(errors='replace')}"
            )
        if address is None:
            with open(log_path, "rb") as f:
                f.seek(log_offset)
                found = _LISTENING.findall(f.read().decode(errors="replace"))
            if found:
                address = (found[-1][0], int(found[-1][1]))
        if address is not None:
            try:
                url = f"http://{address[0]}:{address[1]}/ping"
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.read() == b"Ok.\n":
                        return address
            except OSError:
                pass
        time.sleep(0.05)
    raise TimeoutError(f"endpoint not ready after {timeout} s: {log_path.read_text()}")


def launch(data_dir: Path, port: int = 0, timeout: float = 20.0) -> Endpoint:
    """Start an endpoint and wait for it; kill it if it does not become ready."""
    log_path = Path(data_dir).parent / f"{Path(data_dir).name}-endpoint.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    proc, log_path = start_clickhouse_endpoint(data_dir, port, log_path)
    try:
        host, bound = wait_ready(proc, log_path, timeout, offset)
    except BaseException:
        kill(proc)
        raise
    return Endpoint(proc, host, bound, Path(data_dir), log_path)


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGTERM by PID, wait; SIGKILL if it does not exit in time. Returns the exit code."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill(proc)
    return proc.returncode


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL by PID and reap."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
