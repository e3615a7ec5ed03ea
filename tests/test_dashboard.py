"""``abdag dashboard`` on the real session stack: no mocks.

A synthetic binary experiment (B better, labels arriving 10-50 s after the request, some
unpaired requests, a few dead letters) goes into the stack's ClickHouse; the dashboard
server runs in a thread on a free port. Its JSON must carry the numbers of
``build_report`` (the ``abdag report`` code) and its page, loaded by headless Chromium,
must draw every chart and show the same verdict. The screenshot lands in
``artifacts/dashboard.png`` (kept by CI).
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from abdag.clickhouse import connect
from abdag.comparators.report import build_report
from abdag.comparators.rows import PAIR_COLUMNS, to_insert_values
from abdag.comparators.schema import TABLES, ensure_schema
from abdag.dashboard import make_server, serve
from abdag.dashboard.data import pick_bucket
from abdag.settings import Settings
from abdag.stack.processes import free_port

DAG = "dashboard_test"
EXPERIMENT = f"{DAG}.synthetic"
T0 = dt.datetime(2025, 3, 1, tzinfo=dt.UTC).timestamp()
N = 1200
STEP_S = 0.3  # 1200 requests over 6 minutes: six 1-minute buckets
UNLABELLED = 60  # the last requests have no label yet
MISSING_B, MISSING_A = 8, 5
DEAD = {"timeout": 2, "bad_json": 4}
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
REL = 1e-9


def _pair_rows(experiment: str, n: int, seed: int) -> list[dict]:
    """Pairs rows as the sink writes them (times as epoch seconds); B is the better model."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    sa = np.round(1 / (1 + np.exp(-(1.0 * y + rng.normal(size=n) - 0.5))), 3)
    sb = np.round(1 / (1 + np.exp(-(2.2 * y + 0.7 * rng.normal(size=n) - 1.1))), 3)
    lat_a, lat_b = rng.lognormal(1.6, 0.3, n), rng.lognormal(2.0, 0.3, n)
    delay = rng.uniform(10, 50, n)
    rows = []
    for i in range(n):
        ts = T0 + i * STEP_S
        labelled = i < n - UNLABELLED
        rows.append(
            {
                "experiment": experiment,
                "request_id": f"q{i}",
                "partition": i % 3,
                "status": "paired",
                "task": "binary",
                "model_a": "prod",
                "model_b": "retrained",
                "version_a": "1",
                "version_b": "2",
                "score_a": float(sa[i]),
                "score_b": float(sb[i]),
                "pred_a": int(sa[i] >= 0.5),
                "pred_b": int(sb[i] >= 0.5),
                "label": float(y[i]) if labelled else None,
                "latency_a_ms": float(lat_a[i]),
                "latency_b_ms": float(lat_b[i]),
                "request_ts": ts,
                "paired_ts": ts + 0.04,
                "label_ts": ts + float(delay[i]) if labelled else None,
                "stage": 3 if labelled else 2,
                "worker": "w1",
            }
        )
    for j in range(MISSING_B + MISSING_A):
        side = "b" if j < MISSING_B else "a"
        ts = T0 + j * 25 + 1
        row = dict(rows[(j * 50) % n], request_id=f"m{j}", status=f"missing_{side}", stage=1)
        row.update(label=None, label_ts=None, request_ts=ts, paired_ts=ts + 5)
        row.update({f"score_{side}": None, f"pred_{side}": None, f"latency_{side}_ms": None})
        rows.append(row)
    return rows


def _insert(client, rows: list[dict]) -> None:
    client.insert("pairs", [to_insert_values(r) for r in rows], column_names=PAIR_COLUMNS)


@pytest.fixture(scope="module")
def data(stack):
    """Writes the experiment once; yields (rows, the report as ``abdag report`` builds it)."""
    client = connect(stack)
    ensure_schema(client)
    rows = _pair_rows(EXPERIMENT, N, seed=5)
    _insert(client, rows)
    dead_cols = [c for c, _ in TABLES["dead_letters"].columns]
    when = dt.datetime.fromtimestamp(T0, tz=dt.UTC)
    client.insert(
        "dead_letters",
        [[DAG, "join", reason, when, "", "", n, "", 0, ""] for reason, n in DEAD.items()],
        column_names=dead_cols,
    )
    report = build_report(client, EXPERIMENT).to_dict()
    yield rows, report
    client.close()


@pytest.fixture(scope="module")
def server(stack, data):
    srv = make_server(stack, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def _get(url: str) -> tuple[int, dict | list | str, str]:
    """(status, body, content type); JSON bodies parsed, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            status, raw, ctype = resp.status, resp.read(), resp.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        status, raw, ctype = exc.code, exc.read(), exc.headers["Content-Type"]
    body = json.loads(raw) if ctype.startswith("application/json") else raw.decode()
    return status, body, ctype


# ------------------------------------------------------------------------- JSON
def test_report_endpoint_equals_build_report(server, data):
    rows, report = data
    status, names, _ = _get(server.url + "api/experiments")
    assert status == 200 and EXPERIMENT in names
    status, api, ctype = _get(server.url + f"api/report?experiment={EXPERIMENT}")
    assert status == 200 and ctype.startswith("application/json")
    assert api == json.loads(json.dumps(report))  # every number: metrics, CIs, tests, verdict
    assert api["counts"] == {
        "paired": N,
        "missing_a": MISSING_A,
        "missing_b": MISSING_B,
        "labelled": N - UNLABELLED,
        "dead_letters": sum(DEAD.values()),
        "scored": N - UNLABELLED,
    }
    assert api["verdict"]["label"] == "B better"
    # label delay, coverage and the time to decision beside the verdict (decision_time)
    assert api["time_to_decision"]["status"] == "decided"
    assert api["time_to_decision"]["decision"] == "B better"
    lb = api["labels"]
    assert lb["coverage"] == (N - UNLABELLED) / N and lb["unknown_request_labels"] == 0
    assert 0 < lb["waiting"] <= UNLABELLED  # the newest requests, still waiting for labels
    assert api["metrics"]["roc_auc"]["ci_low"] > 0
    # a margin is passed through to the same function
    status, with_margin, _ = _get(server.url + f"api/report?experiment={EXPERIMENT}&margin=0.05")
    assert status == 200 and with_margin["margin"] == 0.05
    assert with_margin["verdict"]["label"] == "B better"


def test_timeline_endpoint(server, data):
    rows, report = data
    status, tl, _ = _get(server.url + f"api/timeline?experiment={EXPERIMENT}&bucket=60")
    assert status == 200 and tl["bucket_seconds"] == 60 and tl["task"] == "binary"
    buckets = tl["buckets"]
    assert len(buckets) == 6  # 6 minutes of requests
    assert buckets[0]["ts"].startswith("2025-03-01T00:00:00")
    assert [b["paired"] for b in buckets] == [200] * 6
    assert sum(b["missing_a"] for b in buckets) == MISSING_A
    assert sum(b["missing_b"] for b in buckets) == MISSING_B
    assert buckets[-1]["labelled"] == 200 - UNLABELLED and buckets[-1]["coverage"] == 0.7
    last = buckets[-1]
    assert last["cum_labelled"] == report["counts"]["labelled"]
    assert tl["metrics"] == ["accuracy", "precision", "recall", "f1", "roc_auc", "log_loss"]
    # titles and directions come from the metric specs, for the page to show as they are
    assert tl["metric_info"]["log_loss"] == {"label": "Log loss", "higher_is_better": False}
    assert report["metrics"]["roc_auc"]["label"] == tl["metric_info"]["roc_auc"]["label"]
    for name in tl["metrics"]:  # cumulative curves end on the report's numbers
        for m in ("a", "b"):
            assert last[f"{name}_{m}"] == pytest.approx(report["metrics"][name][m], rel=REL)
    assert buckets[0]["roc_auc_b"] > buckets[0]["roc_auc_a"]

    # the confidence sequence per bucket of label arrival ends on the report's test
    labelled = [r for r in rows if r["label"] is not None]
    arrival = sorted({int((r["label_ts"] - T0) // 60) for r in labelled})
    seq = tl["sequential"]
    assert len(seq) == len(arrival)
    s = report["sequential"]
    assert seq[-1]["n"] == s["n"]
    assert (seq[-1]["mean"], seq[-1]["lower"], seq[-1]["upper"]) == pytest.approx(
        (s["mean"], s["lower"], s["upper"]), rel=1e-9
    )

    # whole-experiment figures against numpy on the rows written
    sm = tl["summary"]
    lat_a = np.array([r["latency_a_ms"] for r in rows if r["latency_a_ms"] is not None])
    assert sm["latency_p50_a"] == pytest.approx(np.percentile(lat_a.astype(np.float32), 50))
    lat_b = np.array([r["latency_b_ms"] for r in rows if r["latency_b_ms"] is not None])
    assert sm["latency_p95_b"] == pytest.approx(np.percentile(lat_b.astype(np.float32), 95))
    delays = [r["label_ts"] - r["request_ts"] for r in labelled]
    assert sm["label_delay_p50_s"] == pytest.approx(np.median(delays), abs=2e-3)  # ms storage
    assert sm["label_delay_p90_s"] == pytest.approx(np.percentile(delays, 90), abs=2e-3)
    assert sm["label_delay_p99_s"] == pytest.approx(np.percentile(delays, 99), abs=2e-3)
    assert sm["label_delay_p99_s"] == pytest.approx(report["labels"]["delay_p99_s"], rel=1e-12)
    paired = [r for r in rows if r["status"] == "paired"]
    assert sm["agreement"] == pytest.approx(np.mean([r["pred_a"] == r["pred_b"] for r in paired]))
    mc = report["mcnemar"]
    assert sm["flip_rate"] == pytest.approx((mc["b01"] + mc["b10"]) / len(labelled))
    assert sm["fixed_rate"] == pytest.approx(mc["b01"] / len(labelled))

    # no bucket given: one is picked from the span (6 minutes -> 5 s buckets)
    status, auto, _ = _get(server.url + f"api/timeline?experiment={EXPERIMENT}")
    assert status == 200 and auto["bucket_seconds"] == pick_bucket(N * STEP_S) == 5
    assert sum(b["paired"] for b in auto["buckets"]) == N


def test_report_cache_follows_new_rows(server, stack):
    """A cached report is reused while the rows are unchanged, recomputed when they change."""
    exp = "dashboard_cache.small"
    client = connect(stack)
    try:
        rows = _pair_rows(exp, 150, seed=9)
        _insert(client, rows[:100])
        url = server.url + f"api/report?experiment={exp}"
        first = urllib.request.urlopen(url, timeout=60)
        assert json.loads(first.read())["counts"]["paired"] == 100
        assert first.headers["X-Abdag-Stale"] == "0"
        again = urllib.request.urlopen(url, timeout=60)
        assert again.headers["X-Abdag-Computed-At"] == first.headers["X-Abdag-Computed-At"]
        _insert(client, rows[100:150])
        # answered at once from the cache (maybe stale), recomputed in the background
        deadline = time.monotonic() + 30
        while _get(url)[1]["counts"]["paired"] != 150:
            assert time.monotonic() < deadline, "the report never caught up with new rows"
            time.sleep(0.2)
    finally:
        client.close()


def test_errors_are_json(server, data):
    status, body, ctype = _get(server.url + "api/report?experiment=no.such")
    assert status == 404 and ctype.startswith("application/json")
    assert body == {"error": "unknown experiment: 'no.such'", "status": 404}
    assert _get(server.url + "api/timeline?experiment=no.such")[0] == 404
    status, body, _ = _get(server.url + "api/report")
    assert status == 400 and "experiment" in body["error"]
    status, body, _ = _get(server.url + f"api/timeline?experiment={EXPERIMENT}&bucket=soon")
    assert status == 400 and "bucket" in body["error"]
    status, body, _ = _get(server.url + f"api/report?experiment={EXPERIMENT}&margin=-1")
    assert status == 400
    assert _get(server.url + "api/nothing")[0] == 404
    assert _get(server.url + "static/../server.py")[0] == 404
    assert _get(server.url + "static/%2e%2e/server.py")[0] == 404


def test_clickhouse_down_is_503():
    down = Settings(clickhouse_url=f"http://127.0.0.1:{free_port()}")
    srv = make_server(down, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        status, body, _ = _get(srv.url + "api/experiments")
        assert status == 503
        assert body["error"].startswith(f"ClickHouse unreachable at {down.clickhouse_url}")
        assert _get(srv.url)[0] == 200  # the page still loads and shows the error
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def test_binds_loopback_by_default_and_serves_static_files(server):
    for fn in (make_server, serve):
        assert inspect.signature(fn).parameters["host"].default == "127.0.0.1"
    assert server.server_address[0] == "127.0.0.1"
    status, page, ctype = _get(server.url)
    assert status == 200 and ctype.startswith("text/html")
    assert 'id="verdict"' in page and "/static/vendor/uPlot.iife.min.js" in page
    assert "https://" not in page and "http://" not in page  # nothing from a CDN
    for path in ("app.js", "style.css", "vendor/uPlot.iife.min.js", "vendor/uPlot.min.css"):
        status, body, ctype = _get(server.url + "static/" + path)
        assert status == 200 and len(body) > 1000, path
    assert "javascript" in _get(server.url + "static/app.js")[2]


# ------------------------------------------------------------------------- page
class _Hooks(HTMLParser):
    """Collects the test hooks of the rendered page: ids, data-* attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str | None]] = {}
        self.tiles: dict[str, str | None] = {}
        self.metric_rows: list[str | None] = []
        self.segment_rows: dict[tuple[str | None, str | None], str | None] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.by_id[a["id"]] = a
        if "tile" in (a.get("class") or "").split() and a.get("data-key"):
            self.tiles[a["data-key"]] = a.get("data-value")
        if tag == "tr" and "data-metric" in a:
            self.metric_rows.append(a["data-metric"])
        if tag == "tr" and "data-segment" in a:
            self.segment_rows[(a["data-segment"], a.get("data-seg-metric"))] = a.get("data-flag")


def _chromium(url: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=8000",
        *extra,
        url,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=90, check=True)


def test_page_renders_in_chromium(server, data, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"headless Chromium not installed at {CHROMIUM}")
    rows, report = data
    url = server.url + f"?experiment={EXPERIMENT}&bucket=60"
    dom = _chromium(url, tmp_path, "--dump-dom").stdout
    hooks = _Hooks()
    hooks.feed(dom)
    assert hooks.by_id["verdict"]["data-verdict"] == report["verdict"]["label"] == "B better"
    assert "hidden" in hooks.by_id["error"]  # no error banner
    expected_points = {f"chart-{m}": 6 for m in report["metrics"] if m != "pr_auc"}
    labelled = [r for r in rows if r["label"] is not None]
    arrival_buckets = len({int((r["label_ts"] - T0) // 60) for r in labelled})
    expected_points.update(
        {
            "chart-sequential": arrival_buckets,
            "chart-agreement": 6,
            "chart-latency": 6,
            "chart-traffic": 6,
            "chart-coverage": 6,
            "chart-delay": 6,
        }
    )
    drawn = {k: int(v["data-points"]) for k, v in hooks.by_id.items() if "data-points" in v}
    assert drawn == expected_points
    assert dom.count('class="uplot') == len(expected_points)  # a canvas chart in each
    c = report["counts"]
    assert hooks.by_id["ttd"]["data-status"] == report["time_to_decision"]["status"]
    assert hooks.tiles["unknown_labels"] == "0"
    for key in ("paired", "labelled", "missing_a", "missing_b", "dead_letters"):
        assert hooks.tiles[key] == str(c[key]), key
    assert hooks.metric_rows == list(report["metrics"])

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    _chromium(url, tmp_path, f"--screenshot={shot}", "--window-size=1400,1800")
    head = shot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")) == (1400, 1800)


def test_a_sample_ratio_mismatch_withholds_the_verdict_on_the_page(server, stack, tmp_path):
    """A split experiment whose B served far less than its declared 10%: the API's verdict
    is withheld (the statistical one kept beside it) and the page shows the SRM warning."""
    from abdag.comparators.decisions import stable_share

    exp = "dashboard_srm.split"
    client = connect(stack)
    try:
        rows = _pair_rows(exp, 600, seed=13)
        for i, r in enumerate(rows):  # four in five of B's served answers never went out
            to_b = stable_share(r["request_id"]) < 0.1
            r["served_by"] = "" if to_b and i % 5 else ("b" if to_b else "a")
        _insert(client, rows)
        client.command(
            "INSERT INTO experiments (experiment, updated_ts, dag, comparison, group_size, "
            f"task, mode, split) VALUES ('{exp}', now64(3), 'dashboard_srm', 'split', 1, "
            "'binary', 'split', 0.1)"
        )
    finally:
        client.close()
    status, api, _ = _get(server.url + f"api/report?experiment={exp}")
    assert status == 200 and api["srm"]["fired"] is True
    assert api["verdict"]["label"] == "withheld"
    assert api["verdict"]["reason"] == f"SRM: {api['srm']['summary']}"
    assert api["statistical_verdict"]["label"] == "B better"
    if not Path(CHROMIUM).exists():
        pytest.skip(f"headless Chromium not installed at {CHROMIUM}")
    hooks = _Hooks()
    hooks.feed(_chromium(server.url + f"?experiment={exp}", tmp_path, "--dump-dom").stdout)
    verdict = hooks.by_id["verdict"]
    assert (verdict["data-verdict"], verdict["data-srm"]) == ("withheld", "fired")
    assert "hidden" not in hooks.by_id["srm-warning"]


def test_a_segment_where_b_is_worse_is_called_out_on_the_page(server, stack, tmp_path):
    """B better overall, worse for country=FR: the API's segments name FR, and the page's
    segments table flags FR's rows and shows the warning."""
    exp = "dashboard_seg.ab"
    client = connect(stack)
    try:
        rows = _pair_rows(exp, 1500, seed=19)
        noise = np.random.default_rng(5).normal(0.0, 0.35, len(rows))
        for i, r in enumerate(rows):
            fr = i % 5 == 0
            r["segments"] = {"country": "FR" if fr else "DE"}
            if fr and r["status"] == "paired":  # for FR, B is A's score blurred by noise
                r["score_b"] = round(float(np.clip(r["score_a"] + noise[i], 0.01, 0.99)), 3)
                r["pred_b"] = int(r["score_b"] >= 0.5)
        _insert(client, rows)
    finally:
        client.close()
    status, api, _ = _get(server.url + f"api/report?experiment={exp}")
    assert status == 200 and api["verdict"]["label"] == "B better"
    hidden = {f"{v['segment']}={v['value']}" for v in api["segments"]["b_worse_despite_verdict"]}
    assert hidden == {"country=FR"}
    if not Path(CHROMIUM).exists():
        pytest.skip(f"headless Chromium not installed at {CHROMIUM}")
    hooks = _Hooks()
    hooks.feed(_chromium(server.url + f"?experiment={exp}", tmp_path, "--dump-dom").stdout)
    assert "hidden" not in hooks.by_id["segments-warning"]
    assert hooks.segment_rows[("country=FR", "roc_auc")] == "worse"
    assert hooks.segment_rows[("country=DE", "roc_auc")] in ("better", "none")
