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
which is recorded); ``retire`` records that a challenger is out. Decisions are rows in
ClickHouse's ``decisions`` table, which workers poll, so every worker agrees on them.

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
from typing import Any

from abdag.comparators.schema import columns

MODES = ("shadow", "split")
ACCEPTED = ("B better", "B not worse")


class PromotionRefused(RuntimeError):
    """The verdict does not allow promoting B (use force to override, on the record)."""


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


DECISION_COLUMNS = columns("decisions")


def latest_decision(client: Any, experiment: str) -> Decision | None:
    """The newest decision for ``experiment``; None before any."""
    return latest_decisions(client, [experiment]).get(experiment)


def latest_decisions(client: Any, experiments: list[str]) -> dict[str, Decision]:
    """The newest decision of each experiment that has one, in one query (a worker with
    many comparisons polls them all at once)."""
    rows = client.query(
        "SELECT experiment, action, served, forced, verdict, confidence, note FROM decisions "
        "WHERE has({es:Array(String)}, experiment) ORDER BY ts DESC LIMIT 1 BY experiment",
        parameters={"es": list(experiments)},
    ).result_rows
    return {
        e: Decision(e, action, served, bool(forced), verdict, confidence, note)
        for e, action, served, forced, verdict, confidence, note in rows
    }


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
    from datetime import UTC, datetime

    from abdag.comparators.schema import ensure_schema

    ensure_schema(client)
    row = [
        d.experiment,
        datetime.now(UTC),
        d.action,
        d.served,
        int(d.forced),
        d.verdict,
        d.confidence,
        d.note,
    ]
    client.insert("decisions", [row], column_names=DECISION_COLUMNS)


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
