"""`abdag watch`: alerts for verdict, SRM and decision changes, posted to a webhook.

Rounds run in-process (:class:`abdag.watch.Watcher`, what the command calls) on the real
ClickHouse engine (chdb, the module's ``client``), against a webhook receiver on
127.0.0.1 (``http.server`` on port 0 in a thread, stopped at the end of each test). No
Kafka: the pairs rows are inserted as tests/test_report.py does. Each test has its own
experiments, names passed to the watcher, so the module's tests do not see each other's.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from abdag import cli
from abdag.comparators.decisions import decide_promotion
from abdag.watch import Watcher, event_id
from tests.test_report import COLS, _binary_data, _rows
from tests.test_srm import _declare, _split_rows

FAST = (0.05, 0.1, 0.2, 0.4)  # the retry schedule, shrunk: 5 tries
BODY_KEYS = {"event_id", "kind", "experiment", "ts", "before", "after", "message", "figures"}


class Receiver:
    """A webhook receiver on 127.0.0.1: answers the n-th POST with ``statuses[n]`` (200
    once they run out); with ``hold``, holds every request up to that many seconds
    before answering (released at the end)."""

    def __init__(self, statuses: tuple[int, ...] = (), hold: float = 0.0) -> None:
        self.statuses = list(statuses)
        self.hold = hold
        self.release = threading.Event()
        self.posts: list[tuple[str, dict]] = []  # (X-Abdag-Event-Id, body)
        lock = threading.Lock()
        rx = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                data = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    rx.posts.append((self.headers["X-Abdag-Event-Id"], json.loads(data)))
                    status = rx.statuses.pop(0) if rx.statuses else 200
                if rx.hold:
                    rx.release.wait(rx.hold)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the watcher gave up on this one already

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=secret"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    @property
    def bodies(self) -> list[dict]:
        return [b for _, b in self.posts]


def _insert_pairs(client, experiment: str, n: int, start: int = 0, total: int = 3000) -> None:
    """Rows ``start`` to ``start + n`` of a binary experiment where B is better."""
    y, sa, sb, pa, pb = (x[start : start + n] for x in _binary_data(total))
    client.insert("pairs", _rows(experiment, "binary", y, sa, sb, pa, pb, start=start), COLS)


def _watcher(client, experiments, rx: Receiver | None = None, lines=None, **kw) -> Watcher:
    kw.setdefault("retry_delays", FAST)
    kw.setdefault("timeout", 5.0)
    return Watcher(
        client,
        experiments,
        webhook_url=rx.url if rx else "",
        log=(lines if lines is not None else []).append,
        n_resamples=200,
        **kw,
    )


def _alert_rows(client, experiment: str) -> list[dict]:
    res = client.query(
        "SELECT * FROM alerts FINAL WHERE experiment = {e:String} ORDER BY ts",
        parameters={"e": experiment},
    )
    return [dict(zip(res.column_names, r, strict=True)) for r in res.result_rows]


@pytest.mark.timeout(120)
def test_a_verdict_change_posts_one_event_with_the_documented_body_and_then_nothing(client):
    exp = "watch.verdict"
    _insert_pairs(client, exp, 100)  # 100 labelled pairs: not enough data
    lines: list[str] = []
    with Receiver() as rx:
        w = _watcher(client, [exp], rx, lines)
        try:
            assert w.run_round() == []
            _insert_pairs(client, exp, 2900, start=100)
            (alert,) = w.run_round()
            assert w.flush(30)
            assert len(rx.posts) == 1
            header_id, body = rx.posts[0]
            assert set(body) == BODY_KEYS and header_id == body["event_id"] == alert.event_id
            assert (body["kind"], body["experiment"]) == ("verdict_changed", exp)
            assert (body["before"], body["after"]) == ("not enough data", "B better")
            f = body["figures"]
            assert (f["verdict"], f["labelled"], f["paired"]) == ("B better", 3000, 3000)
            assert f["confidence"] > 0.95 and f["srm"] is None and f["decision"] is None
            assert f["metrics"]["roc_auc"]["ci_low"] > 0 and f["sequential"]["n"] == 3000
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", body["ts"])
            # the id is the documented function of the change and the labelled/paired count
            assert body["event_id"] == event_id(
                exp, "verdict_changed", "not enough data", "B better", "3000/3000"
            )
            line = (
                f"alert {exp}: verdict changed: not enough data -> B better "
                f"(confidence {f['confidence']:.3f}, 3,000 labelled pairs)"
            )
            assert line in lines and body["message"] == line.removeprefix(f"alert {exp}: ")
            assert not any("secret" in x for x in lines)  # the URL's token is never logged
            (row,) = _alert_rows(client, exp)
            assert (row["kind"], row["delivered"], row["attempts"]) == ("verdict_changed", 1, 1)
            assert json.loads(row["body"]) == body and row["event_id"] == body["event_id"]

            assert w.run_round() == []  # no change, no event
            assert w.flush(30) and len(rx.posts) == 1
        finally:
            w.close(10)


@pytest.mark.timeout(120)
def test_a_restarted_watcher_announces_nothing_old_but_what_changes_after(client):
    exp = "watch.restart"
    _insert_pairs(client, exp, 3000)
    with Receiver() as rx:
        first = _watcher(client, [exp], rx)
        assert [a.kind for a in first.run_round()] == ["verdict_changed"]
        first.close(30)
        assert len(rx.posts) == 1

        lines: list[str] = []
        again = _watcher(client, [exp], rx, lines)  # a new process: state read from alerts
        try:
            assert again.run_round() == []
            assert again.flush(30) and len(rx.posts) == 1 and lines == []
            decide_promotion(client, exp, note="after the restart")  # a new change is said
            (alert,) = again.run_round()
            assert (alert.kind, alert.before, alert.after) == ("decision", "none", "promote")
            assert again.flush(30) and len(rx.posts) == 2
        finally:
            again.close(10)
        third = _watcher(client, [exp], rx)
        assert third.run_round() == []
        third.close(10)
    assert len(rx.posts) == 2


@pytest.mark.timeout(60)
def test_5xx_answers_are_retried_with_the_same_event_id_until_delivered(client):
    exp = "watch.retry"
    _insert_pairs(client, exp, 20)
    decide_promotion(client, exp, force=True, note="canary")
    lines: list[str] = []
    with Receiver(statuses=(500, 500)) as rx:
        w = _watcher(client, [exp], rx, lines)
        (alert,) = w.run_round()
        assert w.flush(30)
        w.close(10)
    assert [i for i, _ in rx.posts] == [alert.event_id] * 3
    assert rx.bodies[0] == rx.bodies[1] == rx.bodies[2]
    (row,) = _alert_rows(client, exp)
    assert (row["delivered"], row["attempts"]) == (1, 3)
    assert sum("failed: HTTP 500; retrying in" in x for x in lines) == 2


@pytest.mark.timeout(60)
def test_a_4xx_answer_is_logged_and_not_retried(client):
    exp = "watch.refused"
    _insert_pairs(client, exp, 20)
    decide_promotion(client, exp, force=True)
    lines: list[str] = []
    with Receiver(statuses=(404,)) as rx:
        w = _watcher(client, [exp], rx, lines)
        (alert,) = w.run_round()
        assert w.flush(30)
        w.close(10)
    assert len(rx.posts) == 1
    (row,) = _alert_rows(client, exp)
    assert (row["delivered"], row["attempts"]) == (0, 1)
    assert any(f"event {alert.event_id[:12]}" in x and "HTTP 404; not retried" in x for x in lines)


@pytest.mark.timeout(60)
def test_a_receiver_that_never_answers_does_not_block_the_rounds(client):
    exp = "watch.slow"
    _insert_pairs(client, exp, 20)
    decide_promotion(client, exp, force=True)
    lines: list[str] = []
    timeout = 5.0
    with Receiver(hold=60) as rx:
        w = _watcher(client, [exp], rx, lines, timeout=timeout, retry_delays=())
        try:
            t0 = time.monotonic()
            (alert,) = w.run_round()
            assert time.monotonic() - t0 < timeout and w.pending == 1  # still waiting
            decide_promotion(client, exp, force=True, note="again")
            t0 = time.monotonic()
            (again,) = w.run_round()  # the next round is not held up either
            assert time.monotonic() - t0 < timeout and again.kind == "decision"
            assert w.flush(30)  # each gave up after its one try's timeout
        finally:
            w.close(10)
    rows = {r["event_id"]: r for r in _alert_rows(client, exp)}
    assert {(r["delivered"], r["attempts"]) for r in rows.values()} == {(0, 1)}
    assert set(rows) == {alert.event_id, again.event_id}
    assert sum(f"no answer within {timeout:g} s; giving up" in x for x in lines) == 2


@pytest.mark.timeout(120)
def test_an_srm_firing_posts_srm_fired_and_a_decision_clears_it(client):
    exp = "watch.canary"
    _declare(client, exp, "split", 0.1)
    client.insert("pairs", _split_rows(exp, b_lost=1.0, n=600), column_names=COLS)
    lines: list[str] = []
    with Receiver() as rx:
        w = _watcher(client, [exp], rx, lines)
        try:
            alerts = {a.kind: a for a in w.run_round()}
            assert set(alerts) == {"srm_fired", "verdict_changed"}  # the verdict is withheld
            assert w.flush(30)
            fired = next(b for b in rx.bodies if b["kind"] == "srm_fired")
            assert (fired["before"], fired["after"]) == ("not fired", "fired")
            srm = fired["figures"]["srm"]
            assert srm["fired"] and srm["status"] == "fired" and srm["served_b"] == 0
            assert fired["figures"]["verdict"] == "withheld"
            assert alerts["verdict_changed"].after == "withheld"
            assert any(x.startswith(f"alert {exp}: SRM fired: served 0.0% to B") for x in lines)

            decide_promotion(client, exp, force=True)  # the declared split no longer holds
            kinds = [a.kind for a in w.run_round()]
            assert kinds[:2] == ["decision", "srm_cleared"]
            assert w.flush(30)
            cleared = next(b for b in rx.bodies if b["kind"] == "srm_cleared")
            assert (cleared["before"], cleared["after"]) == ("fired", "not fired")
            assert "promoted" in cleared["message"]
        finally:
            w.close(10)


@pytest.mark.timeout(60)
def test_a_decision_row_posts_decision(client):
    exp = "watch.decided"
    _insert_pairs(client, exp, 20)
    with Receiver() as rx:
        w = _watcher(client, [exp], rx)
        try:
            assert w.run_round() == []
            d = decide_promotion(client, exp, force=True, note="ship it")
            (alert,) = w.run_round()
            assert w.flush(30)
        finally:
            w.close(10)
    (body,) = rx.bodies
    assert (body["kind"], body["before"], body["after"]) == ("decision", "none", "promote")
    dec = body["figures"]["decision"]
    assert dec["forced"] and dec["note"] == "ship it" and dec["verdict"] == d.verdict
    assert body["event_id"] == event_id(exp, "decision", "none", "promote", dec["ts"])
    assert body["message"] == (
        "decision: promote (forced, against the verdict not enough data; note: ship it)"
    )


@pytest.mark.timeout(120)
def test_the_command_runs_one_round_with_once_and_reads_the_webhook_setting(
    client, monkeypatch, capsys
):
    exp = "watch.cli"
    _insert_pairs(client, exp, 20)
    decide_promotion(client, exp, force=True)
    store = ["--clickhouse-url", f"chdb://{client.path}", "--database", "test_watch"]
    with Receiver() as rx:
        monkeypatch.setenv("ABDAG_WEBHOOK_URL", rx.url)
        assert cli.main([*store, "watch", exp, "--once", "--every", "1"]) == 0
    out = capsys.readouterr().out
    assert f"alert {exp}: decision: promote (forced" in out
    assert [b["kind"] for b in rx.bodies] == ["decision"]
    assert _alert_rows(client, exp)[0]["delivered"] == 1
    assert cli.main([*store, "watch", exp, "--once", "--webhook", "file:///etc/passwd"]) == 2
    assert "the webhook must be an http:// or https:// URL" in capsys.readouterr().err
