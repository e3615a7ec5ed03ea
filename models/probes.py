"""Telling, from a few forward passes, whether a one-output model already returns
probabilities: the check behind the warning on ``output="sigmoid"`` (a model that ends in a
sigmoid, declared ``"sigmoid"``, has every score squashed twice: every score lands in
[0.5, 0.73] and every prediction is 1).

A model that ends in a sigmoid returns a value in [0, 1] for *any* input; a model that
returns logits does so only near its decision boundary. One sample event cannot tell them
apart (a logit of 0.3 is in [0, 1]), so the sample is stretched: :func:`probe_inputs` adds
copies of it scaled by large factors, both signs, and random vectors of growing size. A
logit model leaves [0, 1] on some of them; a probability model never does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from abdag.models.batching import ItemInput
from abdag.models.loading import LoadedModel

__all__ = [
    "PROBE_MIN",
    "SIGMOID_OF_1",
    "in_unit_interval",
    "probe_inputs",
    "raw_scores",
]

PROBE_MIN = 8
"""How many finite outputs, all in [0, 1], it takes to conclude "already a probability"."""

SIGMOID_OF_1 = 1.0 / (1.0 + math.exp(-1.0))
"""sigmoid(1): a raw output in [0, 1] read through a sigmoid lands in [0.5, SIGMOID_OF_1]."""

_SCALES = (0.0, -1.0, 3.0, -3.0, 10.0, -10.0, 100.0, -100.0)
_NOISE = (1.0, 10.0, 100.0, 1000.0)


def _stretched(t: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
    if not t.is_floating_point() or t.numel() == 0:
        return [t] * (len(_SCALES) + len(_NOISE))
    size = float(t.detach().double().pow(2).mean().sqrt()) + 1.0
    out = [t * k for k in _SCALES]
    for std in _NOISE:
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float64) * (std * size)
        out.append(noise.to(t.dtype))
    return out


def probe_inputs(sample: ItemInput, *, seed: int = 0) -> list[ItemInput]:
    """``sample`` and stretched copies of it (same shapes and dtypes): each float tensor
    scaled by 0, ±1, ±3, ±10, ±100 and replaced by Gaussian vectors of 1 to 1000 times its
    size; integer tensors (ids, indices) are kept as they are. Empty when no part of the
    sample is a float tensor: then only real inputs can tell."""
    parts = sample if isinstance(sample, tuple) else (sample,)
    if not any(isinstance(p, torch.Tensor) and p.is_floating_point() for p in parts):
        return []
    gen = torch.Generator().manual_seed(seed)
    columns = [_stretched(p, gen) for p in parts]
    copies = [tuple(col[i] for col in columns) for i in range(len(columns[0]))]
    return [c if isinstance(sample, tuple) else c[0] for c in copies]


def raw_scores(model: LoadedModel, items: Sequence[ItemInput]) -> list[float] | None:
    """The model's raw outputs on ``items``, in one batch, the non-finite ones left out;
    None when the model fails on them or returns more than one value per item."""
    if not items:
        return []
    try:
        if isinstance(items[0], tuple):
            batch: ItemInput = tuple(torch.stack(col) for col in zip(*items, strict=True))
        else:
            batch = torch.stack(list(items))  # type: ignore[arg-type]
        out = model(batch)
        n = len(items)
        if out.ndim == 0 or out.shape[0] != n:
            return None
        rows = out.detach().reshape(n, -1).to(torch.float64)
    except Exception:  # noqa: BLE001 - a stretched input may be out of the model's reach
        return None
    if rows.shape[1] != 1:
        return None
    col = rows[:, 0]
    return col[torch.isfinite(col)].tolist()


def in_unit_interval(values: Sequence[float], *, at_least: int = PROBE_MIN) -> bool:
    """True when there are at least ``at_least`` values and every one lies in [0, 1]."""
    return len(values) >= at_least and all(0.0 <= v <= 1.0 for v in values)
