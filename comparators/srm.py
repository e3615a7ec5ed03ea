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

The functions take the counts of one group of requests; a check per segment (later) calls
:func:`srm_check` with each segment's counts (and a threshold divided by the number of
segments, to keep the chance of any false alarm at the threshold).

>>> r = srm_check(17_360, 2_640, 0.1)
>>> r.status, r.summary()
('fired', 'served 13.2% to B, declared 10%')
>>> srm_check(9_010, 990, 0.1).status
'ok'
>>> srm_check(40, 5, 0.1).status
'skipped'
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.special import betaln
from scipy.stats import chi2

__all__ = [
    "MIN_EXPECTED",
    "MIN_SERVED",
    "PRIOR_CONCENTRATION",
    "SRM_THRESHOLD",
    "SrmResult",
    "always_valid_pvalues",
    "chi_square",
    "log_bayes_factor",
    "sequential_pvalue",
    "skipped",
    "srm_check",
]

SRM_THRESHOLD = 0.001
"""The SRM fires when the sequential (always-valid) p-value is below this."""
PRIOR_CONCENTRATION = 1000.0
"""``k`` of the ``Beta(k (1 - p), k p)`` prior on B's served share."""
MIN_SERVED = 100
"""Served answers (A's and B's) needed before the check runs."""
MIN_EXPECTED = 5.0
"""Both expected counts, ``n p`` and ``n (1 - p)``, must be at least this."""


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

    @property
    def fired(self) -> bool:
        return self.status == "fired"

    def summary(self) -> str:
        """``served 13.2% to B, declared 10%``."""
        obs = "n/a" if math.isnan(self.observed) else f"{100 * self.observed:.1f}%"
        return f"served {obs} to B, declared {100 * self.declared:g}%"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fired": self.fired, "summary": self.summary()}


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
    expected = n * min(declared, 1.0 - declared)
    if n < min_served or expected < min_expected:
        need = max(min_served, math.ceil(min_expected / min(declared, 1.0 - declared)))
        why = f"too few served requests: {n}, at least {need} needed at {declared:g}"
        return skipped(declared, why, n_a, n_b, not_served)
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
