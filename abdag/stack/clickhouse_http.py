"""A local ClickHouse HTTP endpoint backed by chdb.

Why it exists: chdb runs the real ClickHouse engine inside a Python process, but a data
directory can be opened by one process only (chdb locks ``<dir>/status``). Workers, a
dashboard and a SQL shell therefore cannot each embed chdb on the same store. One process
runs this module, owns the directory, and serves the part of ClickHouse's HTTP interface that
clickhouse-connect's sync and async clients use; every other process connects to it with
``clickhouse_connect.get_client(host=..., port=...)`` exactly as to a ClickHouse server.

Design:

- One engine, one connection per request. A long-lived chdb connection opens the directory
  (and holds its lock) for the life of the process. Each request gets a fresh chdb connection
  on that same engine (about 0.2 ms), closed at the end of the request. That is what makes
  requests sessionless, as ClickHouse HTTP is without ``session_id``: URL settings,
  ``readonly``, ``database`` and any ``SET``/``USE`` in the SQL affect that request only, and
  concurrent requests cannot see each other's settings. chdb connections on one engine run
  concurrently (measured: 8 threads mixing inserts and reads, no errors), so there is no global
  lock.
- Statements are analysed by a small lexer over bytes (strings, quoted identifiers, comments,
  heredocs). It refuses multi-statement SQL (chdb itself would run every statement), finds
  where inline INSERT data starts (binary Native/Arrow data is never decoded or scanned),
  finds the output ``FORMAT`` and spots ``INTO OUTFILE``, ``FROM INFILE`` and calls of
  ``file(...)``.
- ``INSERT ... FORMAT X`` + data goes through chdb's streaming inserter; a batch that fails is
  cancelled and not committed. Everything else goes through ``query`` with the request's
  default format (TabSeparated unless ``default_format`` says otherwise).
- ``readonly=1|2`` (and GET, which ClickHouse makes readonly) is enforced by the engine:
  ``SET readonly`` on the request's connection, which SQL cannot lift, and which also refuses
  table functions such as ``file()``/``url()``. The engine runs with clickhouse-local rules,
  so ``INTO OUTFILE``/``FROM INFILE`` (always) and the scalar ``file()`` (when readonly) are
  refused here, as a ClickHouse server would.
- Request bodies: chunked transfer decoding, ``Content-Encoding`` lz4 (several concatenated
  frames), zstd, gzip, deflate; ``multipart/form-data`` for ``query`` and ``param_*`` fields.
  Responses are compressed per ``Accept-Encoding`` (lz4, zstd, gzip, deflate) unless
  ``enable_http_compression=0``.
- Results are buffered whole (``wait_end_of_query`` semantics), so an error always arrives as
  a non-200 status with ``X-ClickHouse-Exception-Code`` and a ``Code: N. DB::Exception: ...``
  body, which clickhouse-connect turns into ``DatabaseError`` with that code.
- Sockets: TCP_NODELAY on accepted sockets (otherwise Nagle + delayed ACK add ~40 ms per
  request) and a listen backlog of 1024 (a backlog of 5 stalls bursts of clients for ~1 s).
- The engine runs in UTC (``TZ=UTC`` before chdb starts) so DateTime results do not depend on
  the host's timezone.

Not implemented: HTTP sessions (``session_id`` is accepted and ignored, so SET, USE and
temporary tables last one request), external data (file parts in multipart requests, answered
with NOT_IMPLEMENTED), ``compress=1``/``decompress=1`` (ClickHouse's own block compression,
refused), authentication (``user``/``password`` are ignored: bind to 127.0.0.1 only), progress
headers, query cancellation on client disconnect, streaming of large results (each result
is held in memory once, then sent), and CHECK constraints on ``INSERT ... FORMAT`` data (chdb's
streaming inserter does not evaluate them; ``INSERT ... VALUES`` in SQL does).
"""

from __future__ import annotations

import argparse
import contextlib
import email.parser
import email.policy
import errno
import gzip
import json
import os
import re
import signal
import socket
import socketserver
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import lz4.frame
import zstandard

__all__ = [
    "ClickHouseEndpoint",
    "ClickHouseError",
    "EndpointStartError",
    "Statement",
    "analyze_statement",
    "main",
    "serve",
]

KEEP_ALIVE_S = 30  # idle keep-alive timeout, as ClickHouse's keep_alive_timeout
LISTEN_BACKLOG = 1024
DRAIN_TIMEOUT_S = 8.0  # a clean stop waits this long for requests in flight (callers ~10 s)
SERVER_NAME = "abdag-chdb"

# ClickHouse error codes used by the endpoint itself (names as in system.errors).
SYNTAX_ERROR = 62
UNKNOWN_FORMAT = 73
UNKNOWN_COMPRESSION_METHOD = 89
NOT_IMPLEMENTED = 48
BAD_ARGUMENTS = 36
UNKNOWN_SETTING = 115
READONLY = 164
ABORTED = 236
CANNOT_DECOMPRESS = 271
INTO_OUTFILE_NOT_ALLOWED = 358
SUPPORT_IS_DISABLED = 344
STD_EXCEPTION = 1001

_ERROR_NAMES = {
    SYNTAX_ERROR: "SYNTAX_ERROR",
    UNKNOWN_FORMAT: "UNKNOWN_FORMAT",
    UNKNOWN_COMPRESSION_METHOD: "UNKNOWN_COMPRESSION_METHOD",
    NOT_IMPLEMENTED: "NOT_IMPLEMENTED",
    BAD_ARGUMENTS: "BAD_ARGUMENTS",
    UNKNOWN_SETTING: "UNKNOWN_SETTING",
    READONLY: "READONLY",
    ABORTED: "ABORTED",
    CANNOT_DECOMPRESS: "CANNOT_DECOMPRESS",
    INTO_OUTFILE_NOT_ALLOWED: "INTO_OUTFILE_NOT_ALLOWED",
    SUPPORT_IS_DISABLED: "SUPPORT_IS_DISABLED",
    STD_EXCEPTION: "STD_EXCEPTION",
}

# HTTP status per ClickHouse error code, close to ClickHouse's own mapping; the rest are 500.
_HTTP_STATUS = {
    **dict.fromkeys((6, 25, 26, 27, 36, 38, 41, 53, 62, 72, 73, 115, 117, 211, 456, 457), 400),
    **dict.fromkeys((164, 344, 358, 497), 403),
    **dict.fromkeys((16, 46, 47, 50, 56, 60, 81), 404),
    48: 501,
    229: 413,
    236: 503,
}

# URL parameters that are not engine settings (ClickHouse's reserved HTTP parameter names),
# plus HTTP-layer settings this endpoint interprets itself; none of them is SET on the engine.
_TRANSPORT_PARAMS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "user",
        "password",
        "quota_key",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "close_session",
        "client_protocol_version",
        "buffer_size",
        "wait_end_of_query",
        "stacktrace",
        "with_stacktrace",
        "role",
        "compress",
        "decompress",
        "enable_http_compression",
        "http_zlib_compression_level",
        "http_wait_end_of_query",
        "http_response_buffer_size",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        "cancel_http_readonly_queries_on_client_close",
        "add_http_cors_header",
        "readonly",
    }
)
# Transport parameters whose non-default value asks for something this endpoint does not do.
_NOT_SUPPORTED_PARAMS = ("compress", "decompress")

# chdb output formats that are Python objects, not bytes; never valid over HTTP.
_PY_ONLY_FORMATS = frozenset({"dataframe", "arrowtable", "datastore", "debug"})

# Statements whose response is a result set (ClickHouse sends X-ClickHouse-Format for them).
_RESULT_KINDS = frozenset(
    {"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "CHECK", "WATCH"}
)

_CONTENT_TYPES = {
    "tabseparated": "text/tab-separated-values; charset=UTF-8",
    "tsv": "text/tab-separated-values; charset=UTF-8",
    "csv": "text/csv; charset=UTF-8; header=absent",
    "csvwithnames": "text/csv; charset=UTF-8; header=present",
    "json": "application/json; charset=UTF-8",
    "jsoncompact": "application/json; charset=UTF-8",
    "jsoneachrow": "application/x-ndjson; charset=UTF-8",
    "native": "application/octet-stream",
    "rowbinary": "application/octet-stream",
    "arrow": "application/octet-stream",
    "arrowstream": "application/octet-stream",
    "parquet": "application/octet-stream",
}


class ClickHouseError(Exception):
    """An error with a ClickHouse code, rendered as ClickHouse renders it over HTTP."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def from_engine(cls, exc: BaseException) -> ClickHouseError:
        """Keep the engine's own code and text; chdb wraps them in Python prefixes."""
        text = str(exc)
        m = re.search(r"Code: (\d+)\. (?:DB::Exception: )?", text)
        if not m:
            return cls(STD_EXCEPTION, f"std::exception. {text.strip()}")
        message = text[m.end() :]
        # Settings errors come back nested: "Code: 164. DB::Exception: Code: 164. ...".
        while (inner := re.match(r"Code: \d+\. (?:DB::Exception: )?", message)) is not None:
            message = message[inner.end() :]
        return cls(int(m.group(1)), message.strip())

    def body(self, version: str) -> bytes:
        msg = self.message
        name = _ERROR_NAMES.get(self.code)
        if name and f"({name})" not in msg:
            msg = f"{msg.rstrip('.')}. ({name})"
        if "(version " not in msg:
            msg = f"{msg} (version {version})"
        return f"Code: {self.code}. DB::Exception: {msg}\n".encode()


class EndpointStartError(Exception):
    """The endpoint could not start; exit_code says why (2: address, 3: data directory)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------------------------
# Statement analysis
# --------------------------------------------------------------------------------------------

# One token per match. Literals (strings, numbers, operators, commas, whitespace between
# them) merge into one "lit" run, so a 200k-item IN list is a handful of tokens, not 400k.
# Quantifiers are possessive: nothing here can backtrack (a plain (?:\s+)*\Z is exponential).
_LEX = re.compile(
    rb"""
    (?P<sp>\s++)
  | (?P<cm>--[^\n]*+|\#[ !][^\n]*+|/\*.*?(?:\*/|\Z))
  | (?P<id>[A-Za-z_][A-Za-z0-9_]*+)
  | (?P<lit>(?:'(?:[^'\\]++|\\.|'')*+'|[^'"`$\#;()A-Za-z_/\-]++|/(?!\*)|-(?!-)|\#(?![ !]))++)
  | (?P<st>'(?:[^'\\]++|\\.|'')*+\Z)
  | (?P<qi>"(?:[^"\\]++|\\.|"")*+(?:"|\Z)|`(?:[^`\\]++|\\.|``)*+(?:`|\Z))
  | (?P<hd>\$\$.*?(?:\$\$|\Z)|\$(?P<tag>[A-Za-z_][A-Za-z0-9_]*+)\$.*?(?:\$(?P=tag)\$|\Z))
  | (?P<ot>.)
    """,
    re.X | re.S,
)
_BLANK = re.compile(rb"(?:\s++|--[^\n]*+|\#[ !][^\n]*+|/\*.*?\*/)*+\Z", re.S)


@dataclass
class Statement:
    """What the endpoint needs to know about one request's SQL before running it."""

    kind: str  # first keyword, upper case ("SELECT", "INSERT", ...); "" if none
    sql: bytes  # the statement, without a trailing ';' and, for INSERT ... FORMAT, the data
    output_format: str | None = None  # FORMAT clause of a query, if any
    insert_head: bytes | None = None  # "INSERT INTO t (a, b)" when inline data follows
    insert_format: str | None = None
    insert_data: bytes = b""
    functions: set[str] = field(default_factory=set)  # lower-case names called as f(...)
    into_outfile: bool = False
    from_infile: bool = False


# A token is (group, start, end, depth, word): word is the upper-cased bare word for "id"
# tokens and b"" otherwise. Plain tuples: this loop is the endpoint's only per-byte-ish cost.
_Tok = tuple[str, int, int, int, bytes]


def _ident(sql: bytes, tok: _Tok) -> str:
    """Identifier text of an "id" or "qi" token, quotes removed."""
    group, start, end = tok[0], tok[1], tok[2]
    if group == "qi":
        return sql[start + 1 : end - 1].decode("utf-8", "replace")
    return sql[start:end].decode("utf-8", "replace")


def _multi_statement_error(sql: bytes, pos: int) -> ClickHouseError:
    tail = sql[pos : pos + 40].decode("utf-8", "replace")
    return ClickHouseError(
        SYNTAX_ERROR,
        f"Syntax error (Multi-statements are not allowed): failed at position {pos + 1}: "
        f"{tail}. (SYNTAX_ERROR)",
    )


def _data_start(sql: bytes, pos: int) -> int:
    """Where inline INSERT data begins after the format name, by ClickHouse's rule.

    Spaces and tabs are skipped, then one line break; nothing more, because binary data
    may itself begin with whitespace bytes.
    """
    n = len(sql)
    while pos < n and sql[pos] in b" \t\f":
        pos += 1
    if pos < n and sql[pos] == 0x0D:
        pos += 1
    if pos < n and sql[pos] == 0x0A:
        pos += 1
    return pos


def analyze_statement(sql: bytes) -> Statement:
    """Split off inline INSERT data, refuse multi-statements, and note what policy needs.

    Raises ClickHouseError(SYNTAX_ERROR) for an empty query or more than one statement.
    A single trailing ';' (followed only by blanks or comments) is accepted and dropped.
    """
    toks: list[_Tok] = []
    depth = 0
    n = end = len(sql)
    kind = b""
    match = _LEX.match
    for m in _LEX.finditer(sql):  # matches are contiguous: the last alternative takes any byte
        group = m.lastgroup
        if group == "sp" or group == "cm":
            continue
        start, pos = m.span()
        word = b""
        if group == "ot":
            c = sql[start]
            if c == 0x3B:  # ';'
                if not _BLANK.match(sql, pos):
                    raise _multi_statement_error(sql, start)
                end = start
                break
            if c == 0x28:  # '('
                depth += 1
            elif c == 0x29:  # ')'
                depth = max(0, depth - 1)
        elif group == "id":
            word = sql[start:pos].upper()
            if not kind:
                kind = word
            # INSERT ... FORMAT name: everything after the name is data, never lexed.
            if (
                word == b"FORMAT"
                and kind == b"INSERT"
                and depth == 0
                and toks
                and toks[-1][4] not in (b"INTO", b"TABLE", b"FUNCTION")
                and not sql[toks[-1][1] : toks[-1][2]].rstrip().endswith(b".")  # db.format
            ):
                m2 = match(sql, pos)
                while m2.lastgroup in ("sp", "cm") and m2.end() < n:
                    m2 = match(sql, m2.end())
                if m2.lastgroup in ("id", "qi"):
                    head = sql[:start].rstrip()
                    stmt = _finish(kind, head, toks, sql)
                    stmt.insert_head = head
                    stmt.insert_format = _ident(sql, (m2.lastgroup, m2.start(), m2.end(), 0, b""))
                    stmt.insert_data = sql[_data_start(sql, m2.end()) :]
                    return stmt
        toks.append((group, start, pos, depth, word))
    if not toks:
        raise ClickHouseError(SYNTAX_ERROR, "Empty query")
    stmt = _finish(kind, sql[:end], toks, sql)
    # A query's FORMAT clause: "FORMAT name" at depth 0, followed by nothing or SETTINGS.
    for i in range(len(toks) - 2, -1, -1):
        if toks[i][4] == b"FORMAT" and toks[i][3] == 0 and toks[i + 1][0] in ("id", "qi"):
            if i + 2 == len(toks) or toks[i + 2][4] == b"SETTINGS":
                stmt.output_format = _ident(sql, toks[i + 1])
            break
    return stmt


def _finish(kind: bytes, stmt_sql: bytes, toks: list[_Tok], sql: bytes) -> Statement:
    stmt = Statement(kind=kind.decode("ascii"), sql=stmt_sql)
    for prev, tok in zip(toks, toks[1:], strict=False):
        if tok[0] == "ot" and sql[tok[1]] == 0x28 and prev[0] in ("id", "qi"):
            stmt.functions.add(_ident(sql, prev).lower())
        if prev[4] == b"INTO" and tok[4] == b"OUTFILE":
            stmt.into_outfile = True
        if prev[4] == b"FROM" and tok[4] == b"INFILE":
            stmt.from_infile = True
    return stmt


# --------------------------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------------------------


def _decode_frames(data: bytes, make_decompressor) -> bytes:
    """Decode concatenated frames (clickhouse-connect sends one lz4 frame per block)."""
    out = []
    while data:
        d = make_decompressor()
        out.append(d.decompress(data))
        if not d.eof:
            raise ClickHouseError(CANNOT_DECOMPRESS, "Truncated compressed request body")
        data = d.unused_data
    return b"".join(out)


def decode_body(body: bytes, encoding: str) -> bytes:
    """Undo the request's Content-Encoding."""
    enc = encoding.strip().lower()
    try:
        if enc in ("", "identity"):
            return body
        if enc == "lz4":
            return _decode_frames(body, lz4.frame.LZ4FrameDecompressor)
        if enc == "zstd":
            return _decode_frames(body, lambda: zstandard.ZstdDecompressor().decompressobj())
        if enc in ("gzip", "x-gzip"):
            return gzip.decompress(body)
        if enc == "deflate":
            try:
                return zlib.decompress(body)
            except zlib.error:
                return zlib.decompress(body, -zlib.MAX_WBITS)
    except ClickHouseError:
        raise
    except Exception as exc:
        raise ClickHouseError(CANNOT_DECOMPRESS, f"Cannot decompress request body: {exc}") from exc
    raise ClickHouseError(UNKNOWN_COMPRESSION_METHOD, f"Unknown Content-Encoding: {encoding}")


_ENCODERS = {
    "lz4": lambda b: lz4.frame.compress(b),
    "zstd": lambda b: zstandard.ZstdCompressor(level=1).compress(b),
    "gzip": lambda b: gzip.compress(b, compresslevel=3),
    "deflate": lambda b: zlib.compress(b, 3),
}


def choose_encoding(accept: str) -> str | None:
    """First encoding in the client's Accept-Encoding list that we can produce (q=0 excluded)."""
    for item in accept.split(","):
        name, _, rest = item.partition(";")
        name = name.strip().lower()
        if re.search(r"q\s*=\s*0(?:\.0*)?\s*$", rest.strip()):
            continue
        if name in _ENCODERS:
            return name
    return None


# --------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------


@dataclass
class _Request:
    sql: bytes
    settings: dict[str, str]
    query_params: dict[str, str]
    database: str | None
    default_format: str
    readonly: int


@dataclass
class _Result:
    body: bytes
    result_format: str | None  # set when the statement returns a result set
    summary: dict[str, str]


def _quote_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _quote_ident(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class _Engine:
    """The chdb engine on one data directory, shared by all requests of this process."""

    def __init__(self, data_dir: Path) -> None:
        import chdb  # deferred: importing chdb costs ~0.2 s and the CLI may fail earlier

        self._chdb = chdb
        self.path = str(data_dir.resolve())
        if "?" in self.path:
            raise EndpointStartError(f"data directory path may not contain '?': {self.path}", 3)
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            self._main = chdb.connect(self.path)
            info = self._main.query("SELECT version(), timezone()", "TabSeparated").bytes()
        except Exception as exc:
            raise EndpointStartError(
                f"cannot open chdb data directory {self.path}: {exc}", 3
            ) from exc
        self.version, self.timezone = info.decode().strip().split("\t")
        self._cv = threading.Condition()
        self._active = 0
        self.closing = False

    @contextlib.contextmanager
    def _request_slot(self):
        with self._cv:
            if self.closing:
                raise ClickHouseError(ABORTED, "Server is shutting down")
            self._active += 1
        try:
            yield
        finally:
            with self._cv:
                self._active -= 1
                self._cv.notify_all()

    def execute(self, req: _Request) -> _Result:
        """Run one request's statement on a fresh connection (sessionless semantics)."""
        stmt = analyze_statement(req.sql)
        if stmt.into_outfile:
            raise ClickHouseError(INTO_OUTFILE_NOT_ALLOWED, "INTO OUTFILE is not allowed")
        if stmt.from_infile:
            raise ClickHouseError(
                SUPPORT_IS_DISABLED, "FROM INFILE is not allowed: send the data in the body"
            )
        if req.readonly and "file" in stmt.functions:
            raise ClickHouseError(
                READONLY, "Cannot execute query in readonly mode: file() reads server files"
            )
        with self._request_slot():
            conn = self._chdb.connect(self.path)
            try:
                return self._run(conn, stmt, req)
            except ClickHouseError:
                raise
            except Exception as exc:
                raise ClickHouseError.from_engine(exc) from exc
            finally:
                conn.close()

    def _run(self, conn, stmt: Statement, req: _Request) -> _Result:
        if req.database:
            conn.query(f"USE {_quote_ident(req.database)}", "TabSeparated")
        if req.settings:
            for name in req.settings:
                if not _SETTING_NAME.match(name):
                    raise ClickHouseError(UNKNOWN_SETTING, f"Unknown setting '{name}'")
            assignments = ", ".join(f"{k} = {_quote_string(v)}" for k, v in req.settings.items())
            conn.query(f"SET {assignments}", "TabSeparated")
        if req.readonly:
            conn.query(f"SET readonly = {req.readonly}", "TabSeparated")
        if stmt.insert_head is not None:
            with conn.send_insert(stmt.insert_head.decode(), stmt.insert_format) as ins:
                if stmt.insert_data:
                    ins.append(stmt.insert_data)
                res = ins.finish()  # on any error the context manager cancels the batch
            summary = _summary(0, 0, res.rows_written, res.bytes_written, 0, 0, res.elapsed)
            return _Result(b"", None, summary)
        r = conn.query(stmt.sql, req.default_format, params=req.query_params)
        body = r.bytes() or b""
        summary = _summary(
            r.storage_rows_read(),
            r.storage_bytes_read(),
            r.rows_written(),
            r.bytes_written(),
            r.rows_read(),
            len(body),
            r.elapsed(),
        )
        fmt = (stmt.output_format or req.default_format) if stmt.kind in _RESULT_KINDS else None
        return _Result(body, fmt, summary)

    def close(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Refuse new requests, wait for those in flight, then close the engine."""
        deadline = time.monotonic() + timeout
        with self._cv:
            self.closing = True
            while self._active and time.monotonic() < deadline:
                self._cv.wait(deadline - time.monotonic())
        self._main.close()


def _summary(read_rows, read_bytes, written_rows, written_bytes, result_rows, result_bytes, el):
    values = {
        "read_rows": read_rows,
        "read_bytes": read_bytes,
        "written_rows": written_rows,
        "written_bytes": written_bytes,
        "total_rows_to_read": read_rows,
        "result_rows": result_rows,
        "result_bytes": result_bytes,
        "elapsed_ns": int(el * 1e9),
    }
    return {k: str(int(v)) for k, v in values.items()}


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


class _BadRequest(Exception):
    """The request itself is malformed; answer 400 and close the connection."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ClickHouse"
    sys_version = ""
    timeout = KEEP_ALIVE_S
    server: _HTTPServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature of the base
        """Quiet: one line per request on stderr would swamp the workers' logs."""

    def do_GET(self) -> None:
        self._handle(is_get=True)

    def do_POST(self) -> None:
        self._handle(is_get=False)

    # ---- request -----------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise _BadRequest("Unexpected end of chunked request body")
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError as exc:
                    raise _BadRequest(f"Bad chunk size line: {line[:40]!r}") from exc
                if size == 0:
                    while self.rfile.readline(65537).strip():  # trailers
                        pass
                    return b"".join(chunks)
                data = self.rfile.read(size)
                if len(data) != size:
                    raise _BadRequest("Unexpected end of chunked request body")
                chunks.append(data)
                self.rfile.readline(3)  # CRLF after the chunk
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        try:
            n = int(length)
        except ValueError as exc:
            raise _BadRequest(f"Bad Content-Length: {length}") from exc
        data = self.rfile.read(n)
        if len(data) != n:
            raise _BadRequest("Unexpected end of request body")
        return data

    def _handle(self, is_get: bool) -> None:
        engine = self.server.engine
        url = urlsplit(self.path)
        try:
            body = self._read_body()
        except _BadRequest as exc:
            self.close_connection = True
            self._send_error(ClickHouseError(BAD_ARGUMENTS, str(exc)), query_id="", status=400)
            return
        if url.path in ("/ping", "/replicas_status"):
            self._send(200, b"Ok.\n", [("Content-Type", "text/plain; charset=UTF-8")])
            return
        if url.path != "/":
            self._send(404, f"There is no handle {url.path}\n".encode(), [])
            return
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        query_id = params.get("query_id") or str(uuid.uuid4())
        try:
            body = decode_body(body, self.headers.get("Content-Encoding", ""))
            ctype = self.headers.get("Content-Type", "")
            if ctype.lower().startswith("multipart/form-data"):
                params.update(_form_fields(ctype, body))
                body = b""
            if is_get and "query" not in params:
                self._send(200, b"Ok.\n", [("Content-Type", "text/plain; charset=UTF-8")])
                return
            req = self._build_request(params, body, is_get)
            result = engine.execute(req)
        except ClickHouseError as exc:
            self._send_error(exc, query_id)
            return
        except Exception as exc:  # a bug here must still reach the client as an error
            print(f"clickhouse_http: internal error: {exc!r}", file=sys.stderr, flush=True)
            self._send_error(ClickHouseError(STD_EXCEPTION, repr(exc)), query_id)
            return
        headers = [
            ("X-ClickHouse-Query-Id", query_id),
            ("X-ClickHouse-Summary", json.dumps(result.summary, separators=(",", ":"))),
        ]
        if result.result_format:
            headers.append(("X-ClickHouse-Format", result.result_format))
            ctype = _CONTENT_TYPES.get(result.result_format.lower(), "text/plain; charset=UTF-8")
            headers.append(("Content-Type", ctype))
        else:
            headers.append(("Content-Type", "text/plain; charset=UTF-8"))
        compress = params.get("enable_http_compression", "1").strip().lower() not in (
            "0",
            "false",
        )
        self._send(200, result.body, headers, compress=compress)

    def _build_request(self, params: dict[str, str], body: bytes, is_get: bool) -> _Request:
        for name in _NOT_SUPPORTED_PARAMS:
            if params.get(name, "0").strip() not in ("", "0", "false"):
                raise ClickHouseError(
                    NOT_IMPLEMENTED,
                    f"{name}=1 (ClickHouse block compression) is not supported by this "
                    "endpoint; use HTTP Content-Encoding/Accept-Encoding",
                )
        query = params.get("query")
        sql = (query.encode() + b"\n" + body) if query else body
        readonly = self._readonly(params.get("readonly", "0"), is_get)
        default_format = (
            params.get("default_format") or self.headers.get("X-ClickHouse-Format") or ""
        ).strip() or "TabSeparated"
        if default_format.lower() in _PY_ONLY_FORMATS or not _SETTING_NAME.match(default_format):
            raise ClickHouseError(UNKNOWN_FORMAT, f"Unknown format {default_format}")
        database = params.get("database") or self.headers.get("X-ClickHouse-Database") or None
        settings = {}
        query_params = {}
        for key, value in params.items():
            if key.startswith("param_"):
                query_params[key[6:]] = value
            elif key not in _TRANSPORT_PARAMS:
                settings[key] = value
        return _Request(sql, settings, query_params, database, default_format, readonly)

    @staticmethod
    def _readonly(value: str, is_get: bool) -> int:
        """Effective readonly level: 1 is stricter than 2; GET is at least 2, as in ClickHouse."""
        try:
            level = int(value.strip() or "0")
        except ValueError as exc:
            raise ClickHouseError(BAD_ARGUMENTS, f"Bad value for readonly: {value}") from exc
        if level not in (0, 1, 2):
            raise ClickHouseError(BAD_ARGUMENTS, f"Bad value for readonly: {value}")
        if is_get and level == 0:
            level = 2
        return level

    # ---- response ----------------------------------------------------------------------

    def _send_error(self, exc: ClickHouseError, query_id: str, status: int | None = None) -> None:
        body = exc.body(self.server.engine.version)
        headers = [
            ("X-ClickHouse-Exception-Code", str(exc.code)),
            ("X-ClickHouse-Query-Id", query_id),
            ("Content-Type", "text/plain; charset=UTF-8"),
        ]
        self._send(status or _HTTP_STATUS.get(exc.code, 500), body, headers)

    def _send(
        self,
        status: int,
        body: bytes,
        headers: list[tuple[str, str]],
        compress: bool = False,
    ) -> None:
        encoding = None
        if compress and body:
            encoding = choose_encoding(self.headers.get("Accept-Encoding", ""))
            if encoding:
                body = _ENCODERS[encoding](body)
        try:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            if encoding:
                self.send_header("Content-Encoding", encoding)
            self.send_header("X-ClickHouse-Server-Display-Name", SERVER_NAME)
            self.send_header("X-ClickHouse-Timezone", self.server.engine.timezone)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            else:
                self.send_header("Keep-Alive", f"timeout={KEEP_ALIVE_S}")
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def _form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """Text fields of a multipart/form-data body (query, param_*); files are external data."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not msg.is_multipart():
        raise ClickHouseError(BAD_ARGUMENTS, "Malformed multipart/form-data body")
    fields = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        if part.get_filename() is not None:
            raise ClickHouseError(
                NOT_IMPLEMENTED, "External data (file parts) is not supported by this endpoint"
            )
        payload = part.get_payload(decode=True) or b""
        fields[str(name)] = payload.decode("utf-8")
    return fields


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG
    engine: _Engine

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse-DNS lookup of the host (slow where DNS is absent)."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def get_request(self):
        sock, addr = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, addr


class ClickHouseEndpoint:
    """The endpoint as an object: bind, open the engine, serve, stop.

    The port is bound before chdb opens the data directory, so a taken port never touches
    the store. ``port=0`` picks a free port; ``address`` tells which.
    """

    def __init__(self, data_dir: Path, host: str = "127.0.0.1", port: int = 8123) -> None:
        server_cls = _HTTPServer
        if ":" in host:
            server_cls = type("_HTTPServer6", (_HTTPServer,), {"address_family": socket.AF_INET6})
        try:
            self._httpd = server_cls((host, port), _Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                msg = f"port {port} on {host} is already in use (another endpoint running?)"
            else:
                msg = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
            raise EndpointStartError(msg, 2) from exc
        os.environ["TZ"] = "UTC"  # the engine reads TZ when it starts: pin results to UTC
        if hasattr(time, "tzset"):
            time.tzset()
        try:
            self.engine = _Engine(Path(data_dir))
        except BaseException:
            self._httpd.server_close()
            raise
        self._httpd.engine = self.engine
        self._stopping = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def serve_forever(self) -> None:
        self._httpd.serve_forever(poll_interval=0.2)

    def stop(self) -> None:
        """Stop accepting (safe from any thread but the serving one, or a signal handler)."""
        if not self._stopping.is_set():
            self._stopping.set()
            threading.Thread(target=self._httpd.shutdown, daemon=True).start()

    def close(self) -> None:
        """Release the socket, drain requests in flight, close the chdb engine."""
        self._httpd.server_close()
        self.engine.close()


def serve(data_dir: Path, host: str = "127.0.0.1", port: int = 8123) -> None:
    """Serve ClickHouse HTTP on host:port from the chdb store in data_dir until SIGTERM/SIGINT.

    Raises EndpointStartError when the address or the data directory cannot be used.
    """
    endpoint = ClickHouseEndpoint(Path(data_dir), host, port)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: endpoint.stop())
    bound_host, bound_port = endpoint.address
    print(
        f"clickhouse_http: listening on http://{bound_host}:{bound_port} "
        f"(chdb {endpoint.engine.version}, data dir {endpoint.engine.path})",
        file=sys.stderr,
        flush=True,
    )
    try:
        endpoint.serve_forever()
    finally:
        endpoint.close()
        print("clickhouse_http: stopped", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m abdag.stack.clickhouse_http --data-dir DIR [--host H] [--port P]."""
    parser = argparse.ArgumentParser(
        prog="python -m abdag.stack.clickhouse_http",
        description="Serve ClickHouse's HTTP interface from a chdb data directory.",
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="chdb data directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8123, help="port (0: pick a free one)")
    args = parser.parse_args(argv)
    try:
        serve(args.data_dir, args.host, args.port)
    except EndpointStartError as exc:
        print(f"clickhouse_http: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
