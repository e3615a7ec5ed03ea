"""The chdb-backed ClickHouse HTTP endpoint, driven by real clickhouse-connect clients.

Every test talks to a real endpoint subprocess over 127.0.0.1; nothing is mocked. Most tests
share one endpoint (module fixture); the crash and restart tests start their own.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import clickhouse_connect
import lz4.frame
import numpy as np
import pandas as pd
import pytest
import zstandard
from clickhouse_connect.driver.exceptions import DatabaseError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ch import Endpoint, kill, launch, start_clickhouse_endpoint, stop  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory) -> Endpoint:
    ep = launch(tmp_path_factory.mktemp("ch") / "db")
    yield ep
    stop(ep.proc)


def client(ep: Endpoint, **kwargs):
    return clickhouse_connect.get_client(host=ep.host, port=ep.port, **kwargs)


def raw_post(ep: Endpoint, sql_or_body: bytes, path: str = "/", headers: dict | None = None):
    """One HTTP request without clickhouse-connect, to see status, headers and bytes."""
    conn = http.client.HTTPConnection(ep.host, ep.port, timeout=10)
    try:
        conn.request("POST", path, body=sql_or_body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def sample_frame(n: int, start: int = 0) -> pd.DataFrame:
    i = np.arange(start, start + n, dtype=np.int64)
    return pd.DataFrame(
        {
            "i": i,
            "f": i / 7.0,
            "s": [f'row {k}; it\'s "quoted"\t\u00e9' for k in i],
            "ts": pd.to_datetime(i * 1000 + 1_700_000_000_000, unit="ms"),
            "n": pd.array([None if k % 3 == 0 else int(k) for k in i], dtype="Int32"),
            "arr": [np.array([k, k / 2], dtype=np.float32) for k in i],
        }
    )


TABLE_DDL = (
    "CREATE TABLE {name} (i Int64, f Float64, s String, ts DateTime64(3), "
    "n Nullable(Int32), arr Array(Float32)) ENGINE = MergeTree ORDER BY i"
)


def assert_frames_equal(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.columns) == list(want.columns)
    assert len(got) == len(want)
    np.testing.assert_array_equal(got["i"].to_numpy(), want["i"].to_numpy())
    np.testing.assert_array_equal(got["f"].to_numpy(), want["f"].to_numpy())
    assert list(got["s"]) == list(want["s"])
    got_ts = pd.to_datetime(got["ts"]).dt.tz_localize(None).astype("datetime64[ms]")
    np.testing.assert_array_equal(got_ts.to_numpy(), want["ts"].astype("datetime64[ms]").to_numpy())
    assert [None if pd.isna(v) else int(v) for v in got["n"]] == [
        None if pd.isna(v) else int(v) for v in want["n"]
    ]
    for a, b in zip(got["arr"], want["arr"], strict=True):
        np.testing.assert_array_equal(np.asarray(a, dtype=np.float32), b)


# 1 -----------------------------------------------------------------------------------------
def test_sync_client_round_trips_10k_rows_of_mixed_types(endpoint):
    c = client(endpoint)
    c.command(TABLE_DDL.format(name="t_sync"))
    df = sample_frame(10_000)
    summary = c.insert_df("t_sync", df)
    assert summary.written_rows == 10_000
    assert_frames_equal(c.query_df("SELECT * FROM t_sync ORDER BY i"), df)
    rows = c.query("SELECT i, s, n, arr FROM t_sync WHERE i IN (0, 1, 9999) ORDER BY i").result_rows
    assert rows[0][0] == 0 and rows[0][2] is None
    assert rows[1][1] == df["s"][1] and rows[1][2] == 1
    assert rows[2][0] == 9999 and list(rows[2][3]) == [9999.0, 4999.5]
    assert c.command("SELECT count() FROM t_sync") == 10_000
    c.close()


# 2 -----------------------------------------------------------------------------------------
def test_async_client_creates_inserts_and_queries(endpoint):
    df = sample_frame(2_000, start=5)

    async def scenario():
        c = await clickhouse_connect.get_async_client(host=endpoint.host, port=endpoint.port)
        try:
            await c.command(TABLE_DDL.format(name="t_async"))
            summary = await c.insert_df("t_async", df)
            counts = await asyncio.gather(
                *(c.command("SELECT count() FROM t_async") for _ in range(8))
            )
            got = await c.query_df("SELECT * FROM t_async ORDER BY i")
            return summary.written_rows, counts, got
        finally:
            await c.close()

    written, counts, got = asyncio.run(scenario())
    assert written == 2_000
    assert counts == [2_000] * 8
    assert_frames_equal(got, df)


# 3 -----------------------------------------------------------------------------------------
READER = textwrap.dedent(
    """
    import json, sys, time
    import clickhouse_connect
    host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    c = clickhouse_connect.get_client(host=host, port=port)
    seen, errors, reads = [], [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            seen.append(c.command("SELECT count() FROM t_rw"))
            c.query("SELECT max(i), sum(f) FROM t_rw")
            reads += 1
        except Exception as exc:
            errors.append(repr(exc))
    print(json.dumps({"seen": seen, "errors": errors, "reads": reads}))
    """
)


def test_second_process_reads_consistently_while_first_writes(endpoint):
    c = client(endpoint)
    c.command(TABLE_DDL.format(name="t_rw"))
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, endpoint.host, str(endpoint.port), "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        batch, batches = 500, 0
        deadline = time.monotonic() + 30
        while reader.poll() is None and time.monotonic() < deadline:  # write while it reads
            c.insert_df("t_rw", sample_frame(batch, start=batches * batch))
            batches += 1
        out, err = reader.communicate(timeout=30)
    finally:
        if reader.poll() is None:
            kill(reader)
    assert reader.returncode == 0, err
    result = json.loads(out)
    assert result["errors"] == []
    assert result["reads"] > 10
    seen = result["seen"]
    assert len(set(seen)) > 1, "reads must overlap the writes"
    assert seen == sorted(seen), "counts must never go backwards"
    assert all(n % batch == 0 for n in seen), "a batch is visible whole or not at all"
    assert c.command("SELECT count() FROM t_rw") == batches * batch
    assert c.command("SELECT uniqExact(i) FROM t_rw") == batches * batch


# 4 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lz4", "zstd"])
def test_compressed_inserts_and_responses(endpoint, method):
    c = client(endpoint, compress=method)
    table = f"t_{method}"
    c.command(TABLE_DDL.format(name=table))
    df = sample_frame(20_000)
    assert c.insert_df(table, df).written_rows == 20_000
    assert_frames_equal(c.query_df(f"SELECT * FROM {table} ORDER BY i"), df)

    # The response really is compressed the way the client asked.
    status, headers, body = raw_post(
        endpoint,
        f"SELECT * FROM {table} FORMAT Native".encode(),
        headers={"Accept-Encoding": method},
    )
    assert status == 200 and headers["Content-Encoding"] == method
    plain = lz4.frame.decompress(body) if method == "lz4" else zstandard.decompress(body)
    assert len(plain) > len(body)

    # A body of several concatenated frames decodes whole (clickhouse-connect sends one per block).
    rows = [b"1,a\n", b"2,b\n", b"3,c\n"]
    if method == "lz4":
        payload = b"".join(lz4.frame.compress(r) for r in rows)
    else:
        payload = b"".join(zstandard.ZstdCompressor().compress(r) for r in rows)
    c.command(f"CREATE TABLE {table}_csv (a Int32, s String) ENGINE = MergeTree ORDER BY a")
    status, headers, body = raw_post(
        endpoint,
        payload,
        path=f"/?query=INSERT%20INTO%20{table}_csv%20FORMAT%20CSV",
        headers={"Content-Encoding": method},
    )
    assert status == 200, body
    assert json.loads(headers["X-ClickHouse-Summary"])["written_rows"] == "3"
    assert c.query(f"SELECT a, s FROM {table}_csv ORDER BY a").result_rows == [
        (1, "a"),
        (2, "b"),
        (3, "c"),
    ]


def test_gzip_request_body_and_chunked_transfer(endpoint):
    c = client(endpoint)
    c.command("CREATE TABLE t_gz (a Int32) ENGINE = MergeTree ORDER BY a")
    body = gzip.compress(b"INSERT INTO t_gz FORMAT TSV\n1\n2\n")
    conn = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=10)
    halves = [body[: len(body) // 2], body[len(body) // 2 :]]
    conn.request(
        "POST", "/", body=iter(halves), headers={"Content-Encoding": "gzip"}, encode_chunked=True
    )
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    resp.read()
    conn.close()
    assert c.command("SELECT sum(a) FROM t_gz") == 3


# 5 -----------------------------------------------------------------------------------------
def test_errors_reach_the_client_with_clickhouse_codes(endpoint):
    c = client(endpoint)
    with pytest.raises(DatabaseError) as unknown_table:
        c.query("SELECT * FROM no_such_table")
    assert unknown_table.value.code == 60
    assert "UNKNOWN_TABLE" in str(unknown_table.value)
    with pytest.raises(DatabaseError) as syntax:
        c.command("SELEKT 1")
    assert syntax.value.code == 62

    # A batch that fails part-way is not committed.
    c.command("CREATE TABLE t_bad (a Int32) ENGINE = MergeTree ORDER BY a")
    status, headers, body = raw_post(
        endpoint, b"INSERT INTO t_bad FORMAT CSV\n1\n2\nnot-a-number\n"
    )
    code = headers["X-ClickHouse-Exception-Code"]
    assert status == 400 and code in ("27", "117")  # CANNOT_PARSE_..., INCORRECT_DATA
    assert body.startswith(f"Code: {code}. DB::Exception:".encode())
    assert c.command("SELECT count() FROM t_bad") == 0


# 6 -----------------------------------------------------------------------------------------
def test_multi_statement_sql_is_refused_and_trailing_semicolon_accepted(endpoint):
    c = client(endpoint)
    c.command("CREATE TABLE t_multi (a Int32) ENGINE = MergeTree ORDER BY a")
    for sql in (
        "SELECT 1; SELECT 2",
        "INSERT INTO t_multi VALUES (1); DROP TABLE t_multi",
        "SELECT ';'; SELECT 2",
    ):
        with pytest.raises(DatabaseError) as refused:
            c.command(sql)
        assert refused.value.code == 62, sql
        assert "Multi-statements are not allowed" in str(refused.value)
    assert c.command("SELECT count() FROM t_multi") == 0  # nothing ran, table still there
    assert c.command("SELECT 1;") == 1
    assert c.command("SELECT 2 ;  -- done\n") == 2
    assert c.command("SELECT 'a;b', \"x;y\" FROM (SELECT 1 AS `x;y`);") == ["a;b", "1"]
    c.command("INSERT INTO t_multi VALUES (7);")
    assert c.command("SELECT sum(a) FROM t_multi") == 7


# 7 -----------------------------------------------------------------------------------------
def test_readonly_client_cannot_write_or_touch_files_or_urls(endpoint, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret\n")
    admin = client(endpoint)
    admin.command("CREATE TABLE t_ro (a Int32) ENGINE = MergeTree ORDER BY a")
    ro = client(endpoint, settings={"readonly": 1})
    assert ro.command("SELECT count() FROM t_ro") == 0
    refused = [
        "INSERT INTO t_ro VALUES (1)",
        "CREATE TABLE t_ro2 (a Int32) ENGINE = MergeTree ORDER BY a",
        "DROP TABLE t_ro",
        "SET readonly = 0",
        "INSERT INTO t_ro SELECT 1 SETTINGS readonly = 0",
    ]
    for sql in refused:
        with pytest.raises(DatabaseError) as exc:
            ro.command(sql)
        assert exc.value.code == 164, sql
    # Files and URLs are refused for every client, readonly or not (test_clickhouse_safety.py).
    for sql in (
        f"SELECT * FROM file('{secret}', 'LineAsString')",
        "SELECT * FROM url('http://127.0.0.1:9/x', 'LineAsString')",
        f"SELECT file('{secret}')",
        f"SELECT * FROM file('{secret}', 'LineAsString') SETTINGS readonly = 0",
    ):
        for c in (ro, admin):
            with pytest.raises(DatabaseError) as exc:
                c.command(sql)
            assert exc.value.code == 497 and "top secret" not in str(exc.value), sql
    with pytest.raises(DatabaseError) as exc:
        ro.insert("t_ro", [[1]], column_names=["a"])
    assert exc.value.code == 164
    # INTO OUTFILE writes server files: refused for every client, as a ClickHouse server does.
    target = tmp_path / "out.tsv"
    with pytest.raises(DatabaseError) as exc:
        admin.command(f"SELECT 1 INTO OUTFILE '{target}'")
    assert exc.value.code == 358 and not target.exists()
    assert admin.command("SELECT count() FROM t_ro") == 0
    # The same client without readonly can write: readonly was per request, not sticky.
    admin.command("INSERT INTO t_ro VALUES (1)")
    assert ro.command("SELECT count() FROM t_ro") == 1


# 8 -----------------------------------------------------------------------------------------
def test_every_acknowledged_row_survives_kill_9(tmp_path):
    data_dir = tmp_path / "db"
    ep = launch(data_dir)
    acked = []
    stop_writing = threading.Event()
    try:
        c = client(ep)
        c.command(TABLE_DDL.format(name="t_crash"))

        def writer():
            w = client(ep)
            batch, k = 1_000, 0
            while not stop_writing.is_set():
                try:
                    w.insert_df("t_crash", sample_frame(batch, start=k * batch))
                except Exception:
                    return  # the endpoint died mid-request: this batch was not acknowledged
                acked.append(batch)
                k += 1

        t = threading.Thread(target=writer)
        t.start()
        while sum(acked) < 20_000:
            time.sleep(0.01)
        kill(ep.proc)  # SIGKILL while the writer is still inserting
        stop_writing.set()
        t.join(30)
    finally:
        kill(ep.proc)
    acknowledged = sum(acked)

    ep2 = launch(data_dir)
    try:
        c = client(ep2)
        count = c.command("SELECT count() FROM t_crash")
        assert count >= acknowledged
        assert count - acknowledged <= 1_000  # at most the batch in flight, and only whole
        assert count % 1_000 == 0
        assert c.command("SELECT uniqExact(i) FROM t_crash") == count
    finally:
        stop(ep2.proc)


# 9 -----------------------------------------------------------------------------------------
def test_data_persists_across_clean_stop_and_start(tmp_path):
    data_dir = tmp_path / "db"
    ep = launch(data_dir)
    try:
        c = client(ep)
        c.command(TABLE_DDL.format(name="t_keep"))
        df = sample_frame(3_000)
        c.insert_df("t_keep", df)
    finally:
        code = stop(ep.proc)
    assert code == 0, ep.log()
    assert "stopped" in ep.log()

    ep2 = launch(data_dir)
    try:
        assert_frames_equal(client(ep2).query_df("SELECT * FROM t_keep ORDER BY i"), df)
    finally:
        assert stop(ep2.proc) == 0


def test_taken_port_exits_2_with_a_clear_message(endpoint, tmp_path):
    proc, log_path = start_clickhouse_endpoint(tmp_path / "db2", port=endpoint.port)
    try:
        assert proc.wait(20) == 2
    finally:
        kill(proc)
    assert "already in use" in log_path.read_text()


# 10 ----------------------------------------------------------------------------------------
def test_query_parameters_server_side_and_client_side(endpoint):
    c = client(endpoint)
    assert c.query("SELECT {x:UInt32} + 1", parameters={"x": 5}).result_rows == [(6,)]
    assert c.query("SELECT %(x)s + 1", parameters={"x": 5}).result_rows == [(6,)]
    tricky = "it's; DROP TABLE x -- \\ \t\u00e9"
    assert c.query("SELECT {s:String}", parameters={"s": tricky}).result_rows == [(tricky,)]
    assert c.query("SELECT %(s)s", parameters={"s": tricky}).result_rows == [(tricky,)]
    assert c.query(
        "SELECT {a:Array(UInt8)}, {d:DateTime}",
        parameters={"a": [1, 2], "d": pd.Timestamp("2024-01-02 03:04:05").to_pydatetime()},
    ).result_rows[0][0] == [1, 2]
    # Long parameters make clickhouse-connect switch to a multipart/form-data body.
    long = "x" * 6_000
    assert c.query("SELECT length({s:String})", parameters={"s": long}).result_rows == [(6_000,)]
    with pytest.raises(DatabaseError):
        c.query("SELECT {missing:UInt8}")


def test_plain_http_formats_ping_and_headers(endpoint):
    status, headers, body = raw_post(endpoint, b"SELECT 1 AS x, 'a' AS y")
    assert (status, body) == (200, b"1\ta\n")
    assert headers["X-ClickHouse-Format"] == "TabSeparated"
    assert headers["X-ClickHouse-Timezone"] == "UTC"
    assert headers["X-ClickHouse-Query-Id"] and headers["X-ClickHouse-Server-Display-Name"]
    assert json.loads(headers["X-ClickHouse-Summary"])["result_rows"] == "1"
    status, headers, body = raw_post(endpoint, b"SELECT 1 AS x FORMAT JSONEachRow")
    assert body == b'{"x":1}\n' and headers["X-ClickHouse-Format"] == "JSONEachRow"
    _, _, body = raw_post(endpoint, b"SELECT number FROM numbers(2)", path="/?default_format=CSV")
    assert body == b"0\n1\n"
    _, _, body = raw_post(endpoint, b"SELECT count() FROM one", path="/?database=system")
    assert body == b"1\n"
    status, headers, _ = raw_post(endpoint, b"SELECT 1", path="/?database=no_such_db")
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (404, "81")
    status, headers, _ = raw_post(endpoint, b"SELECT 1", path="/?no_such_setting=1")
    assert headers["X-ClickHouse-Exception-Code"] == "115"
    _, _, body = raw_post(endpoint, b"SELECT getSetting('max_threads')", path="/?max_threads=3")
    assert body == b"3\n"
    _, _, body = raw_post(endpoint, b"SELECT getSetting('max_threads') = 3")
    assert body == b"0\n"  # settings are per request, never left on a shared session
    conn = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=10)
    conn.request("GET", "/ping")
    assert conn.getresponse().read() == b"Ok.\n"
    conn.request("GET", "/?query=SELECT%20getSetting('readonly')")  # GET is readonly, as in CH
    assert conn.getresponse().read() == b"2\n"
    conn.close()
