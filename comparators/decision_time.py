"""How many more labelled pairs a verdict needs, and when they are expected to be in.

Plain math on numbers the report reads (no Faust, no Kafka, no ClickHouse).

**Which decision.** The verdict (:mod:`abdag.comparators.verdict`) is reached when the
always-valid confidence sequence ``[lower, upper]`` on the mean of ``d = loss_a - loss_b``
(positive: B better) leaves a boundary:

| decision | condition | boundary |
| --- | --- | --- |
| ``B better`` | ``lower > 0`` | 0 |
| ``B not worse`` | ``lower > -margin`` | -margin |
| ``B worse`` | ``upper < -margin`` | -margin |

With the current mean ``m`` only some are reachable (:func:`reachable`): ``m > 0``: first
``B not worse`` (when ``margin > 0``; its boundary is farther from ``m``, so it comes
first), then ``B better``; ``-margin < m <= 0``: ``B not worse`` only (``lower > 0`` needs
``m > 0``); ``m < -margin``: ``B worse``; ``m = -margin`` (or ``m = 0`` with no margin):
none, "no decision expected at this effect size" (:func:`pairs_needed` gives the n for a
stated effect instead).

**How many pairs.** At ``t`` labelled pairs the sequence is ``mean_t +- h(t)`` with
``h(t) = sd_t * f(t)``, ``f`` being :func:`abdag.comparators.statistics.cs_radius_factor`:
the very formula :func:`~abdag.comparators.statistics.confidence_sequence` uses, so the
projection agrees with the test that decides. Assuming the mean and the standard
deviation stay at their current values (the plug-in projection), the decision against
boundary ``b`` comes at the first ``n`` with ``sd * f(n) < |m - b|``, and not before the
verdict's ``min_pairs`` (200) nor the sequence's burn-in (100). ``f`` decreases in ``n``
(for ``alpha < 0.6``), so ``n`` is found by bisection. The reported interval is the
running intersection of the per-time intervals, which can only be narrower: the
projection errs late, never early, under its assumption.

**How sure.** The projection is a point estimate: at the projected ``n`` the running mean
is as likely to be above ``m`` as below, so if the true mean is ``m`` the sequential test
has decided by then in a little over half of the runs (the path may cross earlier):
0.6 to 0.7 in ``tests/test_decision_time.py``'s simulations (``d ~ N(mu, sd)``, 400 runs),
and by twice the projected ``n`` in over 0.9. For reference, :func:`fixed_n_pairs` gives
the classical fixed-sample figure: the ``n`` at which a two-sided ``1 - alpha`` normal
interval on ``mean(d)`` excludes the boundary with probability ``power`` (0.8), i.e. the
one-sample z-test's ``n = ((z_(1-alpha/2) + z_power) sd / distance)^2`` (statsmodels'
``NormalIndPower(ratio=0)``, one-sided at ``alpha / 2``); it holds only for one look at a
fixed ``n``, which is why the sequential ``n`` is larger, the price of looking as often as
you like: about 1.2 times near 1,000 pairs (where the sequence is tightest), 1.3 to 1.5
times from 5,000 to 30,000, 1.9 times near a million.

**When.** :class:`LabelStats` holds how labels come (its SQL is
:data:`abdag.comparators.report.LABELS_SQL`): the labelled-pair rate ``R`` (labelled pairs
whose ``label_ts`` falls in the last ``RATE_WINDOW_S`` = 600 s before the experiment's
latest time, per second of that window; the window is shorter while the experiment is),
the paired-request rate over the same window of ``request_ts``, the coverage and the
label delay. The ETA for ``K`` more pairs (:func:`eta_seconds`) is ``K / R``: ``R``
counts labels when they *arrive*, so the delay is already in it: the labels that arrive
next are those of requests already made and still waiting for theirs (paired, unlabelled,
younger than the p99 delay: ``LabelStats.waiting``, which count when their labels come),
then those of requests made from now on, each ~p50 delay after its request. With no label
in the window (labels come in batches, or have not started) but requests flowing, the
first new label comes after ~p50 delay: the ETA is ``p50 + K / (P * coverage)`` with
``P`` the paired-request rate. Without either, no ETA.

>>> pairs_needed(0.05, 0.5, 0.05) > fixed_n_pairs(0.05, 0.5, 0.05) > 0
True
>>> reachable(0.01, 0.005)
[('B not worse', -0.005), ('B better', 0.0)]
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from scipy.stats import norm

from abdag.comparators.statistics import SequentialResult, cs_radius_factor

__all__ = [
    "DECISIONS",
    "MAX_PAIRS",
    "MIN_PROJECT_PAIRS",
    "RATE_WINDOW_S",
    "UNKNOWN_REQUEST_REASON",
    "LabelStats",
    "TimeToDecision",
    "eta_seconds",
    "fixed_n_pairs",
    "half_width",
    "pairs_needed",
    "reachable",
    "time_to_decision",
]

DECISIONS = ("B better", "B not worse", "B worse")
RATE_WINDOW_S = 600
"""Seconds of ``label_ts`` (and of ``request_ts``) the rates are measured over."""
MIN_PROJECT_PAIRS = 30
"""Below this many labelled pairs the mean and sd of d are too noisy to project from."""
MAX_PAIRS = 10**12
"""A decision needing more labelled pairs than this is "not expected"."""
UNKNOWN_REQUEST_REASON = "label without request"
"""The dead-letter reason of a label whose request never came (``comparators/join.py``)."""


# --------------------------------------------------------------------------- the math
def half_width(n: float, sd: float, alpha: float = 0.05, *, tuning_n: float = 1000) -> float:
    """Half-width of the confidence sequence at ``n`` labelled pairs for this ``sd``."""
    return float(sd * cs_radius_factor(float(n), alpha, tuning_n=tuning_n))


def pairs_needed(
    distance: float,
    sd: float,
    alpha: float = 0.05,
    *,
    min_pairs: int = 200,
    burn_in: int = 100,
    tuning_n: float = 1000,
) -> int | None:
    """Smallest ``n >= max(min_pairs, burn_in)`` with ``half_width(n, sd) < distance``.

    ``distance`` = ``|mean - boundary|`` (or a stated effect beyond the boundary): the
    confidence sequence then excludes the boundary if the mean stays where it is. None
    when ``distance`` is not positive (the mean on the boundary) or over ``MAX_PAIRS``.

    >>> n = pairs_needed(0.02, 0.4)
    >>> half_width(n, 0.4) < 0.02 <= half_width(n - 1, 0.4)
    True
    """
    if not (math.isfinite(distance) and distance > 0 and math.isfinite(sd) and sd >= 0):
        return None
    if not 0 < alpha < 0.6:
        raise ValueError("alpha must be in (0, 0.6): the half-width then decreases in n")

    def ok(n: int) -> bool:
        return half_width(n, sd, alpha, tuning_n=tuning_n) < distance

    lo = max(int(min_pairs), int(burn_in), 1)
    if ok(lo):
        return lo
    hi = 2 * lo
    while not ok(hi):  # invariant: not ok(lo)
        lo, hi = hi, 2 * hi
        if lo > MAX_PAIRS:
            return None
    while hi - lo > 1:  # not ok(lo), ok(hi)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi if hi <= MAX_PAIRS else None


def fixed_n_pairs(
    distance: float, sd: float, alpha: float = 0.05, power: float = 0.8
) -> int | None:
    """Classical fixed-sample reference: pairs for a two-sided ``1 - alpha`` normal interval
    on mean(d) to exclude a boundary ``distance`` away with probability ``power``,
    ``ceil(((z_(1-alpha/2) + z_power) * sd / distance)^2)``. Valid for one look only.

    >>> fixed_n_pairs(0.05, 0.5)  # effect size 0.1
    785
    """
    if not (math.isfinite(distance) and distance > 0 and math.isfinite(sd)):
        return None
    z = norm.ppf(1 - alpha / 2) + norm.ppf(power)
    return max(1, math.ceil((z * sd / distance) ** 2))


def reachable(mean: float, margin: float = 0.0) -> list[tuple[str, float]]:
    """The decisions a mean that stays at ``mean`` can reach, in the order they come, each
    with its boundary (see the module doc). Empty when the mean sits on the boundary.

    >>> reachable(0.01), reachable(-0.002, 0.005), reachable(-0.01, 0.005), reachable(0.0)
    ([('B better', 0.0)], [('B not worse', -0.005)], [('B worse', -0.005)], [])
    """
    if not math.isfinite(mean):
        return []
    edge = -margin if margin > 0 else 0.0  # never -0.0
    if mean > 0:
        return ([("B not worse", edge)] if margin > 0 else []) + [("B better", 0.0)]
    if mean > edge:
        return [("B not worse", edge)]
    if mean < edge:
        return [("B worse", edge)]
    return []


# -------------------------------------------------------------------- how labels come
@dataclass(frozen=True)
class LabelStats:
    """Label delay and coverage of one experiment (a row of ``LABELS_SQL``).

    ``labelled`` counts the pairs the sequential test counts (paired, labelled, both
    models scorable); delays are ``label_ts - request_ts`` in seconds over them, quantiles
    by ClickHouse's ``quantileExactInclusive`` (linear interpolation between order
    statistics, numpy's default ``method='linear'``). ``waiting``: paired requests without
    a label that are younger than the p99 delay (every unlabelled one while no label has
    come): they count when their labels come. ``settled_*``: requests older than the p99
    delay, whose labels had their time. ``as_of``: the experiment's latest time (its last
    request or label), which the windows end at.
    """

    paired: int = 0
    labelled: int = 0
    delay_p50_s: float | None = None
    delay_p90_s: float | None = None
    delay_p99_s: float | None = None
    waiting: int = 0
    settled_paired: int = 0
    settled_labelled: int = 0
    labelled_in_window: int = 0
    paired_in_window: int = 0
    window_s: float = RATE_WINDOW_S
    span_s: float = 0.0
    as_of: dt.datetime | None = None
    unknown_request_labels: int = 0

    @classmethod
    def from_row(
        cls,
        row: dict[str, Any],
        *,
        unknown_request_labels: int = 0,
        window_s: float = RATE_WINDOW_S,
    ) -> LabelStats:
        """From the one row of ``LABELS_SQL`` (an empty dict: no pairs yet)."""
        as_of, first = row.get("as_of"), row.get("first_request_ts")
        epoch = dt.datetime(1970, 1, 2)  # max() of no rows: the zero DateTime64
        real = isinstance(as_of, dt.datetime) and as_of.replace(tzinfo=None) > epoch
        span = (as_of - first).total_seconds() if real and isinstance(first, dt.datetime) else 0.0
        if real and as_of.tzinfo is None:
            as_of = as_of.replace(tzinfo=dt.UTC)
        return cls(
            paired=int(row.get("paired") or 0),
            labelled=int(row.get("labelled") or 0),
            delay_p50_s=_num(row.get("delay_p50_s")),
            delay_p90_s=_num(row.get("delay_p90_s")),
            delay_p99_s=_num(row.get("delay_p99_s")),
            waiting=int(row.get("waiting") or 0),
            settled_paired=int(row.get("settled_paired") or 0),
            settled_labelled=int(row.get("settled_labelled") or 0),
            labelled_in_window=int(row.get("labelled_in_window") or 0),
            paired_in_window=int(row.get("paired_in_window") or 0),
            window_s=float(window_s),
            span_s=max(span, 0.0),
            as_of=as_of if real else None,
            unknown_request_labels=int(unknown_request_labels),
        )

    @property
    def coverage(self) -> float | None:
        """Labelled / paired, over the whole experiment."""
        return self.labelled / self.paired if self.paired else None

    @property
    def settled_coverage(self) -> float | None:
        """Labelled / paired among requests older than the p99 delay: the share of
        requests that get a label at all."""
        return self.settled_labelled / self.settled_paired if self.settled_paired else None

    @property
    def effective_window_s(self) -> float:
        """The rate window, shortened to the experiment's span while that is shorter."""
        return min(self.window_s, self.span_s)

    @property
    def rate_per_s(self) -> float | None:
        """Labelled pairs per second, by ``label_ts`` over the window (None: no span yet)."""
        w = self.effective_window_s
        return self.labelled_in_window / w if w > 0 else None

    @property
    def paired_rate_per_s(self) -> float | None:
        """Paired requests per second, by ``request_ts`` over the window."""
        w = self.effective_window_s
        return self.paired_in_window / w if w > 0 else None

    @property
    def expected_from_waiting(self) -> float:
        """Labels expected for the waiting requests: ``waiting`` times the settled coverage
        (the overall coverage while no request is settled)."""
        share = self.settled_coverage if self.settled_coverage is not None else self.coverage
        return self.waiting * (share if share is not None else 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "delay_p50_s": self.delay_p50_s,
            "delay_p90_s": self.delay_p90_s,
            "delay_p99_s": self.delay_p99_s,
            "paired": self.paired,
            "labelled": self.labelled,
            "coverage": self.coverage,
            "settled_coverage": self.settled_coverage,
            "waiting": self.waiting,
            "expected_from_waiting": self.expected_from_waiting,
            "unknown_request_labels": self.unknown_request_labels,
            "rate_per_s": self.rate_per_s,
            "paired_rate_per_s": self.paired_rate_per_s,
            "labelled_in_window": self.labelled_in_window,
            "window_s": self.effective_window_s,
            "as_of": self.as_of.isoformat() if self.as_of else None,
        }

    def render(self) -> str:
        """One line for the text report."""
        q = "/".join(_dur(x) for x in (self.delay_p50_s, self.delay_p90_s, self.delay_p99_s))
        rate, window = self.rate_per_s, _dur(self.effective_window_s)
        pace = "no rate yet" if rate is None else f"{rate:.3g} labelled pairs/s over {window}"
        return (
            f"Labels: delay p50/p90/p99 {q}; coverage {_pct(self.coverage)} "
            f"(settled {_pct(self.settled_coverage)}); {self.waiting} waiting for a label; "
            f"{pace}; "
            f"{self.unknown_request_labels} labels for unknown requests"
        )


def eta_seconds(more_pairs: int, labels: LabelStats | None) -> float | None:
    """Seconds until ``more_pairs`` more labelled pairs are in (the rule in the module doc):
    ``K / R``; with no label in the window, ``p50 delay + K / (P * coverage)``; else None.

    >>> eta_seconds(300, LabelStats(labelled_in_window=600, span_s=3600))
    300.0
    """
    if more_pairs <= 0:
        return 0.0
    if labels is None:
        return None
    rate = labels.rate_per_s
    if rate:
        return more_pairs / rate
    paired, cov = labels.paired_rate_per_s, labels.settled_coverage or labels.coverage
    if paired and cov:
        return (labels.delay_p50_s or 0.0) + more_pairs / (paired * cov)
    return None


# ------------------------------------------------------------------- the projection
@dataclass(frozen=True)
class TimeToDecision:
    """Where the verdict stands and what it still needs.

    ``status``: ``decided`` (the verdict is reached; ``then`` may project a stronger
    one: ``B better`` after ``B not worse``), ``projected`` (``decision`` expected at
    ``needed_pairs`` labelled pairs, ``more_pairs`` from now, in ``eta_s`` seconds, at
    ``eta_ts``), ``no decision expected`` (the mean sits on the boundary, or the
    confidence sequence already decided and McNemar's guardrail holds the verdict) or
    ``not enough data`` (too few labelled pairs to project from). ``distance`` = ``|mean
    - boundary|``, ``half_width`` the sequence's now, ``fixed_n_pairs`` the classical
    fixed-sample reference at 80 % power.
    """

    status: str
    reason: str
    decision: str | None = None
    n: int = 0
    needed_pairs: int | None = None
    more_pairs: int | None = None
    eta_s: float | None = None
    eta_ts: str | None = None
    mean: float | None = None
    sd: float | None = None
    boundary: float | None = None
    distance: float | None = None
    half_width: float | None = None
    fixed_n_pairs: int | None = None
    rate_per_s: float | None = None
    from_waiting: float | None = None
    then: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        """One line for the text report."""
        if self.status == "decided":
            line = f"Time to decision: decided ({self.decision})"
            t = self.then
            if t and t.get("status") == "projected":
                line += (
                    f"; {t['decision']} expected at ~{t['needed_pairs']:,} labelled pairs "
                    f"({t['more_pairs']:,} more{_in(t.get('eta_s'))})"
                )
            return line
        if self.status == "projected":
            rate = f" at {self.rate_per_s:.3g} labelled pairs/s" if self.rate_per_s else ""
            return (
                f"Time to decision: {self.decision} expected at ~{self.needed_pairs:,} labelled "
                f"pairs ({self.more_pairs:,} more{_in(self.eta_s)}{rate}); {self.reason}"
            )
        return f"Time to decision: {self.status}: {self.reason}"


def _target(
    decision: str,
    boundary: float,
    s: SequentialResult,
    labels: LabelStats | None,
    *,
    min_pairs: int,
    burn_in: int,
    tuning_n: float,
    power: float,
) -> TimeToDecision:
    distance = abs(s.mean - boundary)
    needed = pairs_needed(
        distance, s.sd, s.alpha, min_pairs=min_pairs, burn_in=burn_in, tuning_n=tuning_n
    )
    common = {
        "decision": decision,
        "n": s.n,
        "mean": s.mean,
        "sd": s.sd,
        "boundary": boundary,
        "distance": distance,
        "half_width": half_width(s.n, s.sd, s.alpha, tuning_n=tuning_n) if s.n else None,
        "fixed_n_pairs": fixed_n_pairs(distance, s.sd, s.alpha, power),
        "rate_per_s": labels.rate_per_s if labels else None,
    }
    if needed is None:
        return TimeToDecision(
            "no decision expected",
            f"no decision expected at this effect size: the mean {s.mean:+.4g} is "
            f"{distance:.3g} from the boundary {boundary:g}",
            **common,
        )
    more = max(needed - s.n, 0)
    eta = eta_seconds(more, labels)
    eta_ts = None
    if eta is not None and labels is not None and labels.as_of is not None:
        eta_ts = (labels.as_of + dt.timedelta(seconds=min(eta, 1e10))).isoformat()
    waiting = min(float(more), labels.expected_from_waiting) if labels else None
    if eta is None:
        why = "no labelled pairs arriving: no ETA"
    elif labels is not None and waiting is not None and more and waiting >= more:
        why = f"the {labels.waiting} requests waiting for labels are enough"
    elif labels is not None:
        p50 = _dur(labels.delay_p50_s)
        why = f"label delay p50 {p50}, {labels.waiting} requests wait for labels"
    else:
        why = ""
    why = f"if the mean stays at {s.mean:+.4g} (sd {s.sd:.3g}); " + why
    return TimeToDecision(
        "projected",
        why,
        needed_pairs=needed,
        more_pairs=more,
        eta_s=eta,
        eta_ts=eta_ts,
        from_waiting=waiting,
        **common,
    )


def time_to_decision(
    sequential: SequentialResult | None,
    verdict: str,
    labels: LabelStats | None = None,
    *,
    min_pairs: int = 200,
    burn_in: int = 100,
    tuning_n: float = 1000,
    power: float = 0.8,
) -> TimeToDecision:
    """Project the verdict ``verdict`` (a label of :data:`abdag.comparators.verdict.LABELS`)
    from the sequential test's current mean and sd (module doc). ``min_pairs``,
    ``burn_in`` and ``tuning_n`` must be those the verdict and the test used.
    """
    s = sequential
    if s is None or s.n == 0:
        return TimeToDecision("not enough data", "no labelled pairs yet")
    if verdict in DECISIONS:
        then = None
        if verdict == "B not worse" and s.mean > 0:
            kw = {"min_pairs": min_pairs, "burn_in": burn_in, "tuning_n": tuning_n}
            then = _target("B better", 0.0, s, labels, power=power, **kw).to_dict()
        return TimeToDecision(
            "decided",
            f"the verdict is {verdict}",
            decision=verdict,
            n=s.n,
            needed_pairs=s.n,
            more_pairs=0,
            eta_s=0.0,
            mean=s.mean,
            sd=s.sd,
            then=then,
        )
    if verdict != "not enough data":  # e.g. withheld: nothing to project
        return TimeToDecision(verdict, f"the verdict is {verdict}", n=s.n, mean=s.mean, sd=s.sd)
    if s.n < MIN_PROJECT_PAIRS or not (math.isfinite(s.mean) and math.isfinite(s.sd)):
        return TimeToDecision(
            "not enough data",
            f"{s.n} labelled pairs: at least {MIN_PROJECT_PAIRS} are needed to project "
            "from their mean and sd",
            n=s.n,
        )
    if s.n >= min_pairs and s.decision != "inconclusive":
        return TimeToDecision(
            "no decision expected",
            f"the confidence sequence says {s.decision}, but McNemar's guardrail holds the "
            "verdict (loss and accuracy disagree): more pairs settle it only if they agree",
            decision=s.decision,
            n=s.n,
            mean=s.mean,
            sd=s.sd,
        )
    targets = reachable(s.mean, s.margin)
    if not targets:
        return TimeToDecision(
            "no decision expected",
            f"no decision expected at this effect size: the mean {s.mean:+.4g} sits on the "
            f"boundary {-s.margin if s.margin > 0 else 0.0:g}",
            n=s.n,
            mean=s.mean,
            sd=s.sd,
            boundary=-s.margin if s.margin > 0 else 0.0,
            distance=0.0,
        )
    kw = {"min_pairs": min_pairs, "burn_in": burn_in, "tuning_n": tuning_n, "power": power}
    first = _target(*targets[0], s, labels, **kw)
    if len(targets) > 1 and first.status == "projected":
        first = TimeToDecision(
            **{**asdict(first), "then": _target(*targets[1], s, labels, **kw).to_dict()}
        )
    return first


# ---------------------------------------------------------------------- formatting
def _num(v: Any) -> float | None:
    if v is None:
        return None
    x = float(v)
    return x if math.isfinite(x) else None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _dur(s: float | None) -> str:
    """A duration in words: ``42.0 s``, ``9.5 min``, ``3.2 h``, ``2.1 days``."""
    if s is None or not math.isfinite(s):
        return "n/a"
    if abs(s) < 120:
        return f"{s:.1f} s"
    if abs(s) < 7200:
        return f"{s / 60:.1f} min"
    if abs(s) < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def _in(eta: float | None) -> str:
    return f", in ~{_dur(eta)}" if eta is not None else ", no ETA"
