"""Background processes that ``abdag up`` starts and ``abdag down`` stops.

Each process gets a PID file and a log file under the run directory. A PID file records
the command line too, so a stale file (the process died, or the PID was reused by something
else) is recognised and never leads to signalling a stranger.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


class StackError(RuntimeError):
    """A local-stack problem a user can act on (taken port, missing binary, ...)."""


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (for tests and ad-hoc stacks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [p.decode(errors="replace") for p in raw.split(b"\0") if p]


@dataclass
class ManagedProcess:
    """A detached child process identified by a name inside a run directory."""

    name: str
    run_dir: Path

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.run_dir / f"{self.name}.log"

    def recorded(self) -> dict | None:
        try:
            return json.loads(self.pid_file.read_text())
        except (OSError, ValueError):
            return None

    def pid(self) -> int | None:
        """The PID if the recorded process is still the one we started, else None."""
        rec = self.recorded()
        if not rec:
            return None
        cmd = _cmdline(int(rec["pid"]))
        if cmd is None or cmd != rec["argv"]:
            return None
        try:
            os.kill(int(rec["pid"]), 0)
        except ProcessLookupError:
            return None
        return int(rec["pid"])

    def is_stale(self) -> bool:
        return self.pid_file.exists() and self.pid() is None

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        except OSError as exc:
            raise StackError(f"cannot start {self.name} ({argv[0]}): {exc}") from exc
        finally:
            log.close()
        # Record what /proc reports, so pid() compares like with like.
        deadline = time.monotonic() + 2
        cmd = _cmdline(proc.pid)
        while not cmd and time.monotonic() < deadline:
            time.sleep(0.01)
            cmd = _cmdline(proc.pid)
        self.pid_file.write_text(json.dumps({"pid": proc.pid, "argv": cmd or argv}))
        return proc.pid

    def exited_early(self) -> bool:
        rec = self.recorded()
        if not rec:
            return True
        try:
            pid, status = os.waitpid(int(rec["pid"]), os.WNOHANG)
        except ChildProcessError:
            return self.pid() is None
        return pid != 0

    def stop(self, *, grace: float = 5.0, hard: bool = False) -> bool:
        """SIGTERM (or SIGKILL when ``hard``), wait, then SIGKILL. True if one was stopped."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGKILL if hard else signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)
        return True

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    try:
        return state.read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def wait_until(check, *, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``check()`` until it returns true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return True
        except StackError:
            raise
        except Exception:  # noqa: BLE001 - readiness probes fail in many ways while starting
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
