"""Policies: when a challenger is promoted, or pulled back, with no one typing a command.

``dag.compare(..., policy=Policy(...))`` declares one; the worker records it in the
comparison's ``experiments`` row (column ``policy``, :meth:`Policy.to_json`), so that any
process can act on it. :func:`evaluate` reads the declared policy, the experiment's report
(:func:`abdag.comparators.report.build_report`) and its guardrail figures (SQL over
``pairs FINAL`` and ``dead_letters``) and says what to do: a :class:`PolicyAction`, or
None. :func:`apply` records the action in ``decisions`` (``actor`` 'policy', the reason in
``note``, the figures seen in ``figures`` as JSON), where every worker takes it up within
seconds. ``abdag watch`` calls both once per round; nothing here loops.

What is evaluated, in order:

1. nothing while a person's decision is in force (``abdag promote`` / ``retire``, or an
   :func:`abdag.comparators.decisions.undo`): a policy never overrides a person;
   nothing once B is retired;
2. **pull B back** (a ``retire``: B serves nothing, A everything, also after a promotion)
   when ``rollback_on_worse`` and the verdict is ``B worse``, or when a guardrail trips
   (once B has ``min_requests`` requests): B's dead letters over B's requests above
   ``max_dead_letter_rate``, the p99 of ``latency_b_ms`` above ``max_latency_p99_ms``,
   ``missing_b`` over the requests above ``max_missing_b_rate``. The guardrails do not
   depend on the served split, so they act while the SRM check fires; the verdict does
   not (it is ``withheld`` then);
3. **promote B**, before any decision, when the verdict is one of ``promote_on`` over at
   least ``min_pairs`` labelled pairs and has been one of them at every evaluation for
   ``min_minutes`` (on the clock ``now`` passed in; since when is kept in the table
   ``policy_state``, so a restarted evaluator goes on counting). A fired SRM check withholds
   the verdict, which then is none of ``promote_on``: the count starts again once it stops.
   Not when another challenger of the same group is promoted.

A ``dry_run`` policy records what it would do (``would_promote``, ``would_retire``), which
no worker acts on (:data:`abdag.comparators.decisions.ACTIONS`), and goes on as if it had
done it. Evaluating again in the same state gives None: the decision in force (or the dry
run's last row) already says so.

>>> p = Policy(promote_on=("B better",), min_pairs=500, max_latency_p99_ms=250)
>>> Policy.from_json(p.to_json()) == p, p.problems()
(True, [])
>>> Policy(promote_on="B better").problems()  # doctest: +ELLIPSIS
["promote_on must be a tuple of verdicts, e.g. promote_on=('B better',), got the string ..."]
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from abdag.comparators.decisions import (
    ACCEPTED,
    ACTIONS,
    POLICY_ACTOR,
    Decision,
    _record,
    after,
    decision_history,
    latest_decisions,
)
from abdag.comparators.schema import DEAD_LETTER_COUNT, PAIRS_DEDUP, columns

__all__ = [
    "B_DEAD_LETTERS_SQL",
    "GUARDRAILS_SQL",
    "Policy",
    "PolicyAction",
    "apply",
    "evaluate",
    "held_state",
]


@dataclass(frozen=True)
class Policy:
    """What a policy does with a comparison's challenger (``dag.compare(policy=...)``).

    ``promote_on``: the verdicts that promote B, ``("B better",)`` or ``("B better", "B not
    worse")``; empty: never promote. The verdict must have held at every evaluation for
    ``min_minutes`` minutes and counted at least ``min_pairs`` labelled pairs.
    ``rollback_on_worse``: retire B when the verdict is ``B worse``. Guardrails, each None
    (off) or a bound that retires B when exceeded, checked once the experiment has
    ``min_requests`` requests: ``max_dead_letter_rate`` (B's model node's dead letters
    over B's requests, in [0, 1]), ``max_latency_p99_ms`` (the p99 of B's latency, ms),
    ``max_missing_b_rate`` (``missing_b`` requests over all, in [0, 1]). ``dry_run``:
    record ``would_promote`` / ``would_retire`` only."""

    promote_on: tuple[str, ...] = ()
    min_pairs: int = 1000
    min_minutes: float = 60.0
    rollback_on_worse: bool = True
    max_dead_letter_rate: float | None = None
    max_latency_p99_ms: float | None = None
    max_missing_b_rate: float | None = None
    min_requests: int = 100
    dry_run: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.promote_on, list):  # JSON gives a list; a tuple is hashable
            object.__setattr__(self, "promote_on", tuple(self.promote_on))

    def problems(self) -> list[str]:
        """What is wrong with it, in words (empty when nothing is)."""
        out: list[str] = []
        on = self.promote_on
        if isinstance(on, str):
            out.append(
                f"promote_on must be a tuple of verdicts, e.g. promote_on=({on!r},), got the "
                f"string {on!r}"
            )
        elif not isinstance(on, tuple):
            out.append(f"promote_on must be a tuple of verdicts, got {type(on).__name__}")
        else:
            bad = [v for v in on if v not in ACCEPTED]
            if bad:
                out.append(f"promote_on may name {ACCEPTED}, not {bad}")
        for name, least in (("min_pairs", 0), ("min_requests", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                out.append(f"{name} must be an integer >= {least}, got {v!r}")
        if not _number(self.min_minutes) or self.min_minutes < 0:
            out.append(f"min_minutes must be a number >= 0, got {self.min_minutes!r}")
        for name in ("rollback_on_worse", "dry_run"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("max_dead_letter_rate", "max_missing_b_rate"):
            v = getattr(self, name)
            if v is not None and not (_number(v) and 0.0 <= v <= 1.0):
                out.append(f"{name} must be None or a rate in [0, 1], got {v!r}")
        v = self.max_latency_p99_ms
        if v is not None and not (_number(v) and v > 0):
            out.append(f"max_latency_p99_ms must be None or milliseconds > 0, got {v!r}")
        if not out and not (self.promote_on or self.rollback_on_worse or self.guardrails()):
            out.append(
                "it does nothing: set promote_on, rollback_on_worse=True or a max_* guardrail"
            )
        return out

    def guardrails(self) -> dict[str, float]:
        """The guardrails set: name -> bound."""
        names = ("max_dead_letter_rate", "max_latency_p99_ms", "max_missing_b_rate")
        return {n: float(getattr(self, n)) for n in names if getattr(self, n) is not None}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["promote_on"] = list(self.promote_on)
        return d

    def to_json(self) -> str:
        """What the ``experiments`` row's ``policy`` holds (sorted keys)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Policy | None:
        """The policy of an ``experiments`` row; None for ''. Keys this version does not
        know (a newer writer's) are left out."""
        if not text:
            return None
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class PolicyAction:
    """What :func:`evaluate` decided: ``action`` 'promote' | 'retire' (or 'would_promote'
    | 'would_retire' in a dry run), the side ``served`` after it (unchanged in a dry
    run), why (``reason``), the verdict and the ``figures`` it saw."""

    experiment: str
    action: str
    served: str
    reason: str
    verdict: str
    confidence: float
    figures: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False

    def decision(self, ts: datetime | None = None) -> Decision:
        """The ``decisions`` row it makes: actor 'policy', note ``policy: <reason>``."""
        return Decision(
            self.experiment,
            self.action,
            self.served,
            False,
            self.verdict,
            float(self.confidence),
            f"policy: {self.reason}",
            POLICY_ACTOR,
            json.dumps(_json_safe(self.figures), sort_keys=True, allow_nan=False),
            ts,
        )


GUARDRAILS_SQL = f"""SELECT
    count() AS requests,
    countIf(status = 'missing_b') AS missing_b,
    count(latency_b_ms) AS latency_n,
    quantileExactInclusive(0.99)(latency_b_ms) AS latency_b_p99_ms
FROM {PAIRS_DEDUP}
WHERE experiment = {{experiment:String}}"""
"""The experiment's requests (every pair row: paired, ``missing_a``, ``missing_b``), its
``missing_b``, and the p99 of B's latency over the rows that have one (numpy's
``method='linear'``)."""

B_DEAD_LETTERS_SQL = f"""SELECT {DEAD_LETTER_COUNT} AS n
FROM dead_letters
WHERE dag = {{dag:String}} AND node = {{node:String}}"""
"""The dead letters of B's model node (a re-delivered record counts once)."""

HELD_SQL = """SELECT verdict, held_since FROM policy_state
WHERE experiment = {experiment:String}
ORDER BY updated_ts DESC
LIMIT 1"""


def held_state(client: Any, experiment: str) -> tuple[str, datetime | None]:
    """The ``promote_on`` verdict a policy last saw holding and since when (policy
    clock); ``('', None)`` when none holds."""
    rows = client.query(HELD_SQL, parameters={"experiment": experiment}).result_rows
    if not rows:
        return "", None
    verdict, since = rows[0]
    return verdict, _aware(since) if since is not None else None


def _write_held(client: Any, experiment: str, verdict: str, since: datetime | None) -> None:
    row = [experiment, datetime.now(UTC), verdict, since]
    client.insert("policy_state", [row], column_names=columns("policy_state"))


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _clock(now: datetime | float | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if isinstance(now, int | float):
        return datetime.fromtimestamp(now, UTC)
    return _aware(now)


def guardrail_figures(client: Any, experiment: str, declared: dict[str, Any]) -> dict[str, Any]:
    """The figures the guardrails compare with their bounds (keys as in ``figures``)."""
    res = client.query(GUARDRAILS_SQL, parameters={"experiment": experiment})
    g = dict(zip(res.column_names, res.result_rows[0], strict=True)) if res.result_rows else {}
    requests = int(g.get("requests") or 0)
    missing_b = int(g.get("missing_b") or 0)
    p99 = g.get("latency_b_p99_ms")
    node = str(declared.get("model_b") or "")
    dag = str(declared.get("dag") or experiment.split(".", 1)[0])
    if node:  # B's model node, named in the experiments row
        params = {"dag": dag, "node": node}
        dead = int(client.query(B_DEAD_LETTERS_SQL, parameters=params).result_rows[0][0] or 0)
        dead_of = f"node {node} of DAG {dag}"
    else:  # no node known: the whole DAG's dead letters
        sql = f"SELECT {DEAD_LETTER_COUNT} FROM dead_letters WHERE dag = {{dag:String}}"
        dead = int(client.query(sql, parameters={"dag": dag}).result_rows[0][0] or 0)
        dead_of = f"DAG {dag}"
    return {
        "requests": requests,
        "missing_b": missing_b,
        "missing_b_rate": missing_b / requests if requests else None,
        "latency_n": int(g.get("latency_n") or 0),
        "latency_b_p99_ms": None if p99 is None or math.isnan(p99) else float(p99),
        "dead_letters_b": dead,
        "dead_letters_of": dead_of,
        "dead_letter_rate": dead / requests if requests else None,
    }


_GUARDS = (  # policy field, figure, how to say it
    ("max_dead_letter_rate", "dead_letter_rate", "B's dead-letter rate"),
    ("max_latency_p99_ms", "latency_b_p99_ms", "B's latency p99 (ms)"),
    ("max_missing_b_rate", "missing_b_rate", "the missing-B rate"),
)


def evaluate(
    client: Any,
    experiment: str,
    now: datetime | float | None = None,
    *,
    report: Any = None,
) -> PolicyAction | None:
    """What the experiment's declared policy does now (see the module), or None: no
    policy, a person's decision in force, B already retired, or nothing to do. ``now``:
    the policy's clock (a datetime, or seconds since the epoch; default the current
    time), which ``min_minutes`` is counted on. ``report``: the experiment's report when
    the caller already built it (e.g. ``abdag watch``), else one is built. Updates
    ``policy_state`` (since when the ``promote_on`` verdict holds); decides nothing in
    ``decisions``: :func:`apply` records the action."""
    from abdag.comparators.report import build_report, experiment_settings

    declared = experiment_settings(client, experiment)
    policy = Policy.from_json(str(declared.get("policy") or ""))
    if policy is None:
        return None
    clock = _clock(now)
    history = decision_history(client, experiment)
    in_force = next((d for d in history if d.action in ACTIONS), None)
    if in_force is not None and in_force.actor != POLICY_ACTOR:
        return None  # a person decided: the policy stands down
    if policy.dry_run:  # as if its own rows, would_* too, had been acted on
        own = next((d for d in history if d.actor == POLICY_ACTOR), None)
        state = own.action.removeprefix("would_") if own is not None else ""
    else:
        state = in_force.action if in_force is not None else ""
    if state == "retire":
        return None  # B is out: nothing left to do
    if report is None:
        report = build_report(client, experiment, n_resamples=200)
    verdict = report.verdict
    srm_fired = bool(report.srm is not None and report.srm.any_fired)
    labelled = int(report.counts.get("scored", report.counts.get("labelled", 0)))
    holding = verdict.label in policy.promote_on and not srm_fired
    _, since = held_state(client, experiment)
    if holding and since is None:
        since = clock
        _write_held(client, experiment, verdict.label, since)
    elif not holding and since is not None:
        since = None
        _write_held(client, experiment, "", None)
    held_minutes = max(0.0, (clock - since).total_seconds() / 60) if since is not None else None
    figures: dict[str, Any] = {
        "verdict": verdict.label,
        "confidence": float(verdict.confidence),
        "statistical_verdict": (report.statistical_verdict or verdict).label,
        "srm_fired": srm_fired,
        "srm": report.srm.withhold_reason() if srm_fired else None,
        "labelled": labelled,
        **guardrail_figures(client, experiment, declared),
        "held_since": since.isoformat() if since is not None else None,
        "held_minutes": held_minutes,
        "now": clock.isoformat(),
        "in_force": in_force.action if in_force is not None else None,
        "policy": policy.to_dict(),
    }

    def act(action: str, reason: str) -> PolicyAction:
        served = "b" if action == "promote" else "a"
        if policy.dry_run:
            action, served = f"would_{action}", (in_force.served if in_force else "a")
        return PolicyAction(
            experiment,
            action,
            served,
            reason,
            verdict.label,
            float(verdict.confidence),
            figures,
            policy.dry_run,
        )

    why = []
    if policy.rollback_on_worse and verdict.label == "B worse":
        why.append(f"verdict 'B worse' (confidence {verdict.confidence:.3f})")
    if figures["requests"] >= policy.min_requests:
        for name, key, words in _GUARDS:
            bound, value = getattr(policy, name), figures[key]
            if bound is not None and value is not None and value > bound:
                why.append(f"{words} {value:.4g} > {name} {bound:g}")
    if why:
        return act("retire", "; ".join(why))
    if state == "promote" or not holding or since is None:
        return None
    if labelled < policy.min_pairs or (held_minutes or 0.0) < policy.min_minutes:
        return None
    if _group_promoted(client, experiment, declared):
        return None  # one champion at a time: another challenger of the group serves
    return act(
        "promote",
        f"verdict {verdict.label!r} (confidence {verdict.confidence:.3f}) held for "
        f"{held_minutes:.1f} min (min_minutes {policy.min_minutes:g}) over {labelled} "
        f"labelled pairs (min_pairs {policy.min_pairs})",
    )


def _group_promoted(client: Any, experiment: str, declared: dict[str, Any]) -> bool:
    """Whether another challenger of the experiment's group has a promotion in force."""
    from abdag.comparators.report import group_members

    group = str(declared.get("grp") or "")
    if not group:
        return False
    dag = str(declared.get("dag") or experiment.split(".", 1)[0])
    others = [e for e in group_members(client, f"{dag}.{group}") if e != experiment]
    in_force = latest_decisions(client, others) if others else {}
    return any(d.action == "promote" for d in in_force.values())


def apply(client: Any, action: PolicyAction | None) -> Decision | None:
    """Record ``action`` in ``decisions`` (after the newest row, so it sorts last) and
    return the row; None, writing nothing, when there is no action, when a person's
    decision came in force since it was evaluated, or when the decision in force (for a
    dry run: the policy's newest row) already says it."""
    if action is None:
        return None
    history = decision_history(client, action.experiment)
    in_force = next((d for d in history if d.action in ACTIONS), None)
    if in_force is not None and in_force.actor != POLICY_ACTOR:
        return None  # a person decided meanwhile: never override them
    if action.action in ACTIONS:
        same = in_force
    else:
        same = next((d for d in history if d.actor == POLICY_ACTOR), None)
    if same is not None and same.action == action.action:
        return None
    decision = action.decision(after(history[0] if history else None))
    _record(client, decision)
    return decision


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item"):  # numpy scalars
        return _json_safe(x.item())
    return x
