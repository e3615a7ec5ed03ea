"""Sample-ratio mismatch (SRM): does the served split match the declared one?

In ``mode="split"`` a stable hash of the request id gives B's answer to a declared share
``p`` of the requests (:func:`abdag.comparators.decisions.served_side`). If the share of
served answers that came from B drifts away from ``p`` (B's predictions dead-lettered or
late, so its requests go unserved; a hash or routing bug; a worker on another version),
the requests the two models serve differ from what was planned, and the experiment cannot
be trusted until the cause is found: the report then withholds its verdict.

Given the served counts ``n_a`` and ``n_b`` (requests served by A and by B) and ``p``:

- :func:`chi_square`: Pearson's chi-square goodness-of-fit test, one degree of freedom,
  expected counts ``n (1 - p)`` and ``n p`` (equal to ``scipy.stats.chisquare(f_obs=[n_a,
  n_b], f_exp=[n (1 - p), n p])``). A fixed-sample test: shown for reference, never
  decisive, since looking at it after every request would make it fire by chance.
- :func:`sequential_pvalue`: the always-valid p-value of a **mixture sequential probability
  ratio test** for the binomial share, as in Lindon & Malek (2020), "Anytime-valid
  inference for multinomial count data" (the ``ssrm`` test), with two categories. Under a
  ``Beta(k (1 - p), k p)`` prior on B's share (mean ``p``, concentration ``k`` =
  :data:`PRIOR_CONCENTRATION`), the Bayes factor of "some other share" against "share
  ``p``" is ::

      BF_n = B(k (1 - p) + n_a, k p + n_b) / B(k (1 - p), k p) / ((1 - p)^n_a p^n_b)

  (``B`` the beta function). Under the null it is a nonnegative martingale with mean 1,
  so by Ville's inequality ``P(BF_n >= 1 / alpha for some n) <= alpha``: the p-value
  ``min(1, 1 / BF_n)`` may be looked at after every request, as often as one likes, and
  the chance that it *ever* falls below ``alpha`` on a correct split is at most ``alpha``.
  It depends on the counts only (not their order), so SQL counts are enough.

The SRM **fires** when the sequential p-value is below :data:`SRM_THRESHOLD` (0.001): a
fired check withholds a verdict (and so blocks a promotion), so a false alarm must be rare
over the whole life of an experiment, however often it is looked at; a real mismatch
drives the p-value down exponentially fast (2,600 of 20,000 served answers from B, 13 %
against 10 % declared, give ``p = 2.6e-38``). The check runs once there are at least
:data:`MIN_SERVED` served answers and both expected counts are at least
:data:`MIN_EXPECTED` (the usual condition for the chi-square approximation); before that
it is skipped ("too few served requests").

The prior: the concentration ``k = 1000`` puts the prior standard deviation of B's share
at ``sqrt(p (1 - p) / (k + 1))``, about one percentage point at ``p = 0.1``: mismatches of
that size are the ones worth catching on live traffic. A larger ``k`` (``ssrm`` defaults to
10,000) detects smaller mismatches sooner but large ones later; a smaller ``k`` the reverse.

The functions take the counts of one group of requests. :func:`srm_check_segments` runs
the check on each value of each declared segment (``pairs.segments``) with the threshold
divided by the number of values checked (Bonferroni: a fired check withholds the verdict,
so the chance of *any* false alarm among the values is what must stay at the threshold);
values with too few served answers are skipped and do not count. The overall result
carries them (``SrmResult.segments``); :attr:`SrmResult.any_fired` is what withholds.

>>> r = srm_check(17_360, 2_640, 0.1)
>>> r.status, r.summary()
('fired', 'served 13.2% to B, declared 10%')
>>> srm_check(9_010, 990, 0.1).status
'ok'
>>> srm_check(40, 5, 0.1).status
'skipped'
>>> counts = [("country", "FR", 970, 30, 0), ("country", "DE", 900, 100, 0)]
>>> fr, de = srm_check_segments(counts, 0.1)
>>> fr.status, fr.threshold, fr.withhold_reason(), de.status
('fired', 0.0005, 'SRM in segment country=FR: served 3.0% to B, declared 10%', 'ok')
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from scipy.special import betaln
from scipy.stats import chi2

__all__ = [
    "MIN_EXPECTED",
    "MIN_SERVED",
    "MISSING",
    "PRIOR_CONCENTRATION",
    "SRM_THRESHOLD",
    "SrmResult",
    "always_valid_pvalues",
    "chi_square",
    "log_bayes_factor",
    "sequential_pvalue",
    "skipped",
    "srm_check",
    "srm_check_segments",
]

SRM_THRESHOLD = 0.001
"""The SRM fires when the sequential (always-valid) p-value is below this."""
PRIOR_CONCENTRATION = 1000.0
"""``k`` of the ``Beta(k (1 - p), k p)`` prior on B's served share."""
MIN_SERVED = 100
"""Served answers (A's and B's) needed before the check runs."""
MIN_EXPECTED = 5.0
"""Both expected counts, ``n p`` and ``n (1 - p)``, must be at least this."""
MAX_LISTED = 100
"""At most this many skipped segment values are listed in JSON (``segments_skipped`` counts
them all)."""
MISSING = ""
"""A segment's value where the payload had none (shown ``(missing)``, as in segments)."""


def _check_share(p: float) -> None:
    if not 0.0 < p < 1.0:
        raise ValueError(f"the declared share must be in (0, 1), got {p!r}")


def chi_square(n_a: int, n_b: int, p: float) -> tuple[float, float]:
    """Pearson's chi-square statistic and p-value (1 degree of freedom) of the counts
    ``(n_a, n_b)`` against expected ``(n (1 - p), n p)``; ``(nan, nan)`` without counts.

    >>> chi_square(900, 100, 0.1)
    (0.0, 1.0)
    """
    _check_share(p)
    n = n_a + n_b
    if n <= 0:
        return math.nan, math.nan
    obs = np.array([n_a, n_b], dtype=float)
    exp = np.array([n * (1.0 - p), n * p])
    stat = float(((obs - exp) ** 2 / exp).sum())
    return stat, float(chi2.sf(stat, 1))


def log_bayes_factor(
    n_a: Any, n_b: Any, p: float, concentration: float = PRIOR_CONCENTRATION
) -> Any:
    """``log BF_n`` of the mixture SPRT (module doc), elementwise over arrays of counts."""
    _check_share(p)
    if concentration <= 0:
        raise ValueError("the prior concentration must be > 0")
    a0, b0 = concentration * (1.0 - p), concentration * p
    n_a = np.asarray(n_a, dtype=float)
    n_b = np.asarray(n_b, dtype=float)
    out = betaln(a0 + n_a, b0 + n_b) - betaln(a0, b0) - n_a * math.log1p(-p) - n_b * math.log(p)
    return float(out) if out.ndim == 0 else out


def sequential_pvalue(
    n_a: Any, n_b: Any, p: float, concentration: float = PRIOR_CONCENTRATION
) -> Any:
    """``min(1, 1 / BF_n)``: an always-valid p-value for "B's share is ``p``".

    >>> sequential_pvalue(0, 0, 0.1)
    1.0
    """
    lbf = log_bayes_factor(n_a, n_b, p, concentration)
    out = np.exp(-np.maximum(lbf, 0.0))
    return float(out) if np.ndim(out) == 0 else out


def always_valid_pvalues(
    served_b: Any, p: float, concentration: float = PRIOR_CONCENTRATION
) -> np.ndarray:
    """The p-value after each served request of a stream (``served_b``: 1 where B served,
    0 where A did), as the running minimum of ``1 / BF_t``: what a watcher who looked
    after every request has seen at most."""
    b = np.asarray(served_b, dtype=float)
    n_b = np.cumsum(b)
    n_a = np.arange(1, len(b) + 1) - n_b
    lbf = np.atleast_1d(log_bayes_factor(n_a, n_b, p, concentration))
    return np.exp(-np.maximum.accumulate(np.maximum(lbf, 0.0)))


@dataclass(frozen=True)
class SrmResult:
    """One SRM check. ``status``: ``ok``, ``fired`` or ``skipped`` (then ``reason`` says
    why and the p-values are NaN). ``observed``: ``n_b / (n_a + n_b)``, B's share of the
    served answers; ``declared``: B's declared share. ``not_served``: requests with no
    served answer (the serving side's prediction never came); they are not counted."""

    status: str
    n_a: int
    n_b: int
    declared: float
    observed: float
    chi2: float
    pvalue_chi2: float
    pvalue_sequential: float
    threshold: float = SRM_THRESHOLD
    concentration: float = PRIOR_CONCENTRATION
    not_served: int = 0
    reason: str = ""
    # one value of one segment ('' for the overall check), and the overall's per-value checks
    segment: str = ""
    value: str = ""
    segments: tuple[SrmResult, ...] = ()

    @property
    def fired(self) -> bool:
        """This check fired (for the overall one: the overall counts, segments aside)."""
        return self.status == "fired"

    @property
    def fired_segments(self) -> list[SrmResult]:
        return [s for s in self.segments if s.fired]

    @property
    def any_fired(self) -> bool:
        """The overall check or one of its segment values fired: the verdict is withheld."""
        return self.fired or bool(self.fired_segments)

    @property
    def label(self) -> str:
        """``country=FR`` for a segment value, '' for the overall check."""
        if not self.segment:
            return ""
        return f"{self.segment}={self.value if self.value != MISSING else '(missing)'}"

    def summary(self) -> str:
        """``served 13.2% to B, declared 10%``."""
        obs = "n/a" if math.isnan(self.observed) else f"{100 * self.observed:.1f}%"
        return f"served {obs} to B, declared {100 * self.declared:g}%"

    def withhold_reason(self, max_listed: int = 3) -> str:
        """Why the verdict is withheld ('' unless :attr:`any_fired`): ``SRM: served 13.2% to
        B, declared 10%`` (overall), ``SRM in segment country=FR: served 3.1% to B, declared
        10%`` (per value; at most ``max_listed`` values named, then how many more)."""
        own = [f"SRM: {self.summary()}"] if self.fired and not self.segment else []
        if self.fired and self.segment:
            own = [f"SRM in segment {self.label}: {self.summary()}"]
        fired = self.fired_segments
        parts = own + [s.withhold_reason() for s in fired[:max_listed]]
        if len(fired) > max_listed:
            parts.append(f"and {len(fired) - max_listed} more segment values")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "segments"}
        d.update(fired=self.fired, summary=self.summary())
        if self.segment:
            return {**d, "label": self.label}
        checked = [s for s in self.segments if s.status != "skipped"]
        skipped_values = [s for s in self.segments if s.status == "skipped"]
        return {
            **d,
            "any_fired": self.any_fired,
            # per value of each segment: every one checked, then the skipped (at most 100)
            "segments": [s.to_dict() for s in checked + skipped_values[:MAX_LISTED]],
            "segments_checked": len(checked),
            "segments_skipped": len(skipped_values),
            "segments_fired": [s.label for s in self.fired_segments],
        }


def skipped(
    declared: float, reason: str, n_a: int = 0, n_b: int = 0, not_served: int = 0
) -> SrmResult:
    """A check that did not run, and why."""
    n = n_a + n_b
    return SrmResult(
        "skipped",
        int(n_a),
        int(n_b),
        float(declared),
        n_b / n if n else math.nan,
        math.nan,
        math.nan,
        math.nan,
        not_served=int(not_served),
        reason=reason,
    )


def _too_few(n: int, declared: float, min_served: int, min_expected: float) -> str:
    """Why ``n`` served answers are too few to check at ``declared``; '' when enough."""
    if n >= min_served and n * min(declared, 1.0 - declared) >= min_expected:
        return ""
    need = max(min_served, math.ceil(min_expected / min(declared, 1.0 - declared)))
    return f"too few served requests: {n}, at least {need} needed at {declared:g}"


def srm_check(
    n_a: int,
    n_b: int,
    declared: float,
    *,
    threshold: float = SRM_THRESHOLD,
    concentration: float = PRIOR_CONCENTRATION,
    min_served: int = MIN_SERVED,
    min_expected: float = MIN_EXPECTED,
    not_served: int = 0,
) -> SrmResult:
    """Check served counts ``(n_a, n_b)`` against B's declared share ``declared`` (in
    (0, 1)); fires when the sequential p-value is below ``threshold``."""
    _check_share(declared)
    n_a, n_b = int(n_a), int(n_b)
    n = n_a + n_b
    why = _too_few(n, declared, min_served, min_expected)
    if why:
        r = skipped(declared, why, n_a, n_b, not_served)
        return replace(r, threshold=threshold, concentration=concentration)
    stat, p_chi2 = chi_square(n_a, n_b, declared)
    p_seq = sequential_pvalue(n_a, n_b, declared, concentration)
    fired = p_seq < threshold
    reason = (
        f"sequential p = {p_seq:.3g} {'<' if fired else '>='} {threshold:g} ({n} served requests)"
    )
    return SrmResult(
        "fired" if fired else "ok",
        n_a,
        n_b,
        float(declared),
        n_b / n,
        stat,
        p_chi2,
        p_seq,
        threshold,
        concentration,
        int(not_served),
        reason,
    )


def srm_check_segments(
    counts: Iterable[tuple[str, str, int, int, int]],
    declared: float,
    *,
    threshold: float = SRM_THRESHOLD,
    concentration: float = PRIOR_CONCENTRATION,
    min_served: int = MIN_SERVED,
    min_expected: float = MIN_EXPECTED,
) -> tuple[SrmResult, ...]:
    """The check of each segment value: ``counts`` holds ``(segment, value, n_a, n_b,
    not_served)`` per value. The values with enough served answers (as :func:`srm_check`
    wants) are checked at ``threshold / m``, ``m`` the number of them (Bonferroni over
    every value of every segment); the others are skipped and do not count in ``m``."""
    _check_share(declared)
    rows = [(str(s), str(v), int(a), int(b), int(u)) for s, v, a, b, u in counts]
    m = sum(1 for _, _, a, b, _ in rows if not _too_few(a + b, declared, min_served, min_expected))
    each = threshold / max(m, 1)
    out = []
    for seg, value, n_a, n_b, not_served in rows:
        r = srm_check(
            n_a,
            n_b,
            declared,
            threshold=each,
            concentration=concentration,
            min_served=min_served,
            min_expected=min_expected,
            not_served=not_served,
        )
        if r.status != "skipped" and m > 1:
            r = replace(r, reason=f"{r.reason}; threshold {threshold:g} / {m} values checked")
        out.append(replace(r, segment=seg, value=value))
    return tuple(out)
