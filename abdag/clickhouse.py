"""Connecting to ClickHouse the one way every abdag command does.

``ABDAG_CLICKHOUSE_URL`` is ``http://host:port`` for a server (the local endpoint of
``abdag up`` or a real ClickHouse) or ``chdb:///abs/path`` for the engine in-process
(one process per path: fine for a script, not for several workers). With
``ABDAG_CLICKHOUSE_USER``/``ABDAG_CLICKHOUSE_PASSWORD`` every query carries those credentials
(HTTP basic auth); the local endpoint requires them when it was started with a password.
"""

from __future__ import annotations

import urllib.request
from urllib.parse import urlparse

from abdag.settings import Settings


class ClickHouseUnreachable(RuntimeError):
    """ClickHouse did not answer at the configured URL."""


class ClickHouseAuthenticationFailed(ClickHouseUnreachable):
    """ClickHouse answered but refused the configured user or password (code 516)."""


_AUTH_CODES = (192, 193, 194, 516)  # UNKNOWN_USER, WRONG_PASSWORD, REQUIRED_PASSWORD, ...FAILED


def connect(settings: Settings, *, readonly: bool = False, **kwargs):
    """A clickhouse-connect client for ``settings.clickhouse_url``.

    ``readonly=True`` sends ``readonly=1`` with every query, so a SQL shell cannot write
    (files and URLs the local endpoint refuses to every client). Wrong credentials raise
    ClickHouseAuthenticationFailed, a one-line error for the CLI.
    """
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

    url = urlparse(settings.clickhouse_url)
    extra = dict(kwargs)
    if readonly:
        extra.setdefault("settings", {})["readonly"] = 1
    if url.scheme == "chdb":
        return clickhouse_connect.get_client(
            interface="chdb", path=url.path or None, database=settings.database, **extra
        )
    host, port = settings.clickhouse_host_port
    try:
        return clickhouse_connect.get_client(
            host=host,
            port=port,
            interface=url.scheme,
            username=settings.clickhouse_user,
            password=settings.clickhouse_password,
            database=settings.database,
            **extra,
        )
    except OperationalError as exc:
        raise ClickHouseUnreachable(
            f"ClickHouse is unreachable at {settings.clickhouse_url} "
            f"(is `abdag up` running, or ABDAG_CLICKHOUSE_URL right?): {exc}"
        ) from exc
    except DatabaseError as exc:
        if getattr(exc, "code", None) not in _AUTH_CODES:
            raise
        raise ClickHouseAuthenticationFailed(
            f"ClickHouse at {settings.clickhouse_url} refused user "
            f"{settings.clickhouse_user!r}: set ABDAG_CLICKHOUSE_USER and "
            "ABDAG_CLICKHOUSE_PASSWORD to the ones the server (`abdag up`) was started with"
        ) from exc


def ping(url: str, timeout: float = 2.0) -> bool:
    """True when the HTTP endpoint at ``url`` answers ``/ping`` (which needs no credentials)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/ping", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False
