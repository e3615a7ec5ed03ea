"""``abdag watch``: alerts when an experiment's verdict, SRM check or decisions change.

A :class:`Watcher` re-reads each experiment's report (:func:`abdag.comparators.report.
build_report`) every round and compares it with the last state it announced; each change
is an :class:`Alert`:

``verdict_changed``
    the verdict's label changed (``not enough data`` -> ``B better``; ``withheld`` while
    the SRM check fires);
``srm_fired`` / ``srm_cleared``
    the sample-ratio mismatch check of a split experiment started or stopped firing
    (:attr:`abdag.comparators.srm.SrmResult.any_fired`);
``decision``
    a row appeared in ``decisions`` (``abdag promote`` / ``abdag retire``, forced or not).

Every alert is one log line (:meth:`Alert.line`), one row of the ClickHouse table
``alerts`` and, with a webhook URL, one HTTP POST of :meth:`Alert.body` as JSON, sent by a
thread pool (:class:`Webhook`) so a slow or dead receiver never holds up the next round.
A delivery is retried on connection errors, timeouts and 5xx answers after each of
:data:`RETRY_DELAYS` (5 tries over 30 s), each try bounded by :data:`REQUEST_TIMEOUT`;
a 4xx or a redirect is logged and not retried. How it ended (``delivered``,
``attempts``) is written to the event's ``alerts`` row (a ``ReplacingMergeTree`` on
``attempts``: read it ``FINAL``).

The state the watcher compares with is read back from ``alerts`` when it starts (the
newest verdict, SRM and decision event of each experiment), so a restarted watcher does
not announce again what was announced. An experiment no alert mentions counts as
``not enough data``, SRM not firing and no decision: the first watcher to see it announces
its verdict (unless ``not enough data``), a firing SRM check and its newest decision once.

:func:`event_id` is a function of the change alone, so a re-delivered event keeps its id
and a receiver can de-duplicate on it:

>>> event_id("fraud.a_vs_b", "verdict_changed", "not enough data", "B better", "1200/1250")[:16]
'5e6308d4d654f051'
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

__all__ = [
    "KINDS",
    "REQUEST_TIMEOUT",
    "RETRY_DELAYS",
    "Alert",
    "Watcher",
    "Webhook",
    "event_id",
]

KINDS = ("verdict_changed", "srm_fired", "srm_cleared", "decision")
RETRY_DELAYS: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0)
"""Seconds to wait before each retry of a delivery: 5 tries over 30 s."""
REQUEST_TIMEOUT = 10.0
"""Seconds one POST may take (connecting, sending, reading the answer)."""
NOT_ENOUGH = "not enough data"
NO_DECISION = "none"
FIRED, NOT_FIRED = "fired", "not fired"

Log = Callable[[str], None]


def event_id(experiment: str, kind: str, before: str, after: str, mark: str) -> str:
    """sha256 (hex) of the experiment, the kind, ``before``, ``after`` and ``mark``, one
    per line: ``mark`` is ``<labelled pairs>/<paired requests>`` of the report that showed
    the change, or the decision's ``ts`` for a ``decision``."""
    text = "\n".join((experiment, kind, before, after, mark))
    return hashlib.sha256(text.encode()).hexdigest()


def _iso(ts: dt.datetime) -> str:
    """ISO 8601 in UTC to the millisecond, as ClickHouse's DateTime64(3) keeps it (a naive
    value read back from ClickHouse is UTC)."""
    ts = ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)
    return ts.astimezone(dt.UTC).isoformat(timespec="milliseconds")


def _finite(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


@dataclass
class Alert:
    """One change of one experiment: what :meth:`body` posts and :meth:`line` logs."""

    event_id: str
    kind: str
    experiment: str
    ts: dt.datetime
    before: str
    after: str
    message: str
    figures: dict[str, Any] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        """The webhook's JSON body (docs/cli.md, "The webhook's body")."""
        return {
            "event_id": self.event_id,
            "kind": self.kind,
            "experiment": self.experiment,
            "ts": _iso(self.ts),
            "before": self.before,
            "after": self.after,
            "message": self.message,
            "figures": self.figures,
        }

    def line(self) -> str:
        """E.g. ``alert fraud.a_vs_b: verdict changed: not enough data -> B better
        (confidence 0.970, 12,345 labelled pairs)``."""
        return f"alert {self.experiment}: {self.message}"


@dataclass
class _State:
    """What was last announced about one experiment."""

    verdict: str = NOT_ENOUGH
    srm_fired: bool = False
    decision_ts: str | None = None  # ISO ms of the newest decision announced
    decision: str = NO_DECISION  # its action


# --------------------------------------------------------------------------- webhook
class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer (HTTPError 3xx): urllib would turn the POST into a GET."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def check_webhook_url(url: str) -> str:
    """``url`` if it is an http(s) URL with a host; ValueError otherwise (urllib would
    also open ``file:`` and ``ftp:`` URLs)."""
    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"the webhook must be an http:// or https:// URL, got {url!r}")
    return url


@dataclass(frozen=True)
class Outcome:
    """How one delivery ended: ``delivered`` (a 2xx answer) after ``attempts`` tries."""

    alert: Alert
    delivered: bool
    attempts: int
    detail: str


class Webhook:
    """POSTs alerts' bodies to one URL from a thread pool, with retries.

    Each delivery is a task of its own: :meth:`send` returns at once. ``done`` gets the
    :class:`Outcome` of every delivery, from the delivering thread. The URL is never
    logged whole (a webhook URL often carries a token): lines name its host only.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = REQUEST_TIMEOUT,
        retry_delays: Iterable[float] = RETRY_DELAYS,
        log: Log = print,
        done: Callable[[Outcome], None] = lambda o: None,
        workers: int = 4,
    ) -> None:
        self.url = check_webhook_url(url)
        self.host = urlparse(url).netloc.rpartition("@")[2]
        self.timeout = float(timeout)
        self.retry_delays = tuple(float(d) for d in retry_delays)
        self.log = log
        self.done = done
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="abdag-webhook")
        self._stop = threading.Event()
        self._futures: set[Future] = set()
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Deliveries not finished yet."""
        with self._lock:
            return sum(not f.done() for f in self._futures)

    def send(self, alert: Alert) -> Future:
        """Deliver ``alert`` in the background; the future's result is its Outcome."""
        fut = self._pool.submit(self._deliver, alert)
        with self._lock:
            self._futures = {f for f in self._futures if not f.done()} | {fut}
        return fut

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every delivery ended (at most ``timeout`` s); False if some did not."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                left = [f for f in self._futures if not f.done()]
            if not left:
                return True
            wait_s = None if deadline is None else deadline - time.monotonic()
            if wait_s is not None and wait_s <= 0:
                return False
            with contextlib.suppress(Exception):  # a TimeoutError: the loop checks again
                left[0].result(timeout=wait_s)

    def close(self, timeout: float | None = None) -> None:
        """Let running deliveries finish (at most ``timeout`` s), then stop: a delivery
        still retrying then gives up after its current try."""
        if not self.wait(timeout):
            self.log(f"webhook {self.host}: {self.pending} deliveries still running, stopping them")
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _deliver(self, alert: Alert) -> Outcome:
        data = json.dumps(alert.body(), sort_keys=True).encode()  # the same bytes every try
        short = alert.event_id[:12]
        tries = 1 + len(self.retry_delays)
        attempts, detail, delivered = 0, "", False
        for attempt in range(1, tries + 1):
            attempts = attempt
            retry, detail = self._post(data, alert.event_id)
            if retry is None:
                delivered = True
                break
            if not retry:
                self.log(
                    f"webhook {self.host}: event {short} ({alert.kind} {alert.experiment}) "
                    f"refused: {detail}; not retried"
                )
                break
            if attempt == tries or self._stop.is_set():
                self.log(
                    f"webhook {self.host}: event {short} ({alert.kind} {alert.experiment}) "
                    f"not delivered after {attempt} tries: {detail}; giving up"
                )
                break
            delay = self.retry_delays[attempt - 1]
            self.log(
                f"webhook {self.host}: event {short} try {attempt} of {tries} failed: "
                f"{detail}; retrying in {delay:g} s"
            )
            if self._stop.wait(delay):  # closing: one more try, then give up
                continue
        outcome = Outcome(alert, delivered, attempts, detail)
        try:
            self.done(outcome)
        except Exception as exc:  # noqa: BLE001 - never lose the delivery thread's line
            self.log(f"webhook {self.host}: event {short}: cannot record the delivery: {exc}")
        return outcome

    def _post(self, data: bytes, eid: str) -> tuple[bool | None, str]:
        """One try: (None, '') when delivered; (True, why) to retry; (False, why) not to."""
        req = urllib.request.Request(
            self.url,
            data=data,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": "abdag-watch",
                "X-Abdag-Event-Id": eid,
            },
        )
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                resp.read(65536)
                return None, f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            code = exc.code
            exc.close()
            return code >= 500, f"HTTP {code}"
        except (OSError, ValueError) as exc:  # refused, reset, DNS, timeout, bad answer
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError) or isinstance(exc, TimeoutError):
                return True, f"no answer within {self.timeout:g} s"
            return True, f"{type(reason).__name__}: {reason}"


# --------------------------------------------------------------------------- watcher
LAST_ALERTS_SQL = """SELECT experiment, kind, after, body, ts
FROM alerts FINAL
ORDER BY ts DESC, event_id
LIMIT 1 BY experiment, kind"""
"""The newest alert of each experiment and kind: where a starting watcher resumes."""

DECISIONS_SQL = """SELECT experiment, ts, action, served, forced, verdict, confidence, note, {actor}
FROM decisions
WHERE has({{es:Array(String)}}, experiment)
ORDER BY experiment, ts"""
"""Every decision row of the experiments watched, oldest first (``{actor}``: the column
``actor``, who decided, where the schema has it)."""


class Watcher:
    """Rounds of reports over ``experiments`` (every experiment in ``pairs`` when empty;
    a champion-and-challengers group ``<dag>.<name>`` stands for its members), alerts
    for what changed. ``webhook_url``: where to POST them ('' for log lines only);
    ``timeout`` and ``retry_delays`` as :class:`Webhook`'s. Reports are built with
    ``n_resamples`` bootstrap resamples (the intervals in ``figures``; 200, as ``abdag
    promote`` reads the verdict, which does not depend on them)."""

    def __init__(
        self,
        client: Any,
        experiments: Iterable[str] = (),
        *,
        webhook_url: str = "",
        timeout: float = REQUEST_TIMEOUT,
        retry_delays: Iterable[float] = RETRY_DELAYS,
        log: Log = print,
        n_resamples: int = 200,
    ) -> None:
        from abdag.comparators.schema import ensure_schema

        self.client = client
        self.names = list(experiments)
        self.log = log
        self.n_resamples = n_resamples
        self._outcomes: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self.webhook = (
            Webhook(
                webhook_url,
                timeout=timeout,
                retry_delays=retry_delays,
                log=log,
                done=self._outcomes.put,
            )
            if webhook_url
            else None
        )
        self._last_ts: dt.datetime | None = None
        self._unknown_said: set[str] = set()
        ensure_schema(client)
        self.state: dict[str, _State] = self._load_state()

    # -- state ---------------------------------------------------------------------
    def _load_state(self) -> dict[str, _State]:
        state: dict[str, _State] = {}
        srm_ts: dict[str, Any] = {}
        for experiment, kind, after, body, ts in self.client.query(LAST_ALERTS_SQL).result_rows:
            s = state.setdefault(experiment, _State())
            if kind == "verdict_changed":
                s.verdict = after
            elif kind in ("srm_fired", "srm_cleared"):
                if experiment not in srm_ts or ts > srm_ts[experiment]:
                    srm_ts[experiment] = ts
                    s.srm_fired = kind == "srm_fired"
            elif kind == "decision":
                s.decision = after
                try:
                    s.decision_ts = json.loads(body)["figures"]["decision"]["ts"]
                except (ValueError, KeyError, TypeError):
                    s.decision_ts = _iso(ts)
        return state

    # -- a round -------------------------------------------------------------------
    def targets(self) -> list[str]:
        """The experiments this round reads."""
        from abdag.comparators.report import group_members, list_experiments

        known = list_experiments(self.client)
        if not self.names:
            return known
        out: list[str] = []
        for name in self.names:
            members = [name] if name in known else group_members(self.client, name)
            if not members and name not in self._unknown_said:
                self._unknown_said.add(name)
                self.log(f"watch: no experiment or group {name!r} in ClickHouse yet; watching it")
            for m in members or [name]:
                if m not in out:
                    out.append(m)
        return out

    def run_round(self) -> list[Alert]:
        """Read every experiment once; emit and return the alerts of what changed. An
        experiment whose report fails is logged and skipped (the next round tries again)."""
        from abdag.comparators.report import build_report

        self.record_outcomes()
        experiments = self.targets()
        decisions = self._decisions(experiments)
        alerts: list[Alert] = []
        for experiment in experiments:
            try:
                report = build_report(self.client, experiment, n_resamples=self.n_resamples)
            except Exception as exc:  # noqa: BLE001 - one broken experiment stops no round
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                self.log(f"watch {experiment}: cannot read its report: {first}")
                continue
            for alert in self._changes(experiment, report, decisions.get(experiment, [])):
                self._emit(alert)
                alerts.append(alert)
            self._act_on_policy(experiment, report)
        self.record_outcomes()
        return alerts

    def _act_on_policy(self, experiment: str, report: Any) -> None:
        """The comparison's declared policy (``dag.compare(policy=...)``), judged on this
        round's report: an automatic promote / retire (or a dry run's would_*) is a
        decisions row, which the workers follow within seconds and the next round
        announces as a ``decision`` alert."""
        from abdag.comparators.policy import apply, evaluate

        try:
            decision = apply(self.client, evaluate(self.client, experiment, report=report))
        except Exception as exc:  # noqa: BLE001 - a failed policy stops no round
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self.log(f"watch {experiment}: policy not evaluated: {first}")
            return
        if decision is not None:
            self.log(f"policy {experiment}: {decision.action}: {decision.note}")

    def _decisions(self, experiments: list[str]) -> dict[str, list[dict[str, Any]]]:
        from abdag.comparators.schema import columns

        actor = "actor" if "actor" in columns("decisions") else "'' AS actor"
        rows = self.client.query(
            DECISIONS_SQL.format(actor=actor), parameters={"es": experiments}
        ).result_rows
        out: dict[str, list[dict[str, Any]]] = {}
        for e, ts, action, served, forced, verdict, confidence, note, who in rows:
            out.setdefault(e, []).append(
                {
                    "ts": _iso(ts),
                    "action": action,
                    "served": served,
                    "forced": bool(forced),
                    "verdict": verdict,
                    "confidence": _finite(float(confidence)),
                    "note": note,
                    "actor": who,
                }
            )
        return out

    def _changes(self, experiment: str, report: Any, decisions: list[dict[str, Any]]):
        s = self.state.setdefault(experiment, _State())
        figures = _figures(report, decisions[-1] if decisions else None)
        mark = f"{figures['labelled']}/{figures['paired']}"
        new = (
            [d for d in decisions if d["ts"] > s.decision_ts]
            if s.decision_ts is not None
            else decisions[-1:]
        )
        for d in new:  # oldest first
            if d["forced"]:
                why = f"forced, against the verdict {d['verdict']}"
            else:
                why = f"verdict {d['verdict']}, confidence {d['confidence'] or 0:.3f}"
            note = f"; note: {d['note']}" if d["note"] else ""
            by = f" by {d['actor']}" if d["actor"] else ""
            message = f"decision: {d['action']}{by} ({why}{note})"
            at = {**figures, "decision": d}
            yield self._alert(experiment, "decision", s.decision, d["action"], d["ts"], message, at)
            s.decision, s.decision_ts = d["action"], d["ts"]
        srm = report.srm
        fired = srm is not None and srm.any_fired
        if fired != s.srm_fired:
            if fired:
                why = srm.withhold_reason().removeprefix("SRM: ").removeprefix("SRM ")
                kind, message = "srm_fired", f"SRM fired: {why} (verdict withheld)"
            else:
                kind, message = "srm_cleared", f"SRM cleared: {_srm_text(srm)}"
            before, after = (NOT_FIRED, FIRED) if fired else (FIRED, NOT_FIRED)
            yield self._alert(experiment, kind, before, after, mark, message, figures)
            s.srm_fired = fired
        label = report.verdict.label
        if label != s.verdict:
            v = report.verdict
            detail = f"{v.reason};" if label == "withheld" else f"confidence {v.confidence:.3f},"
            message = (
                f"verdict changed: {s.verdict} -> {label} "
                f"({detail} {figures['labelled']:,} labelled pairs)"
            )
            yield self._alert(
                experiment, "verdict_changed", s.verdict, label, mark, message, figures
            )
            s.verdict = label

    def _alert(self, experiment, kind, before, after, mark, message, figures) -> Alert:
        now = dt.datetime.now(dt.UTC)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # DateTime64(3)
        if self._last_ts is not None and now <= self._last_ts:
            now = self._last_ts + dt.timedelta(milliseconds=1)  # newest alert = newest state
        self._last_ts = now
        eid = event_id(experiment, kind, before, after, mark)
        return Alert(eid, kind, experiment, now, before, after, message, figures)

    def _emit(self, alert: Alert) -> None:
        try:
            self._write(alert, delivered=False, attempts=0)
        except Exception as exc:  # noqa: BLE001 - the alert still goes out
            self.log(f"watch {alert.experiment}: cannot record alert {alert.event_id[:12]}: {exc}")
        self.log(alert.line())
        if self.webhook is not None:
            self.webhook.send(alert)

    def _write(self, alert: Alert, *, delivered: bool, attempts: int) -> None:
        from abdag.comparators.schema import columns

        row = {
            "event_id": alert.event_id,
            "experiment": alert.experiment,
            "kind": alert.kind,
            "ts": alert.ts,
            "before": alert.before,
            "after": alert.after,
            "body": json.dumps(alert.body(), sort_keys=True),
            "delivered": int(delivered),
            "attempts": attempts,
        }
        cols = columns("alerts")
        self.client.insert("alerts", [[row[c] for c in cols]], column_names=cols)

    def record_outcomes(self) -> None:
        """Write how finished deliveries ended to their ``alerts`` rows (from this thread:
        the delivering threads never touch ClickHouse)."""
        while True:
            try:
                o = self._outcomes.get_nowait()
            except queue.Empty:
                return
            try:
                self._write(o.alert, delivered=o.delivered, attempts=o.attempts)
            except Exception as exc:  # noqa: BLE001
                self.log(f"watch: cannot record the delivery of {o.alert.event_id[:12]}: {exc}")

    @property
    def pending(self) -> int:
        """Deliveries still running."""
        return self.webhook.pending if self.webhook is not None else 0

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for running deliveries (at most ``timeout`` s) and record how they ended;
        False if some still run."""
        done = self.webhook.wait(timeout) if self.webhook is not None else True
        self.record_outcomes()
        return done

    def close(self, timeout: float | None = None) -> None:
        """Finish (at most ``timeout`` s) or stop the deliveries, and record them."""
        if self.webhook is not None:
            self.webhook.close(timeout)
        self.record_outcomes()


def _srm_text(srm: Any) -> str:
    if srm is None:
        return "no served-split check any more (not a split experiment)"
    if srm.status == "skipped":
        return f"check skipped: {srm.reason}"
    return f"no mismatch: {srm.summary()}"


def _figures(report: Any, decision: dict[str, Any] | None) -> dict[str, Any]:
    """The report's key numbers, JSON-safe (docs/cli.md, "The webhook's body")."""
    d = report.to_dict()
    c = d["counts"]
    seq = d["sequential"] or {}
    srm = d["srm"]
    return {
        "verdict": d["verdict"]["label"],
        "confidence": d["verdict"]["confidence"],
        "reason": d["verdict"]["reason"],
        "statistical_verdict": d["statistical_verdict"]["label"],
        "labelled": int(c.get("labelled", 0)),
        "paired": int(c.get("paired", 0)),
        "missing_a": int(c.get("missing_a", 0)),
        "missing_b": int(c.get("missing_b", 0)),
        "dead_letters": int(c.get("dead_letters", 0)),
        "model_a": d["model_a"],
        "model_b": d["model_b"],
        "version_a": d["version_a"],
        "version_b": d["version_b"],
        "margin": d["margin"],
        "alpha": d["alpha"],
        "loss": d["loss"],
        "sequential": {
            k: seq.get(k) for k in ("n", "mean", "lower", "upper", "pvalue_always_valid")
        }
        if seq
        else None,
        "metrics": {
            name: {k: m[k] for k in ("a", "b", "diff", "ci_low", "ci_high")}
            for name, m in d["metrics"].items()
        },
        "srm": {
            "status": srm["status"],
            "fired": srm["any_fired"],
            "declared": srm["declared"],
            "observed": srm["observed"],
            "served_a": srm["n_a"],
            "served_b": srm["n_b"],
            "not_served": srm["not_served"],
            "pvalue_sequential": srm["pvalue_sequential"],
            "reason": report.srm.withhold_reason() or srm.get("reason") or srm["summary"],
        }
        if srm
        else None,
        "decision": decision,
    }
