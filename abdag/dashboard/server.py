"""The dashboard's HTTP server: a page, its static files and a small JSON API.

Endpoints (all ``GET``):

``/``                                  the page (``static/index.html``)
``/static/<file>``                     files shipped in the package (JS, CSS, vendored uPlot)
``/api/experiments``                   JSON list of experiment names
``/api/report?experiment=X[&margin=m]`` ``build_report(...).to_dict()``: the numbers of
                                       ``abdag report``
``/api/timeline?experiment=X[&bucket=S]`` curves per time bucket
                                       (:func:`abdag.dashboard.data.timeline_payload`)

Errors are JSON ``{"error": message, "status": code}``: 400 for bad parameters, 404 for
an unknown experiment or path, 503 when ClickHouse does not answer, 500 otherwise.
Numeric parameters must be finite and in range (``margin`` >= 0, ``bucket`` a whole number
of seconds from 1 to ``MAX_BUCKET_S``); anything else is a 400 that names the parameter
and its range.

The server binds 127.0.0.1 unless told otherwise: it serves experiment data without
authentication. It only reads (``readonly=1`` on every query). clickhouse-connect's sync
client must not run two queries at once, so request threads borrow clients from a small
pool.

Answers are cached until the experiment's rows change (a cheap fingerprint query per
request). A report takes seconds (BCa bootstrap: ~3 s at 2000 labelled pairs, ~15 s at
5000) while the page asks every 5 s, so once an experiment has a report, a changed
experiment is answered with the previous report at once and recomputed in the background;
``X-Abdag-Computed-At`` and ``X-Abdag-Stale`` say how old an answer is. The body is always
exactly ``build_report(...).to_dict()``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import mimetypes
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from abdag.clickhouse import ClickHouseUnreachable, connect
from abdag.comparators.report import build_report, list_experiments
from abdag.dashboard.data import TimelineError, timeline_payload
from abdag.settings import Settings

__all__ = ["DashboardServer", "make_server", "serve"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
CACHE_TTL_S = 300.0
"""A cached report is recomputed after this long even if its rows look unchanged."""
MAX_BUCKET_S = 366 * 86_400
"""The largest ``bucket`` (seconds) a timeline may ask for: a year, one bucket for any test."""

_FINGERPRINT_SQL = """SELECT
    (SELECT tuple(count(), max(paired_ts), max(label_ts), max(stage))
     FROM pairs WHERE experiment = {experiment:String}) AS pairs,
    (SELECT tuple(count(), sum(count)) FROM dead_letters WHERE dag = {dag:String}) AS dead"""
"""Cheap state of an experiment's rows: any insert changes it (a merge may too: a recompute)."""


class ApiError(Exception):
    """An answer other than 200, with the message the page shows."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientPool:
    """clickhouse-connect clients for request threads, one query at a time per client."""

    def __init__(self, settings: Settings, size: int) -> None:
        self.settings = settings
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[Any] = []
        self._closed = False

    @contextmanager
    def client(self) -> Iterator[Any]:
        with self._slots:
            with self._lock:
                c = self._idle.pop() if self._idle else None
            if c is None:
                c = connect(self.settings, readonly=True, connect_timeout=5)
            try:
                yield c
            except BaseException:
                _close(c)  # may be mid-response or disconnected: never reuse
                raise
            with self._lock:
                if not self._closed:
                    self._idle.append(c)
                    return
            _close(c)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            _close(c)


def _close(client: Any) -> None:
    try:
        client.close()
    except Exception:  # noqa: BLE001 - closing a broken client must not mask the error
        log.debug("closing a ClickHouse client failed", exc_info=True)


class DashboardServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that knows the settings, its client pool and its cache."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, settings: Settings, address: tuple[str, int]) -> None:
        self.settings = settings
        # chdb is one engine per process: one client, one query at a time
        chdb = settings.clickhouse_url.startswith("chdb:")
        self.pool = ClientPool(settings, size=1 if chdb else 4)
        self._cache: dict[tuple, Cached] = {}
        self._cache_lock = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}
        self._refreshing: set[tuple] = set()
        super().__init__(address, DashboardHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def server_close(self) -> None:
        super().server_close()
        self.pool.close()

    # ------------------------------------------------------------------ queries
    def query(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(client)``; ClickHouse failing to answer becomes a 503."""
        from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

        try:
            with self.pool.client() as client:
                return fn(client)
        except (ClickHouseUnreachable, OperationalError) as exc:
            # connect() already words its own message; keep only the driver's cause
            cause = exc.__cause__ if isinstance(exc, ClickHouseUnreachable) else exc
            raise ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"ClickHouse unreachable at {self.settings.clickhouse_url} (is `abdag up` "
                f"running, or ABDAG_CLICKHOUSE_URL right?): {_first_line(cause or exc)[:300]}",
            ) from exc
        except DatabaseError as exc:
            if "UNKNOWN_TABLE" in str(exc) or "doesn't exist" in str(exc):
                raise ApiError(
                    HTTPStatus.NOT_FOUND,
                    "no abdag tables in this ClickHouse database yet (no worker has written)",
                ) from exc
            raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, _first_line(exc)) from exc

    def experiments(self) -> list[str]:
        return self.query(list_experiments)

    def require_experiment(self, experiment: str | None) -> str:
        if not experiment:
            raise ApiError(HTTPStatus.BAD_REQUEST, "missing query parameter: experiment")
        if experiment not in self.experiments():
            raise ApiError(HTTPStatus.NOT_FOUND, f"unknown experiment: {experiment!r}")
        return experiment

    def _fingerprint(self, client: Any, experiment: str) -> tuple:
        dag = experiment.split(".", 1)[0]
        rows = client.query(
            _FINGERPRINT_SQL, parameters={"experiment": experiment, "dag": dag}
        ).result_rows
        return tuple(rows[0])

    def _compute(self, key: tuple, experiment: str, compute: Callable[[Any], Any]) -> Cached:
        """Compute and store one entry; one computation per key at a time."""
        with self._cache_lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:

            def run(client: Any) -> Cached:
                fp = self._fingerprint(client, experiment)
                with self._cache_lock:
                    hit = self._cache.get(key)
                if hit is not None and hit.fingerprint == fp and hit.fresh():
                    return hit  # another thread computed it while this one waited
                entry = Cached(fp, time.time(), compute(client))
                with self._cache_lock:
                    self._cache[key] = entry
                return entry

            return self.query(run)

    def _refresh_later(self, key: tuple, experiment: str, compute: Callable[[Any], Any]) -> None:
        with self._cache_lock:
            if key in self._refreshing:
                return
            self._refreshing.add(key)

        def work() -> None:
            try:
                self._compute(key, experiment, compute)
            except Exception:  # noqa: BLE001 - the next request tries again
                log.warning("background refresh of %s failed", key, exc_info=True)
            finally:
                with self._cache_lock:
                    self._refreshing.discard(key)

        threading.Thread(target=work, name=f"refresh {key}", daemon=True).start()

    def cached(
        self,
        key: tuple,
        experiment: str,
        compute: Callable[[Any], Any],
        *,
        background: bool = False,
    ) -> Cached:
        """``compute(client)``, reused while the experiment's rows are unchanged.

        ``background=True`` (reports: bootstrap intervals take seconds to tens of seconds
        on a few thousand pairs) answers a changed experiment with the last result at once
        and recomputes in a background thread, so the page never waits on a live
        experiment; the answer says how old it is. The first answer is always computed.
        """
        fp = self.query(lambda c: self._fingerprint(c, experiment))
        with self._cache_lock:
            hit = self._cache.get(key)
        if hit is not None and hit.fingerprint == fp and hit.fresh():
            return hit
        if hit is not None and background:
            self._refresh_later(key, experiment, compute)
            return Cached(hit.fingerprint, hit.computed_at, hit.value, stale=True)
        return self._compute(key, experiment, compute)


@dataclass(frozen=True)
class Cached:
    """A computed answer, the state of the rows it was computed from, and when."""

    fingerprint: tuple
    computed_at: float
    value: Any
    stale: bool = False

    def fresh(self) -> bool:
        return time.time() - self.computed_at < CACHE_TTL_S

    def headers(self) -> dict[str, str]:
        when = dt.datetime.fromtimestamp(self.computed_at, tz=dt.UTC)
        return {
            "X-Abdag-Computed-At": when.isoformat(timespec="seconds"),
            "X-Abdag-Stale": "1" if self.stale else "0",
        }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class DashboardHandler(BaseHTTPRequestHandler):
    """Routes GET requests; every API answer is JSON."""

    server: DashboardServer
    server_version = "abdag-dashboard"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        log.debug("%s - " + format, self.address_string(), *args)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if url.path in ("/", "/index.html"):
                self._file(STATIC_DIR / "index.html")
            elif url.path.startswith("/static/"):
                self._static(url.path.removeprefix("/static/"))
            elif url.path == "/api/experiments":
                self._json(self.server.experiments())
            elif url.path == "/api/report":
                got = self._report(query)
                self._json(got.value, headers=got.headers())
            elif url.path == "/api/timeline":
                got = self._timeline(query)
                self._json(got.value, headers=got.headers())
            else:
                raise ApiError(HTTPStatus.NOT_FOUND, f"no such path: {url.path}")
        except ApiError as exc:
            self._json({"error": exc.message, "status": int(exc.status)}, exc.status)
        except Exception as exc:  # noqa: BLE001 - answer, log, keep serving
            log.exception("dashboard request %s failed", self.path)
            self._json({"error": f"internal error: {exc}", "status": 500}, 500)

    # ------------------------------------------------------------------ api
    def _report(self, query: dict[str, str]) -> Cached:
        margin = _number(query, "margin", None, minimum=0)  # None: the DAG's own margin
        experiment = self.server.require_experiment(query.get("experiment"))
        return self.server.cached(
            ("report", experiment, margin),
            experiment,
            lambda c: build_report(c, experiment, margin=margin).to_dict(),
            background=True,
        )

    def _timeline(self, query: dict[str, str]) -> Cached:
        bucket = _number(query, "bucket", None, minimum=1, maximum=MAX_BUCKET_S, whole=True)
        experiment = self.server.require_experiment(query.get("experiment"))
        try:
            return self.server.cached(
                ("timeline", experiment, bucket),
                experiment,
                lambda c: timeline_payload(c, experiment, bucket),
            )
        except TimelineError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from exc

    # ------------------------------------------------------------------ answers
    def _json(self, body: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, allow_nan=False).encode()
        self._send(status, data, "application/json", cache=False, headers=headers)

    def _static(self, rel: str) -> None:
        root = STATIC_DIR.resolve()
        path = (root / rel).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such file: /static/{rel}")
        self._file(path)

    def _file(self, path: Path) -> None:
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        self._send(200, path.read_bytes(), ctype, cache=False)

    def _send(
        self,
        status: int,
        data: bytes,
        ctype: str,
        *,
        cache: bool,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        if not cache:
            self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)


def _number(
    query: dict[str, str],
    name: str,
    default: float | None,
    *,
    minimum: float,
    maximum: float = math.inf,
    whole: bool = False,
) -> float | None:
    """Query parameter ``name`` as a finite number in [minimum, maximum] (an ``int`` when
    ``whole``), ``default`` when absent or empty, else a 400 naming it and the range.

    Every numeric parameter goes through here: ``float()`` accepts ``nan``, ``inf`` and
    ``1e999``, which gave a 500 (``int(nan)``) or reached a report (``margin=nan``).
    """
    raw = query.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    in_range = math.isfinite(value) and minimum <= value <= maximum
    if not in_range or (whole and not value.is_integer()):
        kind = "a whole number" if whole else "a number"
        bounds = f"from {minimum} to {maximum}" if math.isfinite(maximum) else f">= {minimum}"
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{name} must be {kind} {bounds}, got {raw!r}")
    return int(value) if whole else value


def make_server(settings: Settings, host: str = "127.0.0.1", port: int = 8050) -> DashboardServer:
    """A bound, not yet serving, dashboard server (``port=0`` picks a free port).

    Tests run ``serve_forever`` in a thread; ``serve`` runs it in the foreground.
    """
    mimetypes.add_type("text/javascript", ".js")
    return DashboardServer(settings, (host, port))


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8050) -> None:
    """Serve the dashboard until interrupted (Ctrl-C)."""
    server = make_server(settings, host, port)
    print(f"abdag dashboard on {server.url}  (ClickHouse {settings.clickhouse_url}; Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
