"""What the local ClickHouse endpoint refuses: files, URLs, foreign pages, wrong passwords.

The analyzer tests run without an endpoint. Every other test talks to a real endpoint
subprocess over 127.0.0.1 (started as tests/_ch.py starts it); nothing is mocked. Before
these rules, ``SELECT * FROM file('/etc/passwd', 'LineAsString')`` returned the file, a page
on any site could POST ``DROP TABLE`` with ``Origin: http://evil.example``, and no password
was ever asked.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import os
import secrets
import shutil
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import clickhouse_connect
import pandas as pd
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from abdag.clickhouse import ClickHouseAuthenticationFailed, connect, ping
from abdag.settings import Settings
from abdag.stack.clickhouse_http import (
    ClickHouseError,
    analyze_statement,
    is_local_host,
    outside_access,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ch import Endpoint, kill, launch, stop, wait_ready  # noqa: E402

pytestmark = pytest.mark.timeout(120)

PASSWD = "/etc/passwd"
LEAK = "root:"  # first field of /etc/passwd's first line on any Linux


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory) -> Endpoint:
    ep = launch(tmp_path_factory.mktemp("ch-safety") / "db")
    yield ep
    stop(ep.proc)


def post(ep: Endpoint, body: bytes | str, path: str = "/", headers: dict | None = None):
    """One raw HTTP request: (status, headers, body bytes). Host is 127.0.0.1:port unless set."""
    conn = http.client.HTTPConnection(ep.host, ep.port, timeout=10)
    try:
        data = body.encode() if isinstance(body, str) else body
        conn.request("POST", path, body=data, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def get(ep: Endpoint, path: str, headers: dict | None = None):
    conn = http.client.HTTPConnection(ep.host, ep.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def code(headers: dict) -> str | None:
    return headers.get("X-ClickHouse-Exception-Code")


def client(ep: Endpoint, **kwargs):
    return clickhouse_connect.get_client(host=ep.host, port=ep.port, **kwargs)


# Analyzer: spellings of a call that the engine accepts must all be seen as calls -----------

CALLS_OF_FILE = [
    "SELECT * FROM FiLe('/etc/passwd', 'LineAsString')",
    "SELECT * FROM `file`('/etc/passwd', 'LineAsString')",
    "SELECT * FROM \"file\"('/etc/passwd', 'LineAsString')",
    "SELECT * FROM file /* a comment */ ('/etc/passwd', 'LineAsString')",
    "SELECT * FROM file -- a comment\n('/etc/passwd', 'LineAsString')",
    "SELECT * FROM file // a comment\n('/etc/passwd', 'LineAsString')",
    "SELECT * FROM file/* /* nested */ */('/etc/passwd', 'LineAsString')",
    "SELECT * FROM file\u00a0('/etc/passwd', 'LineAsString')",  # NBSP: a blank to ClickHouse
    "SELECT * FROM file\u3000('/etc/passwd', 'LineAsString')",
    "SELECT * FROM file\ufeff('/etc/passwd', 'LineAsString')",
    r"SELECT * FROM `fil\x65`('/etc/passwd', 'LineAsString')",  # escapes in quoted names
    r"SELECT * FROM `fi\Nle`('/etc/passwd', 'LineAsString')",  # \N reads as nothing
    "SELECT file('/etc/passwd')",
    "SELECT * FROM (SELECT * FROM (SELECT * FROM file('/etc/passwd', 'LineAsString')))",
    "SELECT * FROM numbers(1) AS n JOIN file('/etc/passwd', 'LineAsString') AS f ON 1",
    "SELECT 1 WHERE 'x' IN (SELECT * FROM file('/etc/passwd', 'LineAsString'))",
    "SELECT * FROM view(SELECT file('/etc/passwd'))",
    "WITH (SELECT file('/etc/passwd')) AS x SELECT x",
    "SELECT arrayMap(p -> file(p), ['/etc/passwd'])",
    "INSERT INTO t SELECT * FROM file('/etc/passwd', 'LineAsString')",
    "INSERT INTO FUNCTION file('{tmp}/x', 'LineAsString') SELECT 'x'",
    "INSERT INTO FUNCTION file('{tmp}/x', 'LineAsString') FORMAT LineAsString\nx\n",
    "INSERT INTO t FORMAT Values ('a'), (file('/etc/passwd'))",  # Values data is evaluated
    "CREATE TABLE x AS file('/etc/passwd', 'LineAsString')",
    "CREATE VIEW v AS SELECT * FROM file('/etc/passwd', 'LineAsString')",
    "DESCRIBE TABLE file('/etc/passwd', 'LineAsString')",
    "CREATE FUNCTION rd AS (p) -> file(p)",
    "BACKUP TABLE t TO File('{tmp}/backup')",
    "CREATE TABLE t (s String) ENGINE = File(LineAsString, '/etc/passwd')",
    # Where a lexer that did not cut tokens as ClickHouse does would lose sync and miss it:
    "SELECT 1 // '\n, file('/etc/passwd') -- '",
    "SELECT /* /* */ ' */ file('/etc/passwd') -- '",
    "SELECT $1$ ' $1$, file('/etc/passwd') -- '",
    "SELECT 1 AS $a$, file('/etc/passwd')",
    "SELECT 'it''s', \"a\"\"b\", 'a\\'', file('/etc/passwd')",
]


@pytest.mark.parametrize("sql", CALLS_OF_FILE)
def test_every_spelling_of_a_call_is_seen(sql):
    stmt = analyze_statement(sql.encode())
    assert "file" in stmt.functions, stmt.functions  # and nothing else is needed to refuse it
    refusal = outside_access(stmt)
    assert refusal is not None and refusal.code == 497 and "file()" in refusal.message


def test_names_in_strings_and_plain_columns_are_not_calls():
    for sql in (
        "SELECT 'file(x)', $$url('y')$$, count() FROM t WHERE s = 'remote(' -- file(\n",
        "SELECT file, url FROM t /* s3( */",
        "INSERT INTO t FORMAT CSV\nfile('/etc/passwd'),url(x)\n",  # CSV data is not SQL
    ):
        stmt = analyze_statement(sql.encode())
        assert outside_access(stmt) is None, (sql, stmt.functions)


def test_a_heredoc_tag_another_engine_version_would_read_differently_is_refused():
    with pytest.raises(ClickHouseError) as exc:
        analyze_statement(b"SELECT $a b$ ' $a b$, file('/etc/passwd') -- '")
    assert exc.value.code == 62


def test_attach_from_a_path_is_refused_by_the_analyzer():
    stmt = analyze_statement(b"ATTACH TABLE t FROM '/home' (x UInt8) ENGINE = MergeTree ORDER BY x")
    assert outside_access(stmt).code == 497
    stmt = analyze_statement(b"ATTACH TABLE t FROM {p:String} (x UInt8) ENGINE = Memory")
    assert outside_access(stmt).code == 497
    assert outside_access(analyze_statement(b"ATTACH TABLE t")) is None


def test_engines_outside_the_data_directory_are_refused_by_the_analyzer():
    for sql, engine in (
        (
            b"CREATE TABLE t (k UInt8) ENGINE = EmbeddedRocksDB(0, '/x') PRIMARY KEY k",
            "embeddedrocksdb",
        ),
        (b"CREATE TABLE t (s String) ENGINE Kafka SETTINGS kafka_broker_list = 'h:9'", "kafka"),
        (b"CREATE DATABASE d ENGINE=`Filesystem`", "filesystem"),
        (b"ATTACH TABLE t (x UInt8) ENGINE = FileLog('/x', 'TSV')", "filelog"),
    ):
        assert outside_access(analyze_statement(sql)).message.startswith(f"ENGINE = {engine} ")
    for sql in (
        b"CREATE TABLE t (engine String) ENGINE = ReplacingMergeTree(v) ORDER BY engine",
        b"CREATE VIEW v AS SELECT engine FROM system.tables",
        b"CREATE MATERIALIZED VIEW mv ENGINE = Memory AS SELECT engine FROM system.tables",
        b"SELECT name, engine FROM system.tables WHERE engine = 'File'",
    ):
        assert outside_access(analyze_statement(sql)) is None, sql


def test_loopback_host_names():
    for host in ("127.0.0.1", "127.0.0.1:18123", "localhost", "LOCALHOST:1", "[::1]", "[::1]:9"):
        assert is_local_host(host), host
    for host in (
        "evil.example",
        "evil.example:18123",
        "127.0.0.1.nip.io",
        "localhost.evil.example",
        "192.168.1.5",
        "[::ffff:c0a8:105]",
        "",
        "127.0.0.1 evil",
    ):
        assert not is_local_host(host), host


# 1. Files, URLs and everything else outside the engine --------------------------------------


def test_file_reads_are_refused_and_nothing_leaks(endpoint, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret\n")
    for sql in (
        f"SELECT * FROM file('{PASSWD}','LineAsString')",
        f"SELECT file('{PASSWD}')",
        f"SELECT * FROM file('{secret}', 'LineAsString')",
    ):
        for path in ("/", "/?readonly=1"):
            status, headers, body = post(endpoint, sql, path)
            assert (status, code(headers)) == (403, "497"), (sql, body)
            assert b"file()" in body and LEAK.encode() not in body and b"top secret" not in body
    with pytest.raises(DatabaseError) as exc:
        client(endpoint).query(f"SELECT * FROM file('{PASSWD}', 'LineAsString')")
    assert exc.value.code == 497 and LEAK not in str(exc.value)


def test_insert_into_function_file_writes_nothing(endpoint, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("original\n")
    new = tmp_path / "new.txt"
    for sql in (
        f"INSERT INTO FUNCTION file('{victim}', 'LineAsString') SELECT 'pwned' "
        "SETTINGS engine_file_truncate_on_insert = 1",
        f"INSERT INTO FUNCTION file('{new}', 'LineAsString') SELECT 'pwned'",
        f"INSERT INTO FUNCTION file('{new}', 'LineAsString') FORMAT LineAsString\npwned\n",
        f"SELECT 'pwned' INTO OUTFILE '{new}'",
    ):
        status, headers, body = post(endpoint, sql)
        assert status == 403 and code(headers) in ("497", "358"), (sql, body)
    assert victim.read_text() == "original\n"
    assert not new.exists()


@pytest.fixture
def listener():
    """A local port that must never be connected to: proof that nothing was fetched."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.3)
    yield sock
    sock.close()


def assert_never_connected(sock: socket.socket) -> None:
    with pytest.raises(TimeoutError):
        sock.accept()[0].close()


def test_url_and_remote_fetches_are_refused(endpoint, listener):
    port = listener.getsockname()[1]
    target = f"http://127.0.0.1:{port}/x"
    for sql in (
        f"SELECT * FROM url('{target}', 'LineAsString')",
        f"SELECT * FROM URL('{target}', 'LineAsString')",
        f"SELECT * FROM urlCluster('default', '{target}', 'LineAsString')",
        f"SELECT * FROM s3('{target}', 'LineAsString')",
        f"SELECT * FROM remote('127.0.0.1:{port}', system.one)",
        f"SELECT * FROM mysql('127.0.0.1:{port}', 'd', 't', 'u', 'p')",
        f"INSERT INTO FUNCTION url('{target}', 'LineAsString') SELECT 'x'",
        f"CREATE TABLE t_url (s String) ENGINE = URL('{target}', LineAsString)",
        "CREATE TABLE t_kafka (s String) ENGINE = Kafka SETTINGS "
        f"kafka_broker_list = '127.0.0.1:{port}', kafka_topic_list = 't', "
        "kafka_group_name = 'g', kafka_format = 'LineAsString'",
        f"CREATE DICTIONARY d (k UInt64, v String) PRIMARY KEY k SOURCE(HTTP(url '{target}' "
        "format 'TSV')) LAYOUT(FLAT()) LIFETIME(0)",
    ):
        status, headers, body = post(endpoint, sql)
        assert status == 403 and code(headers) == "497", (sql, body)
    assert_never_connected(listener)


OUTSIDE = [
    # Table functions and engines that read or write files, run programs or read Python.
    ("SELECT * FROM filesystem('/etc')", "filesystem()"),
    ("SELECT * FROM executable('cat /etc/passwd', 'TSV', 's String')", "executable()"),
    ("SELECT * FROM Python(secret)", "python()"),
    ("SELECT * FROM sqlite('/etc/passwd', 't')", "sqlite()"),
    ("SELECT * FROM icebergLocal('/etc')", "iceberglocal()"),
    ("SELECT * FROM eval('SELECT 1')", "eval()"),
    ("CREATE TABLE t_f (s String) ENGINE = File(LineAsString, '/etc/passwd')", "file()"),
    ("CREATE DATABASE fs ENGINE = Filesystem('/etc')", "filesystem()"),
    ("CREATE DATABASE fs ENGINE = Filesystem", "ENGINE = filesystem"),
    ("CREATE TABLE t_l (s String) ENGINE = FileLog('/etc', 'LineAsString')", "ENGINE = filelog"),
    (
        "CREATE TABLE t_r (k UInt8, v String) ENGINE = EmbeddedRocksDB(0, '{tmp}/rocks') "
        "PRIMARY KEY k",
        "ENGINE = embeddedrocksdb",
    ),
    ("BACKUP TABLE t TO File('{tmp}/backup')", "file()"),
    ("BACKUP TABLE t TO Disk('default', 'b.zip')", "disk()"),
    ("RESTORE TABLE t2 FROM Disk('default', '../')", "disk()"),
    ("SYSTEM DROP DNS CACHE", "grant SYSTEM"),  # the engine's grants
    ("SYSTEM FLUSH LOGS", "grant SYSTEM"),
    (
        "CREATE DICTIONARY d (k UInt64, v String) PRIMARY KEY k "
        "SOURCE(FILE(path '/etc/passwd' format 'TSV')) LAYOUT(FLAT()) LIFETIME(0)",
        "file()",
    ),
    (
        "CREATE DICTIONARY d (k UInt64, v String) PRIMARY KEY k "
        "SOURCE(CLICKHOUSE(host 'example.com' table 't')) LAYOUT(FLAT()) LIFETIME(0)",
        "CREATE DICTIONARY",
    ),
    # Through the filesystem fallback of clickhouse-local's default database (now gone).
    (f"SELECT * FROM '{PASSWD}'", "UNKNOWN_TABLE"),
    (f"SELECT * FROM `{PASSWD}`", "UNKNOWN_TABLE"),
    (f"SELECT * FROM default.`{PASSWD}`", "UNKNOWN_TABLE"),
    (f"SELECT * FROM loop(default, '{PASSWD}') LIMIT 1", "UNKNOWN_TABLE"),
    (f"DESCRIBE TABLE `{PASSWD}`", "UNKNOWN_TABLE"),
    # Settings whose value is SQL or a path are pinned.
    (
        "SELECT * FROM numbers(1) SETTINGS additional_result_filter = "
        "'number IN (SELECT length(file(''/etc/passwd'')))'",
        "should not be changed",
    ),
    ("SELECT 1 SETTINGS dialect = 'prql'", "should not be changed"),
    ("SELECT 1 FORMAT Template SETTINGS format_template_resultset = '/etc/passwd'", "changed"),
    ("SELECT 1 SETTINGS input_format_record_errors_file_path = '{tmp}/x'", "changed"),
    ("SELECT 1 SETTINGS allow_experimental_eval_table_function = 1", "changed"),
]


@pytest.mark.parametrize(("sql", "said"), OUTSIDE)
def test_everything_outside_the_engine_is_refused(endpoint, sql, said, tmp_path):
    status, headers, body = post(endpoint, sql.replace("{tmp}", str(tmp_path)))
    assert status != 200, body
    assert code(headers) in ("497", "60", "452"), body
    assert said.encode() in body and LEAK.encode() not in body
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sql", CALLS_OF_FILE)
def test_every_spelling_of_file_is_refused_by_the_endpoint(endpoint, sql, tmp_path):
    status, headers, body = post(endpoint, sql.replace("{tmp}", str(tmp_path)))
    assert (status, code(headers)) == (403, "497"), body
    assert LEAK.encode() not in body
    assert list(tmp_path.iterdir()) == []


def test_pinned_settings_in_url_parameters_are_refused(endpoint):
    path = "/?additional_table_filters=" + urllib.parse.quote(
        "{'t': 'x IN (SELECT length(file(\\'/etc/passwd\\')))'}"
    )
    status, headers, body = post(endpoint, "SELECT 1", path)
    assert code(headers) == "452" and LEAK.encode() not in body


def test_paths_named_by_attach_or_disk_are_never_touched(endpoint, tmp_path):
    target = tmp_path / "victim-dir"
    target.mkdir()
    (target / "keep.txt").write_text("keep\n")
    disk_dir = tmp_path / "new-disk"
    for sql in (
        f"ATTACH TABLE t_att FROM '{target}/' (x UInt8) ENGINE = MergeTree ORDER BY x",
        f"ATTACH TABLE t_att FROM $${target}/$$ (x UInt8) ENGINE = MergeTree ORDER BY x",
        "CREATE TABLE t_disk (x UInt8) ENGINE = MergeTree ORDER BY x "
        f"SETTINGS disk = disk(type = local, path = '{disk_dir}/')",
        f"ALTER TABLE t_any MODIFY SETTING disk = DISK(type = local, path = '{disk_dir}/')",
    ):
        status, headers, body = post(endpoint, sql)
        assert (status, code(headers)) == (403, "497"), (sql, body)
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert not disk_dir.exists()


def test_default_database_is_a_plain_database(endpoint):
    c = client(endpoint)
    assert c.command("SELECT engine FROM system.databases WHERE name = 'default'") == "Atomic"
    grants = c.command("SHOW GRANTS")
    assert "SOURCES" not in grants and "FILE" not in grants and "SYSTEM" not in grants


# 4. What abdag itself needs keeps working ---------------------------------------------------


def test_abdag_schema_migrations_inserts_and_destructive_ddl_still_work(endpoint):
    from abdag.comparators.schema import TABLES, ensure_schema, schema_version

    c = client(endpoint)
    c.command("CREATE DATABASE IF NOT EXISTS abdag_own")
    own = client(endpoint, database="abdag_own")
    ensure_schema(own)
    last_column = TABLES["dead_letters"].columns[-1][0]
    own.command(f"ALTER TABLE dead_letters DROP COLUMN {last_column}")  # an older table
    ensure_schema(own)  # migrates it back, additively
    tables = {r[0] for r in own.query("SHOW TABLES").result_rows}
    assert schema_version(own) >= 1 and set(TABLES) <= tables
    assert last_column in {r[0] for r in own.query("DESCRIBE TABLE dead_letters").result_rows}
    own.command("OPTIMIZE TABLE pairs FINAL")
    own.command("TRUNCATE TABLE dead_letters")
    own.command("CREATE TABLE t_tmp (x UInt32, s String) ENGINE = MergeTree ORDER BY x")
    df = pd.DataFrame({"x": range(1_000), "s": [f"file({i})" for i in range(1_000)]})
    assert own.insert_df("t_tmp", df).written_rows == 1_000  # Native data is never scanned
    own.command("INSERT INTO t_tmp FORMAT Values (1000, concat('url', '(')), (1001, 'x')")
    assert own.command("SELECT count() FROM t_tmp WHERE s LIKE '%(%'") == 1_001
    own.command("CREATE TABLE t_src (x UInt32) ENGINE = Null")
    own.command("CREATE MATERIALIZED VIEW t_mv ENGINE = Memory AS SELECT x FROM t_src")
    own.command("INSERT INTO t_src SELECT number FROM numbers(5)")
    assert own.command("SELECT sum(x) FROM t_mv") == 10
    assert own.command("SELECT count() FROM merge('^t_tmp$')") == 1_002
    assert own.command("SELECT count() FROM (SELECT * FROM generateRandom('a UInt8') LIMIT 3)") == 3
    assert own.query("SELECT * FROM format(CSV, 'a\\n')").result_rows == [("a",)]
    for name in ("t_mv", "t_src", "t_tmp"):
        own.command(f"DROP TABLE {name}")
    c.command("DROP DATABASE abdag_own")
    assert ("abdag_own",) not in c.query("SHOW DATABASES").result_rows


# 2. Foreign pages and names -----------------------------------------------------------------


def table_with_rows(ep: Endpoint, name: str) -> None:
    c = client(ep)
    c.command(f"CREATE TABLE IF NOT EXISTS {name} (x UInt32) ENGINE = MergeTree ORDER BY x")
    c.command(f"INSERT INTO {name} VALUES (1), (2)")


def rows(ep: Endpoint, name: str) -> int:
    return client(ep).command(f"SELECT count() FROM {name}")


def test_foreign_origin_is_refused_and_tables_stay(endpoint):
    table_with_rows(endpoint, "t_origin")
    for origin in (
        "http://evil.example",
        "https://evil.example:443",
        "null",
        "http://127.0.0.1.evil.example",
        "http://localhost.evil.example:18123",
        "file://",
    ):
        headers = {"Origin": origin, "Content-Type": "text/plain"}
        status, got, body = post(endpoint, "DROP TABLE t_origin", headers=headers)
        assert (status, code(got)) == (403, "497"), (origin, body)
        assert b"Origin" in body
    status, got, _ = get(
        endpoint, "/?query=SELECT%201", headers={"Sec-Fetch-Site": "cross-site"}
    )  # an <img> or a link from another site: no Origin on a GET
    assert (status, code(got)) == (403, "497")
    assert rows(endpoint, "t_origin") == 2


def test_non_loopback_host_is_refused(endpoint):
    table_with_rows(endpoint, "t_host")
    for host in (
        "evil.example",
        f"evil.example:{endpoint.port}",
        f"127.0.0.1.nip.io:{endpoint.port}",
        "192.168.1.5",
        "localhost.",
    ):
        status, got, body = post(endpoint, "DROP TABLE t_host", headers={"Host": host})
        assert (status, code(got)) == (403, "497"), (host, body)
        status, _, _ = get(endpoint, "/ping", headers={"Host": host})
        assert status == 403
    assert rows(endpoint, "t_host") == 2


def test_loopback_host_and_origin_are_served(endpoint):
    port = endpoint.port
    for headers in (
        {"Host": f"localhost:{port}"},
        {"Host": "127.0.0.1"},
        {"Host": f"[::1]:{port}"},
        {"Host": "127.0.0.2:9"},
        {"Origin": "http://localhost:3000"},
        {"Origin": f"https://127.0.0.1:{port}"},
        {"Origin": "http://[::1]:8080"},
        {"Sec-Fetch-Site": "none"},  # the user typed the URL
        {"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:8050"},
    ):
        status, _, body = post(endpoint, "SELECT 1", headers=headers)
        assert (status, body) == (200, b"1\n"), headers
    assert ping(f"http://localhost:{port}") and ping(f"http://127.0.0.1:{port}")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as resp:
        assert resp.read() == b"Ok.\n"
    assert clickhouse_connect.get_client(host="localhost", port=port).command("SELECT 2") == 2


def test_without_a_password_any_credentials_are_accepted_as_before(endpoint):
    for auth in ("default:", "someone:anything"):
        token = base64.b64encode(auth.encode()).decode()
        status, _, body = post(endpoint, "SELECT 1", headers={"Authorization": f"Basic {token}"})
        assert (status, body) == (200, b"1\n")
    assert client(endpoint, username="x", password="y").command("SELECT 3") == 3


# 3. Credentials -----------------------------------------------------------------------------

USER = "abdag_user"


@pytest.fixture(scope="module")
def password() -> str:
    return "pw-" + secrets.token_urlsafe(16)


@pytest.fixture(scope="module")
def secured(tmp_path_factory, password) -> Endpoint:
    """An endpoint that learnt a user and password from its environment, as `abdag up` does."""
    data_dir = tmp_path_factory.mktemp("ch-secured") / "db"
    log_path = data_dir.parent / "endpoint.log"
    env = dict(os.environ, ABDAG_CLICKHOUSE_USER=USER, ABDAG_CLICKHOUSE_PASSWORD=password)
    argv = [sys.executable, "-m", "abdag.stack.clickhouse_http", "--data-dir", str(data_dir)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [*argv, "--host", "127.0.0.1", "--port", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
        )
    try:
        host, port = wait_ready(proc, log_path)
    except BaseException:
        kill(proc)
        raise
    yield Endpoint(proc, host, port, data_dir, log_path)
    stop(proc)


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_credentials_are_required_when_a_password_is_set(secured, password):
    wrong = [
        ({}, "/"),
        (basic(USER, "wrong"), "/"),
        (basic("default", password), "/"),
        (basic(USER, password + "x"), "/"),
        ({"X-ClickHouse-User": USER, "X-ClickHouse-Key": "wrong"}, "/"),
        ({"X-ClickHouse-User": USER}, "/"),
        ({}, f"/?user={USER}&password=wrong"),
        ({"Authorization": f"Bearer {password}"}, "/"),
        ({"Authorization": "Basic !!!"}, "/"),
        # Two methods at once is refused even if both are right (as ClickHouse does).
        ({**basic(USER, password), "X-ClickHouse-User": USER, "X-ClickHouse-Key": password}, "/"),
    ]
    for headers, path in wrong:
        status, got, body = post(secured, "SELECT 1", path, headers)
        assert (status, code(got)) == (403, "516"), (headers, path, body)
        assert b"AUTHENTICATION_FAILED" in body and password.encode() not in body
    status, got, _ = get(secured, "/?query=SELECT%201")
    assert (status, code(got)) == (403, "516")
    with pytest.raises(DatabaseError) as exc:
        client(secured, username=USER, password="wrong")
    assert exc.value.code == 516
    url = f"http://127.0.0.1:{secured.port}"
    with pytest.raises(ClickHouseAuthenticationFailed) as refused:  # one line for the CLI
        connect(Settings(clickhouse_url=url, clickhouse_user=USER, clickhouse_password="bad"))
    assert USER in str(refused.value) and "bad" not in str(refused.value)
    # /ping needs no password (abdag up and status use it); neither does a bare GET /.
    assert ping(f"http://127.0.0.1:{secured.port}")
    assert get(secured, "/")[2] == b"Ok.\n"


def test_right_credentials_work_for_every_client(secured, password):
    c = client(secured, username=USER, password=password)
    c.command("CREATE TABLE IF NOT EXISTS t_auth (x UInt32) ENGINE = MergeTree ORDER BY x")

    async def async_count():
        a = await clickhouse_connect.get_async_client(
            host=secured.host, port=secured.port, username=USER, password=password
        )
        try:
            return await a.command("SELECT count() FROM t_auth")
        finally:
            await a.close()

    assert c.insert_df("t_auth", pd.DataFrame({"x": range(100)})).written_rows == 100
    assert c.query_df("SELECT sum(x) AS s FROM t_auth")["s"][0] == 4_950
    assert asyncio.run(async_count()) == 100
    settings = Settings(
        clickhouse_url=f"http://127.0.0.1:{secured.port}",
        clickhouse_user=USER,
        clickhouse_password=password,
    )
    assert connect(settings).command("SELECT count() FROM t_auth") == 100  # workers, report
    assert connect(settings, readonly=True).command("SELECT 1") == 1  # abdag sql, dashboard
    for headers, path in (
        (basic(USER, password), "/"),
        ({"X-ClickHouse-User": USER, "X-ClickHouse-Key": password}, "/"),
        ({}, f"/?user={USER}&password={urllib.parse.quote(password)}"),
    ):
        status, _, body = post(secured, "SELECT count() FROM t_auth", path, headers)
        assert (status, body) == (200, b"100\n"), headers
    if shutil.which("curl"):
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "-u",
                f"{USER}:{password}",
                f"http://127.0.0.1:{secured.port}/",
                "--data-binary",
                "SELECT 7",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert out.stdout == "7\n", out.stderr


def test_password_is_never_in_argv_or_the_log(secured, password):
    cmdline = Path(f"/proc/{secured.proc.pid}/cmdline").read_bytes()
    assert password.encode() not in cmdline and b"abdag.stack.clickhouse_http" in cmdline
    post(secured, "SELECT 1", headers=basic(USER, "wrong"))
    log = secured.log()
    assert password not in log and f"password required for user '{USER}'" in log


def test_engine_config_holds_no_secret(secured, password):
    conf = secured.data_dir / "abdag_endpoint"
    text = "".join(p.read_text() for p in conf.iterdir())
    assert password not in text and "GRANT" in text and "<const/>" in text
