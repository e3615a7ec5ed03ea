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
- Statements are analysed by a small lexer over bytes that follows ClickHouse's own
  (strings, quoted identifiers with their escapes, nested comments, heredocs, UTF-8 blanks).
  It refuses multi-statement SQL (chdb itself would run every statement), finds where inline
  INSERT data starts (binary Native/Arrow data is never decoded or scanned), finds the output
  ``FORMAT`` and notes every name called as ``f(...)``, for the policy below.
- ``INSERT ... FORMAT X`` + data goes through chdb's streaming inserter; a batch that fails is
  cancelled and not committed. Everything else goes through ``query`` with the request's
  default format (TabSeparated unless ``default_format`` says otherwise).
- ``readonly=1|2`` (and GET, which ClickHouse makes readonly) is enforced by the engine:
  ``SET readonly`` on the request's connection, which SQL cannot lift.
- What a request may reach (see "Outside access" below): the engine's own tables and nothing
  else, for every client, readonly or not. Three layers, because one is never enough for SQL:
  the engine runs as a user without the FILE/URL/REMOTE/S3/... source grants, without
  SYSTEM, BACKUP or CREATE DICTIONARY, with table engines limited to those that keep data in
  the data directory, and with the settings that carry SQL or file paths pinned; the
  ``default`` database is a plain Atomic one (clickhouse-local's ``default`` falls back to
  reading any file named like a table); and the lexer refuses calls of functions that reach
  outside (``file()``, ``url()``, ``python()``, ... also those the grants do not cover),
  ``INTO OUTFILE``, ``FROM INFILE`` and ``ATTACH ... FROM '<path>'``, naming what it refused.
- Who may send requests: only this machine's processes and pages. A request whose ``Host``
  is not a loopback name or address (DNS rebinding) or whose ``Origin`` is not a loopback
  page (a browser tab on another site) is refused with 403 before anything runs. When
  ``ABDAG_CLICKHOUSE_PASSWORD`` is set in the endpoint's environment, every query must carry
  that user and password (HTTP basic auth, ``X-ClickHouse-User``/``X-ClickHouse-Key`` or the
  ``user``/``password`` URL parameters, as ClickHouse accepts them); ``/ping`` stays open. A
  same-machine process with the credentials is trusted as ClickHouse trusts its ``default``
  user: it may create, alter, truncate and drop tables (abdag's own schema code does).
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
refused), more than one user, progress headers, query cancellation on client disconnect,
streaming of large results (each result is held in memory once, then sent), and CHECK
constraints on ``INSERT ... FORMAT`` data (chdb's streaming inserter does not evaluate them;
``INSERT ... VALUES`` in SQL does).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import email.parser
import email.policy
import errno
import gzip
import hmac
import ipaddress
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit
from xml.sax.saxutils import escape as xml_escape

import lz4.frame
import zstandard

__all__ = [
    "ClickHouseEndpoint",
    "ClickHouseError",
    "Credentials",
    "EndpointStartError",
    "Statement",
    "analyze_statement",
    "foreign_request",
    "is_local_host",
    "main",
    "outside_access",
    "refused_functions",
    "serve",
    "write_engine_config",
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
ACCESS_DENIED = 497
AUTHENTICATION_FAILED = 516
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
    ACCESS_DENIED: "ACCESS_DENIED",
    AUTHENTICATION_FAILED: "AUTHENTICATION_FAILED",
    STD_EXCEPTION: "STD_EXCEPTION",
}

# HTTP status per ClickHouse error code, close to ClickHouse's own mapping; the rest are 500.
_HTTP_STATUS = {
    **dict.fromkeys((6, 25, 26, 27, 36, 38, 41, 53, 62, 72, 73, 115, 117, 211, 456, 457), 400),
    **dict.fromkeys((164, 344, 358, 497, 516), 403),
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

# One token per match, the way ClickHouse's Lexer.cpp cuts them where it matters: what is a
# string, a quoted identifier, a comment or a blank. Literals (strings, numbers, operators,
# commas, ASCII whitespace between them) merge into one "lit" run, so a 200k-item IN list is a
# handful of tokens, not 400k. Bytes >= 0x80 outside strings are blanks: ClickHouse skips
# UTF-8 spaces (NBSP, U+3000, BOM...) between tokens and refuses every other such byte, so
# treating all of them as blanks can only make the lexer see more calls, never fewer.
# "/*" (nested comments) and "$" (heredocs) are finished by hand: a regex cannot count.
# Quantifiers are possessive: nothing here can backtrack (a plain (?:\s+)*\Z is exponential).
_LEX = re.compile(
    rb"""
    (?P<sp>(?:\s|[\x80-\xff])++)
  | (?P<cm>(?:--|//)[^\n]*+|\#[ !][^\n]*+)
  | (?P<mc>/\*)
  | (?P<id>[A-Za-z_][A-Za-z0-9_$]*+)
  | (?P<lit>(?:'(?:[^'\\]++|\\.|'')*+'|[^'"`$\#;()A-Za-z_/\-\x80-\xff]++|/(?![*/])|-(?!-)
            |\#(?![ !]))++)
  | (?P<st>'(?:[^'\\]++|\\.|'')*+\Z)
  | (?P<qi>"(?:[^"\\]++|\\.|"")*+(?:"|\Z)|`(?:[^`\\]++|\\.|``)*+(?:`|\Z))
  | (?P<dl>\$)
  | (?P<ot>.)
    """,
    re.X | re.S,
)
_BLANKS = ("sp", "cm")
_HEREDOC_TAG = re.compile(rb"\$[A-Za-z0-9_]*+\$")  # ClickHouse 26.x: $$ or $word$
_DOLLAR_WORD = re.compile(rb"\$[A-Za-z0-9_$]*+")  # otherwise '$' starts a bare word


def _comment_end(sql: bytes, pos: int) -> int:
    """End of a /* comment whose body starts at pos; ClickHouse nests them (SQL standard)."""
    depth = 1
    while True:
        close = sql.find(b"*/", pos)
        if close < 0:
            return len(sql)  # unterminated: the engine refuses the query
        opening = sql.find(b"/*", pos, close + 1)
        if opening >= 0:
            depth, pos = depth + 1, opening + 2
            continue
        depth, pos = depth - 1, close + 2
        if depth == 0:
            return pos


def _dollar(sql: bytes, pos: int) -> tuple[str, int]:
    """A heredoc ($tag$ ... $tag$) or a bare word starting with '$', as ClickHouse reads it.

    An older ClickHouse takes any text between two '$' as a heredoc tag; if that reading
    would also find a heredoc here, the query is refused, so no engine version can see code
    where this lexer saw a string.
    """
    m = _HEREDOC_TAG.match(sql, pos)
    if m:
        close = sql.find(m.group(), m.end())
        if close >= 0:
            return "hd", close + len(m.group())
    else:
        tag_end = sql.find(b"$", pos + 1)
        if tag_end > 0 and sql.find(sql[pos : tag_end + 1], tag_end + 1) >= 0:
            raise ClickHouseError(
                SYNTAX_ERROR, f"Heredoc tags must be words: failed at position {pos + 1}"
            )
    return "id", _DOLLAR_WORD.match(sql, pos).end()


def _tokens(sql: bytes, pos: int = 0) -> Iterator[tuple[str, int, int]]:
    """(group, start, end) of every token of sql from pos, blanks and comments included."""
    n = len(sql)
    match = _LEX.match
    while pos < n:
        m = match(sql, pos)
        group, end = m.lastgroup, m.end()
        if group == "mc":
            group, end = "cm", _comment_end(sql, end)
        elif group == "dl":
            group, end = _dollar(sql, pos)
        yield group, pos, end
        pos = end


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
    attach_from_path: bool = False  # ATTACH ... FROM '<path>'
    engines: set[str] = field(default_factory=set)  # lower-case ENGINE names of a CREATE/ATTACH


# A token is (group, start, end, depth, word): word is the upper-cased bare word for "id"
# tokens and b"" otherwise. Plain tuples: this loop is the endpoint's only per-byte-ish cost.
_Tok = tuple[str, int, int, int, bytes]

# Formats whose inline data ClickHouse parses as SQL expressions (Values evaluates them, so
# "INSERT INTO t FORMAT Values (file('/x'))" would read a file): their data is lexed too.
_EXPRESSION_FORMATS = frozenset({"values"})

_SIMPLE_ESCAPES = {
    b"a": b"\a",
    b"b": b"\b",
    b"e": b"\x1b",
    b"f": b"\f",
    b"n": b"\n",
    b"r": b"\r",
    b"t": b"\t",
    b"v": b"\v",
    b"0": b"\0",
}
_BARE_ESCAPES = frozenset((b"\\", b"'", b'"', b"`", b"/", b"="))
_QUOTED_ESCAPES = {
    q[0]: re.compile(rb"\\(?:x([0-9A-Fa-f]{2})|(.))|" + re.escape(q + q), re.S)
    for q in (b'"', b"`")
}


def _unescape(m: re.Match) -> bytes:
    """One escape as ClickHouse's parseComplexEscapeSequence reads it (\\N is nothing)."""
    if m.group(1):
        return bytes([int(m.group(1), 16)])
    char = m.group(2)
    if char is None:  # a doubled quote
        return m.group()[:1]
    if char == b"N":
        return b""
    decoded = _SIMPLE_ESCAPES.get(char, char)
    if decoded in _BARE_ESCAPES or decoded < b" ":
        return decoded
    return b"\\" + decoded  # ClickHouse keeps the backslash of 'a\%' for LIKE patterns


def _ident(sql: bytes, tok: _Tok | tuple[str, int, int]) -> str:
    """Identifier text of an "id" or "qi" token as the engine resolves it (`fil\\x65` is file)."""
    group, start, end = tok[0], tok[1], tok[2]
    raw = sql[start:end]
    if group == "qi":
        raw = _QUOTED_ESCAPES[raw[0]].sub(_unescape, raw[1:-1])
    return raw.decode("utf-8", "replace")


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
    end = len(sql)
    kind = b""
    stream = _tokens(sql)
    for group, start, pos in stream:
        if group in _BLANKS:
            continue
        word = b""
        if group == "ot":
            c = sql[start]
            if c == 0x3B:  # ';'
                if any(g not in _BLANKS for g, _, _ in stream):
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
                name = next((t for t in _tokens(sql, pos) if t[0] not in _BLANKS), None)
                if name is not None and name[0] in ("id", "qi"):
                    head = sql[:start].rstrip()
                    stmt = _finish(kind, head, toks, sql)
                    stmt.insert_head = head
                    stmt.insert_format = _ident(sql, name)
                    stmt.insert_data = sql[_data_start(sql, name[2]) :]
                    if stmt.insert_format.lower() in _EXPRESSION_FORMATS:
                        stmt.functions |= _called(stmt.insert_data)
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


def _calls(toks: Iterable[tuple], sql: bytes) -> Iterator[str]:
    """Lower-case names written as name(...) among significant tokens (blanks skipped)."""
    prev = None
    for tok in toks:
        if prev is not None and tok[0] == "ot" and sql[tok[1]] == 0x28 and prev[0] in ("id", "qi"):
            yield _ident(sql, prev).lower()
        prev = tok


def _called(sql: bytes) -> set[str]:
    """Every name called as f(...) in a fragment of SQL (inline Values data)."""
    return set(_calls((t for t in _tokens(sql) if t[0] not in _BLANKS), sql))


def _finish(kind: bytes, stmt_sql: bytes, toks: list[_Tok], sql: bytes) -> Statement:
    stmt = Statement(kind=kind.decode("ascii", "replace"), sql=stmt_sql)
    stmt.functions.update(_calls(toks, sql))
    for prev, tok in zip(toks, toks[1:], strict=False):
        if prev[4] == b"INTO" and tok[4] == b"OUTFILE":
            stmt.into_outfile = True
        if prev[4] == b"FROM" and tok[4] == b"INFILE":
            stmt.from_infile = True
        if (
            kind == b"ATTACH"
            and prev[4] == b"FROM"
            and prev[3] == 0
            and (tok[0] == "hd" or (tok[0] == "lit" and sql[tok[1]] in b"'{"))
        ):
            stmt.attach_from_path = True
    if kind in (b"CREATE", b"ATTACH", b"REPLACE"):
        stmt.engines = _engines(toks, sql)
    return stmt


def _engines(toks: list[_Tok], sql: bytes) -> set[str]:
    """Names in "ENGINE [=] name" of a DDL statement, before its AS SELECT part if any."""
    names = set()
    for i, tok in enumerate(toks):
        if tok[3] == 0 and tok[4] in (b"SELECT", b"WITH"):
            break
        if tok[4] != b"ENGINE" or tok[3] != 0:
            continue
        j = i + 1
        if j < len(toks) and toks[j][0] == "lit" and sql[toks[j][1] : toks[j][2]].strip() == b"=":
            j += 1
        if j < len(toks) and toks[j][0] in ("id", "qi"):
            names.add(_ident(sql, toks[j]).lower())
    return names


# --------------------------------------------------------------------------------------------
# Outside access
# --------------------------------------------------------------------------------------------
#
# The endpoint's promise: a request reaches the engine's own tables and nothing else, for
# every client. One place per rule:
#
# - _INSIDE_TABLE_FUNCTIONS: table functions that stay inside the engine. Every other table
#   function the engine registers (file, url, s3, remote, mysql, executable, python,
#   filesystem, iceberg, ...) is refused by name, so one added by a newer engine is refused
#   too. _OUTSIDE_FUNCTIONS adds names that reach outside and are not (only) table functions:
#   file() the scalar reads any file and no grant guards it, disk() creates directories at
#   any path before it fails, python() reads the endpoint's own Python objects.
# - _INSIDE_ENGINES: the table and database engines a CREATE/ATTACH may name (data in the
#   data directory; no File, URL, Kafka, EmbeddedRocksDB(ttl, '<path>'), Filesystem, ...).
#   Checked here: the engine's TABLE ENGINE grants cover only engines with a "source", and
#   clickhouse-local ignores table_engines_require_grant.
# - _ENGINE_GRANTS: what the engine's only user may do (no FILE/URL/REMOTE/... sources, no
#   DISK, SYSTEM, BACKUP, dictionaries, introspection). The engine enforces these whatever
#   the spelling, also for SQL the lexer never sees.
# - _PINNED_SETTINGS: settings whose value is SQL (run by the engine, unseen by the lexer),
#   a file path (read or written by the engine) or an engine name; constant for everyone.

_INSIDE_TABLE_FUNCTIONS = frozenset(
    {
        "numbers",
        "numbers_mt",
        "zeros",
        "zeros_mt",
        "primes",
        "generaterandom",
        "generateseries",
        "generate_series",
        "values",
        "null",
        "view",
        "viewifpermitted",
        "viewexplain",
        "merge",
        "loop",
        "format",
        "input",
        "dictionary",
        "mergetreeindex",
        "mergetreeprojection",
        "mergetreeanalyzeindexes",
        "mergetreeanalyzeindexesuuid",
        "mergetreecodecblockcounts",
        "mergetreetextindex",
        "fuzzjson",
        "fuzzquery",
        "sqlstandardvalues",
    }
)
_OUTSIDE_FUNCTIONS = frozenset(
    {
        "file",
        "disk",
        "python",
        "url",
        "urlcluster",
        "s3",
        "s3cluster",
        "hdfs",
        "executable",
        "remote",
        "remotesecure",
        "cluster",
        "clusterallreplicas",
        "mysql",
        "postgresql",
        "jdbc",
        "odbc",
        "sqlite",
        "filesystem",
        "eval",
    }
)
_INSIDE_ENGINES = frozenset(
    name.lower()
    for name in (
        "MergeTree",
        "ReplacingMergeTree",
        "SummingMergeTree",
        "AggregatingMergeTree",
        "CollapsingMergeTree",
        "VersionedCollapsingMergeTree",
        "CoalescingMergeTree",
        "GraphiteMergeTree",
        "Memory",
        "Log",
        "TinyLog",
        "StripeLog",
        "Null",
        "Set",
        "Join",
        "Buffer",
        "Merge",
        "Dictionary",
        "View",
        "MaterializedView",
        "GenerateRandom",
        "Atomic",
    )
)
_ENGINE_GRANTS = (
    "GRANT SHOW, SELECT, INSERT, ALTER, CREATE DATABASE, CREATE TABLE, CREATE VIEW, "
    "CREATE TEMPORARY TABLE, CREATE FUNCTION, DROP, UNDROP TABLE, TRUNCATE, OPTIMIZE, CHECK, "
    "KILL QUERY, dictGet ON *.*",
)
_PINNED_SETTINGS = (
    "dialect",  # prql/kusto/promql: text the lexer does not read as SQL
    "filter",
    "additional_table_filters",
    "additional_result_filter",
    "allow_experimental_eval_table_function",
    "format_schema",
    "format_schema_source",
    "format_template_resultset",
    "format_template_row",
    "output_format_schema",
    "input_format_record_errors_file_path",
    "default_table_engine",  # an engine chosen without an ENGINE clause the lexer could check
    "default_temporary_table_engine",
)


def refused_functions(table_functions: Iterable[str] = ()) -> frozenset[str]:
    """Names refused as f(...): the engine's table functions that are not inside, and more."""
    return frozenset(n.lower() for n in table_functions) - _INSIDE_TABLE_FUNCTIONS | (
        _OUTSIDE_FUNCTIONS
    )


def outside_access(
    stmt: Statement, refused: frozenset[str] = _OUTSIDE_FUNCTIONS
) -> ClickHouseError | None:
    """Why stmt would reach outside the engine (files, URLs, processes, servers), or None.

    Refused for every client, readonly or not: these are not what a ClickHouse client of
    abdag's tables needs, and each has read or written files on this machine.
    """
    if stmt.into_outfile:
        return ClickHouseError(
            INTO_OUTFILE_NOT_ALLOWED, "INTO OUTFILE is not allowed: it writes server files"
        )
    if stmt.from_infile:
        return ClickHouseError(
            SUPPORT_IS_DISABLED, "FROM INFILE is not allowed: send the data in the body"
        )
    if stmt.attach_from_path:
        return ClickHouseError(
            ACCESS_DENIED,
            "ATTACH ... FROM '<path>' is not allowed: it moves a directory from outside the "
            "data directory into the store",
        )
    names = sorted(stmt.functions & refused)
    if names:
        return ClickHouseError(
            ACCESS_DENIED,
            f"{', '.join(f'{n}()' for n in names)} is not allowed on this endpoint: it reaches "
            "files, URLs, processes or servers outside the engine's tables",
        )
    engines = sorted(stmt.engines - _INSIDE_ENGINES)
    if engines:
        return ClickHouseError(
            ACCESS_DENIED,
            f"ENGINE = {engines[0]} is not allowed on this endpoint: it keeps data outside the "
            "data directory or reaches other servers (allowed: MergeTree family, Memory, Log, "
            "Null, Set, Join, Buffer, Merge, views, Atomic...)",
        )
    return None


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


ENGINE_CONFIG_DIR = "abdag_endpoint"  # in the data directory; rewritten at every start

# Privileges that must not show in the engine user's SHOW GRANTS once the config is applied.
_FORBIDDEN_GRANTS = re.compile(
    r"\b(?:SOURCES|FILE|URL|REMOTE|S3|DISK|SYSTEM|BACKUP|INTROSPECTION)\b|TABLE ENGINE ON \*"
)


def write_engine_config(data_dir: Path) -> Path:
    """Write the engine's config (its one user's grants, pinned settings); return config.xml.

    chdb reads it as ``config-file``; giving one also stops clickhouse-local from loading a
    ``config.xml`` it finds in the current directory. Nothing secret is in it.
    """
    conf_dir = data_dir / ENGINE_CONFIG_DIR
    conf_dir.mkdir(parents=True, exist_ok=True)
    users = conf_dir / "users.xml"
    constraints = "".join(f"<{name}><const/></{name}>" for name in _PINNED_SETTINGS)
    grants = "".join(f"<query>{xml_escape(q)}</query>" for q in _ENGINE_GRANTS)
    users.write_text(
        "<clickhouse>\n"
        f"  <profiles><default><constraints>{constraints}</constraints></default></profiles>\n"
        "  <users><default><password></password><networks><ip>::/0</ip></networks>"
        f"<profile>default</profile><quota>default</quota><grants>{grants}</grants>"
        "</default></users>\n"
        "  <quotas><default></default></quotas>\n"
        "</clickhouse>\n"
    )
    config = conf_dir / "config.xml"
    config.write_text(
        f"<clickhouse><users_config>{xml_escape(str(users))}</users_config></clickhouse>\n"
    )
    return config


class _Engine:
    """The chdb engine on one data directory, shared by all requests of this process."""

    def __init__(self, data_dir: Path) -> None:
        import chdb  # deferred: importing chdb costs ~0.2 s and the CLI may fail earlier

        self._chdb = chdb
        self.path = str(data_dir.resolve())
        for char in "?&":  # chdb reads "path?key=value&key=value"
            if char in self.path:
                raise EndpointStartError(
                    f"data directory path may not contain '{char}': {self.path}", 3
                )
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            config = write_engine_config(data_dir)
            self._main = chdb.connect(f"{self.path}?config-file={quote(str(config.resolve()))}")
            info = self._main.query("SELECT version(), timezone()", "TabSeparated").bytes()
        except Exception as exc:
            raise EndpointStartError(
                f"cannot open chdb data directory {self.path}: {exc}", 3
            ) from exc
        self.version, self.timezone = info.decode().strip().split("\t")
        try:
            self._confine()
        except EndpointStartError:
            self._main.close()
            raise
        except Exception as exc:
            self._main.close()
            raise EndpointStartError(f"cannot confine the chdb engine: {exc}", 3) from exc
        self._cv = threading.Condition()
        self._active = 0
        self.closing = False

    def _text(self, sql: str) -> str:
        return (self._main.query(sql, "TabSeparated").bytes() or b"").decode()

    def _confine(self) -> None:
        """Check the engine took the restricted config; make ``default`` a plain database.

        clickhouse-local makes ``default`` an Overlay that falls back to the filesystem: a
        name that is not a table is read as a file path (``SELECT * FROM '/etc/passwd'``,
        ``INSERT INTO `/some/file` ...``). Re-attaching the Overlay's own Atomic database
        (same UUID: same store directory, same tables) removes the fallback for this process.
        On disk only ``metadata/default.sql`` is written (a plain chdb still opens the
        directory as before); the next start does it again. Refuses to start otherwise.
        """
        grants = self._text("SHOW GRANTS")
        if _FORBIDDEN_GRANTS.search(grants):
            raise EndpointStartError(
                f"the chdb engine did not apply abdag's restricted user config: {grants!r}", 3
            )
        row = self._text("SELECT engine, uuid FROM system.databases WHERE name = 'default'")
        if row.split() and row.split()[0] == "Overlay":
            db_uuid = str(uuid.UUID(row.split()[1]))
            self._text("DETACH DATABASE default")
            self._text(f"ATTACH DATABASE default UUID '{db_uuid}' ENGINE = Atomic")
        row = self._text("SELECT engine FROM system.databases WHERE name = 'default'")
        if row.strip() not in ("", "Atomic"):
            raise EndpointStartError(f"database default is {row.strip()}, not Atomic", 3)
        self.refused = refused_functions(
            self._text("SELECT name FROM system.table_functions").split()
        )

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
        refusal = outside_access(stmt, self.refused)
        if refusal is not None:
            raise refusal
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


_HOST_PORT = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::[0-9]{1,5})?\Z"
)
_ORIGIN = re.compile(r"(?i)https?://(?P<host>[^/?#\s]+)\Z")
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def is_local_host(value: str, also: Iterable[str] = ()) -> bool:
    """True when a Host header (or an Origin's host) names this machine.

    ``localhost``, 127.0.0.0/8 and ``[::1]``, with or without a port, or one of ``also``
    (the address the endpoint listens on). A DNS name that resolves to 127.0.0.1 is not
    enough: that is how DNS rebinding lets a web page reach a local port.
    """
    m = _HOST_PORT.match(value.strip())
    if not m:
        return False
    host = (m.group("v6") or m.group("name")).lower()
    if host == "localhost" or host in also:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _shown(value: str) -> str:
    return repr(value[:80])


def foreign_request(
    headers: Message, local_names: frozenset[str] = frozenset()
) -> ClickHouseError | None:
    """Why a request comes from outside this machine's processes and pages, or None.

    - ``Host`` must name this machine: a page on evil.example whose name is re-pointed at
      127.0.0.1 (DNS rebinding) sends ``Host: evil.example``.
    - ``Origin``, when present, must be a page served from this machine (``http(s)://``
      localhost, 127.x or [::1], any port); ``Origin: null`` is refused, since sandboxed
      iframes, ``data:`` and ``file:`` pages send it and any site can make one. Non-browser
      clients (clickhouse-connect, curl, urllib) send no Origin.
    - A browser request without ``Origin`` (a GET such as an ``<img>``) that the browser marks
      ``Sec-Fetch-Site: cross-site`` is refused too.
    """
    hosts = headers.get_all("Host") or []
    if len(hosts) > 1 or (hosts and not is_local_host(hosts[0], local_names)):
        return ClickHouseError(
            ACCESS_DENIED,
            f"Host {_shown(', '.join(hosts))} is not a loopback name or address of this "
            "machine: refused (a DNS-rebinding web page sends such a Host)",
        )
    origins = headers.get_all("Origin") or []
    if origins:
        m = _ORIGIN.match(origins[0].strip())
        if len(origins) > 1 or not m or not is_local_host(m.group("host"), local_names):
            return ClickHouseError(
                ACCESS_DENIED,
                f"Origin {_shown(', '.join(origins))} is not a page of this machine: "
                "cross-origin requests are refused",
            )
    elif headers.get("Sec-Fetch-Site", "").strip().lower() == "cross-site":
        return ClickHouseError(ACCESS_DENIED, "Cross-site browser requests are refused")
    return None


def _basic_credentials(value: str) -> tuple[str, str] | None:
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        return None
    return (user, password) if sep else None


@dataclass(frozen=True)
class Credentials:
    """The one user and password every query must carry, when a password is set.

    The endpoint learns them from ``ABDAG_CLICKHOUSE_USER``/``ABDAG_CLICKHOUSE_PASSWORD``
    (abdag.settings), never from argv, which every local user can read in ``ps``. With no
    password nothing is checked (a fresh stack's ``default`` user without a password).
    """

    user: str = "default"
    password: str = field(default="", repr=False)

    @property
    def required(self) -> bool:
        return bool(self.password)

    def refusal(self, headers: Message, params: dict[str, str]) -> ClickHouseError | None:
        """None when the request carries these credentials, as ClickHouse reads them."""
        if not self.required:
            return None
        given: list[tuple[str, str] | None] = []
        if headers.get("Authorization") is not None:
            given.append(_basic_credentials(headers["Authorization"]))
        if "X-ClickHouse-User" in headers or "X-ClickHouse-Key" in headers:
            given.append(
                (headers.get("X-ClickHouse-User", ""), headers.get("X-ClickHouse-Key", ""))
            )
        if "user" in params or "password" in params:
            given.append((params.get("user", ""), params.get("password", "")))
        if len(given) > 1:
            return ClickHouseError(
                AUTHENTICATION_FAILED,
                "Invalid authentication: it is not allowed to use the Authorization header, "
                "X-ClickHouse-User/X-ClickHouse-Key headers and user/password parameters "
                "together",
            )
        if given and given[0] is None:
            return ClickHouseError(
                AUTHENTICATION_FAILED,
                "Invalid Authorization header: this endpoint takes Basic authentication only",
            )
        user, password = given[0] if given and given[0] else ("", "")
        user = user or "default"  # as ClickHouse: no user named means the default user
        same_user = hmac.compare_digest(user.encode(), self.user.encode())
        same_password = hmac.compare_digest(password.encode(), self.password.encode())
        if same_user and same_password:
            return None
        return ClickHouseError(
            AUTHENTICATION_FAILED,
            f"{_shown(user)}: Authentication failed: password is incorrect, or there is no "
            "user with such name",
        )


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

    def _has_body(self) -> bool:
        length = self.headers.get("Content-Length", "0").strip()
        return bool(self.headers.get("Transfer-Encoding")) or length not in ("", "0")

    def _refusal(self, path: str, params: dict[str, str], is_get: bool) -> ClickHouseError | None:
        """Why this request may not be served at all; checked before its body is read."""
        refusal = foreign_request(self.headers, self.server.local_names)
        if (
            refusal is None
            and path == "/"
            and (not is_get or "query" in params or self._has_body())
        ):
            refusal = self.server.credentials.refusal(self.headers, params)
        return refusal

    def _handle(self, is_get: bool) -> None:
        engine = self.server.engine
        url = urlsplit(self.path)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        refusal = self._refusal(url.path, params, is_get)
        if refusal is not None:
            self.close_connection = True  # the body is left unread
            self._send_error(refusal, query_id="")
            return
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
    credentials: Credentials = Credentials()
    local_names: frozenset[str] = frozenset()

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

    def __init__(
        self,
        data_dir: Path,
        host: str = "127.0.0.1",
        port: int = 8123,
        credentials: Credentials | None = None,
    ) -> None:
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
        self._httpd.credentials = credentials or Credentials()
        bound = host.strip("[]").lower()
        self._httpd.local_names = frozenset() if bound in _WILDCARD_HOSTS else frozenset({bound})
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


def serve(
    data_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8123,
    credentials: Credentials | None = None,
) -> None:
    """Serve ClickHouse HTTP on host:port from the chdb store in data_dir until SIGTERM/SIGINT.

    Raises EndpointStartError when the address or the data directory cannot be used.
    """
    credentials = credentials or Credentials()
    endpoint = ClickHouseEndpoint(Path(data_dir), host, port, credentials)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: endpoint.stop())
    bound_host, bound_port = endpoint.address
    print(
        f"clickhouse_http: listening on http://{bound_host}:{bound_port} "
        f"(chdb {endpoint.engine.version}, data dir {endpoint.engine.path}, "
        + (
            f"password required for user {credentials.user!r})"
            if credentials.required
            else "no password)"
        ),
        file=sys.stderr,
        flush=True,
    )
    try:
        endpoint.serve_forever()
    finally:
        endpoint.close()
        print("clickhouse_http: stopped", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m abdag.stack.clickhouse_http --data-dir DIR [--host H] [--port P].

    The user and password to require come from ``ABDAG_CLICKHOUSE_USER`` and
    ``ABDAG_CLICKHOUSE_PASSWORD`` in the environment, never from argv.
    """
    from abdag.settings import Settings

    parser = argparse.ArgumentParser(
        prog="python -m abdag.stack.clickhouse_http",
        description="Serve ClickHouse's HTTP interface from a chdb data directory.",
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="chdb data directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8123, help="port (0: pick a free one)")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    credentials = Credentials(settings.clickhouse_user, settings.clickhouse_password)
    try:
        serve(args.data_dir, args.host, args.port, credentials)
    except EndpointStartError as exc:
        print(f"clickhouse_http: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
