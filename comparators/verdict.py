"""The answer users read: is B at least as good as A, and how sure are we.

Rule (``d = loss_a - loss_b`` per labelled request, positive = B better; ``[lower, upper]``
the always-valid confidence sequence for mean(d) at level 1 - alpha, see
:func:`abdag.comparators.statistics.sequential_test`; ``margin`` >= 0 the non-inferiority margin
in loss units):

1. fewer than ``min_pairs`` labelled pairs -> 'not enough data';
2. ``lower > 0`` -> 'B better';
3. ``lower > -margin`` -> 'B not worse';
4. ``upper < -margin`` -> 'B worse';
5. otherwise -> 'not enough data' (the interval still straddles the margin).

McNemar guardrail (classification, when a McNemar result is given): if McNemar rejects at
``alpha`` with B right less often than A (``b10 > b01``), B is never called better or not
worse: the verdict is 'B worse' when the interval does not show B better on loss
(``lower <= 0``), else 'not enough data' (loss and accuracy disagree). McNemar is a
fixed-sample test, so looking often makes this guardrail fire more easily: it errs on the
side of keeping A in production.

``confidence`` is ``1 - p`` with p the always-valid p-value of the null the claim rejects
(mean 0 for 'B better', mean -margin for 'B not worse' / 'B worse'), or ``1 - p`` of
McNemar when the guardrail decided; 0 for 'not enough data'.

A split experiment whose served split does not match the declared one (a sample-ratio
mismatch, :mod:`abdag.comparators.srm`) gets no verdict: :func:`withhold` replaces whatever
``decide`` said with 'withheld' (confidence 0, the reason names the mismatch); the report
keeps the statistical verdict beside it.

>>> from abdag.comparators.statistics import sequential_test
>>> import numpy as np
>>> d = np.random.default_rng(0).normal(0.1, 0.5, 2000)
>>> v = decide(sequential_test(d))
>>> v.label, v.confidence > 0.95
('B better', True)
>>> decide(sequential_test(d[:50])).label
'not enough data'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from abdag.comparators.statistics import McNemarResult, SequentialResult

__all__ = ["LABELS", "WITHHELD", "Verdict", "decide", "withhold"]

WITHHELD = "withheld"
LABELS = ("B better", "B not worse", "B worse", "not enough data", WITHHELD)


@dataclass(frozen=True)
class Verdict:
    """One of ``LABELS``, a confidence in [0, 1] and the reason in words."""

    label: str
    confidence: float
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def decide(
    sequential: SequentialResult,
    mcnemar: McNemarResult | None = None,
    *,
    margin: float = 0.0,
    alpha: float = 0.05,
    min_pairs: int = 200,
) -> Verdict:
    """Verdict from the sequential test (and McNemar as a guardrail); rule in the module doc."""
    s = sequential
    if margin < 0:
        raise ValueError("margin must be >= 0")
    n = s.n
    ci = f"mean loss improvement {s.mean:+.4g}, {1 - alpha:.0%} CS [{s.lower:+.4g}, {s.upper:+.4g}]"
    if n < min_pairs:
        return Verdict("not enough data", 0.0, f"{n} labelled pairs, at least {min_pairs} needed")
    if s.lower > 0:
        label, conf = "B better", 1.0 - s.pvalue_always_valid
        why = f"B has lower loss: {ci} excludes 0"
    elif s.lower > -margin:
        label, conf = "B not worse", 1.0 - s.pvalue_margin
        why = f"B is not worse than A by more than {margin:g}: {ci}"
    elif s.upper < -margin:
        label, conf = "B worse", 1.0 - s.pvalue_margin
        more = f" by more than the margin {margin:g}" if margin else ""
        why = f"B has higher loss{more}: {ci} excludes {-margin if margin else 0:g}"
    else:
        label, conf = "not enough data", 0.0
        edge = f"-margin = {-margin:g}" if margin else "0"
        why = f"inconclusive after {n} labelled pairs: {ci} contains {edge}"
    m = mcnemar
    if m is not None and m.pvalue < alpha and m.b10 > m.b01 and label != "B worse":
        test = "exact binomial" if m.exact else "chi-square"
        acc = (
            f"B is right less often than A (McNemar {test} p={m.pvalue:.3g}, "
            f"b10={m.b10} > b01={m.b01})"
        )
        if s.lower <= 0:
            return Verdict("B worse", 1.0 - m.pvalue, f"{acc}; {ci}")
        return Verdict("not enough data", 0.0, f"loss and accuracy disagree: {acc}; {ci}")
    return Verdict(label, float(max(0.0, conf)), f"{why} ({n} labelled pairs)")


def withhold(why: str) -> Verdict:
    """No verdict while the experiment is broken, whatever :func:`decide` said: label
    'withheld', confidence 0, ``why`` as the reason. The caller keeps the statistical
    verdict beside it.

    >>> withhold("SRM: served 13.2% to B, declared 10%")
    Verdict(label='withheld', confidence=0.0, reason='SRM: served 13.2% to B, declared 10%')
    """
    return Verdict(WITHHELD, 0.0, why)
