"""Which model serves each request, and the promote / retire decisions that change it.

Traffic modes of a comparison:

- ``shadow``: A and B see every request; the champion's output is the served one.
- ``split``: a stable hash of the request id sends ``split`` of the requests' served answer
  to the challenger. Both models still score every request, so the A/B statistics stay
  paired; only what is served changes.

Mirroring (``dag.compare(mirror=0.1)``, shadow mode only): the challenger scores a stable
``mirror`` share of the requests, chosen by :func:`mirrored`: the same hash with another
salt (:data:`MIRROR_SALT`), so which requests are mirrored does not depend on which are
split. Shares are nested: a request mirrored at 0.1 is mirrored at 0.3 too.

``promote`` makes B the champion once the verdict says B is not worse (or when forced,
which is recorded); ``retire`` records that a challenger is out; :func:`undo` reverses the
newest decision (a ``restore`` row: A serves again, with the declared split, when nothing
came before it). Decisions are rows in ClickHouse's ``decisions`` table, which workers
poll, so every worker agrees on them: the newest row whose action is one of
:data:`ACTIONS` is in force. A policy (:mod:`abdag.comparators.policy`) writes rows too,
with ``actor`` 'policy'; a dry-run policy's ``would_promote`` / ``would_retire`` rows are
not in :data:`ACTIONS`, so no worker acts on them.

>>> served_side("r-1", mode="shadow", split=0.0, promoted=False)
'a'
>>> served_side("r-1", mode="shadow", split=0.0, promoted=True)
'b'
>>> 0.0 <= stable_share("r-1") < 1.0
True
>>> mirrored("r-1", 1.0), stable_share("r-1") == stable_share("r-1", MIRROR_SALT)
(True, False)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from abdag.comparators.schema import columns

MODES = ("shadow", "split")
ACCEPTED = ("B better", "B not worse")
ACTIONS = ("promote", "retire", "restore")
"""The actions that change who serves; a row with any other action (a dry-run policy's
``would_promote``) is a record only: :func:`latest_decisions` and the workers skip it."""
POLICY_ACTOR = "policy"
"""``decisions.actor`` of the rows a policy wrote; a person's (the CLI's) is ''."""


class PromotionRefused(RuntimeError):
    """The verdict does not allow promoting B (use force to override, on the record)."""


class NothingToUndo(RuntimeError):
    """:func:`undo` of an experiment without a decision in force."""


MIRROR_SALT = b"abdag.mirror"
"""The salt of the mirroring hash (:func:`mirrored`); the split's hash has none."""


def stable_share(request_id: str, salt: bytes = b"") -> float:
    """A number in [0, 1) fixed by the request id: the same on every worker and replay.

    ``salt`` (at most 16 bytes) makes another, independent hash: the split uses none,
    mirroring :data:`MIRROR_SALT`."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8, salt=salt).digest()
    return int.from_bytes(digest, "big") / 2**64


def mirrored(request_id: str, mirror: float) -> bool:
    """Whether a challenger with ``dag.compare(mirror=...)`` scores this request: the
    stable ``mirror`` share of request ids (all of them at 1.0)."""
    return mirror >= 1.0 or stable_share(request_id, MIRROR_SALT) < mirror


def served_side(
    request_id: str, *, mode: str, split: float, promoted: bool, retired: bool = False
) -> str:
    """'a' or 'b': who answers this request. A retired challenger answers nothing."""
    champion, challenger = ("b", "a") if promoted else ("a", "b")
    if mode == "split" and not retired and stable_share(request_id) < split:
        return challenger
    return champion


@dataclass(frozen=True)
class Decision:
    experiment: str
    action: str
    served: str
    forced: bool
    verdict: str
    confidence: float
    note: str
    actor: str = ""  # POLICY_ACTOR for a policy's rows
    figures: str = ""  # JSON: the figures a policy saw, or what an undo undid
    ts: datetime | None = None  # when it was recorded (None: now, when writing)


def serving(decision: Decision | None) -> dict[str, bool]:
    """What a decision in force means for :func:`served_side` (and for the workers'
    ``control``): ``{"promoted": ..., "retired": ...}``; both False before any decision
    and after a ``restore``.

    >>> serving(None), serving(Decision("x.ab", "retire", "a", False, "B worse", 0.99, ""))
    ({'promoted': False, 'retired': False}, {'promoted': False, 'retired': True})
    """
    action = decision.action if decision is not None else ""
    return {"promoted": action == "promote", "retired": action == "retire"}


DECISION_COLUMNS = [c for c in columns("decisions") if c not in ("actor", "figures")]
"""The columns every decision row has; schema 10's ``actor`` and ``figures`` read ''
where a writer leaves them out."""

_SELECT = (
    "SELECT experiment, action, served, forced, verdict, confidence, note, actor, figures, ts "
    "FROM decisions WHERE {where} ORDER BY ts DESC"
)


def _decision(row: tuple) -> Decision:
    e, action, served, forced, verdict, confidence, note, actor, figures, ts = row
    if isinstance(ts, datetime) and ts.tzinfo is None:  # a client that gives naive UTC
        ts = ts.replace(tzinfo=UTC)
    return Decision(e, action, served, bool(forced), verdict, confidence, note, actor, figures, ts)


def latest_decision(client: Any, experiment: str) -> Decision | None:
    """The decision in force for ``experiment``; None before any."""
    return latest_decisions(client, [experiment]).get(experiment)


def latest_decisions(client: Any, experiments: list[str]) -> dict[str, Decision]:
    """The decision in force of each experiment that has one (its newest row whose action
    is one of :data:`ACTIONS`), in one query (a worker with many comparisons polls them
    all at once)."""
    where = "has({es:Array(String)}, experiment) AND has({actions:Array(String)}, action)"
    rows = client.query(
        _SELECT.format(where=where) + " LIMIT 1 BY experiment",
        parameters={"es": list(experiments), "actions": list(ACTIONS)},
    ).result_rows
    return {r[0]: _decision(r) for r in rows}


def decision_history(client: Any, experiment: str, limit: int = 1000) -> list[Decision]:
    """Every row of ``experiment`` in ``decisions``, newest first (dry-run rows too)."""
    rows = client.query(
        _SELECT.format(where="experiment = {e:String}") + f" LIMIT {int(limit)}",
        parameters={"e": experiment},
    ).result_rows
    return [_decision(r) for r in rows]


def decide_retirement(
    client: Any, experiment: str, *, force: bool = False, note: str = ""
) -> Decision:
    """Retire challenger B when the verdict says it is worse (or ``force``); record it."""
    from abdag.comparators.report import build_report

    verdict = build_report(client, experiment, n_resamples=200).verdict
    if verdict.label != "B worse" and not force:
        raise PromotionRefused(
            f"not retiring {experiment}: verdict is {verdict.label!r}, not 'B worse'; "
            "pass --force to override (it is recorded)"
        )
    decision = Decision(
        experiment,
        "retire",
        "a",
        force and verdict.label != "B worse",
        verdict.label,
        float(verdict.confidence),
        note,
    )
    _record(client, decision)
    return decision


def _record(client: Any, d: Decision) -> None:
    from abdag.comparators.schema import ensure_schema

    ensure_schema(client)
    row = [
        d.experiment,
        d.ts or datetime.now(UTC),
        d.action,
        d.served,
        int(d.forced),
        d.verdict,
        d.confidence,
        d.note,
        d.actor,
        d.figures,
    ]
    client.insert("decisions", [row], column_names=columns("decisions"))


def after(previous: Decision | None) -> datetime:
    """Now, or 1 ms after ``previous`` if that is later (clocks of two machines, or two
    rows in one millisecond): a row written after another must sort after it."""
    now = datetime.now(UTC)
    ts = previous.ts if previous is not None else None
    if isinstance(ts, datetime):
        now = max(now, ts + timedelta(milliseconds=1))
    return now


def undo(client: Any, experiment: str, *, note: str = "") -> Decision:
    """Reverse the decision in force (a person's or a policy's) and record it: the state
    before it comes back. The decision before it is written again (e.g. ``promote``
    after a policy retired a promoted B), or, when there was none, a ``restore`` row: A
    serves, and B its declared split. ``figures`` says what was undone; the row is a
    person's (``actor`` ''), so a policy takes no further action on the experiment. An
    undo is a decision too: a second undo reverses the first. Raises
    :class:`NothingToUndo` when no decision is in force."""
    import json

    from abdag.comparators.report import build_report

    history = [d for d in decision_history(client, experiment) if d.action in ACTIONS]
    if not history:
        raise NothingToUndo(f"nothing to undo: {experiment} has no decision in force")
    last = history[0]
    before = history[1] if len(history) > 1 else None
    action, served = (
        (before.action, before.served)
        if before is not None and before.action != "restore"
        else ("restore", "a")
    )
    verdict = build_report(client, experiment, n_resamples=200).verdict
    who = "a policy" if last.actor == POLICY_ACTOR else "a person"
    when = last.ts.isoformat() if isinstance(last.ts, datetime) else ""
    undone = {"action": last.action, "ts": when, "actor": last.actor, "note": last.note}
    decision = Decision(
        experiment,
        action,
        served,
        False,
        verdict.label,
        float(verdict.confidence),
        f"undo of {last.action} by {who}" + (f": {note}" if note else ""),
        "",
        json.dumps({"undoes": undone}, sort_keys=True),
        after(last),
    )
    _record(client, decision)
    return decision


def decide_promotion(
    client: Any,
    experiment: str,
    *,
    force: bool = False,
    margin: float | None = None,
    note: str = "",
) -> Decision:
    """Promote B if the report's verdict allows it (or ``force``); record the decision."""
    from abdag.comparators.report import build_report

    kwargs = {"margin": margin} if margin is not None else {}
    report = build_report(client, experiment, n_resamples=200, **kwargs)
    verdict = report.verdict
    if verdict.label not in ACCEPTED and not force:
        raise PromotionRefused(
            f"not promoting {experiment}: verdict is {verdict.label!r} ({verdict.reason}); "
            "pass --force to override (it is recorded)"
        )
    decision = Decision(
        experiment,
        "promote",
        "b",
        force and verdict.label not in ACCEPTED,
        verdict.label,
        float(verdict.confidence),
        note,
    )
    _record(client, decision)
    return decision
