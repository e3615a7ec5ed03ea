"""Validating per-item inputs and running them through a model in one batched call.

A DAG node receives many independent messages; one bad message (wrong shape, NaN)
must not fail its neighbours, and one model exception must not kill the agent. So
``BatchRunner.run`` never raises: every item gets an ``ItemResult`` that is either
a value or a reason.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from abdag.models.loading import LoadedModel

__all__ = ["OUTPUT_KINDS", "BatchRunner", "ItemInput", "ItemResult", "OutputKind", "TensorSpec"]

OutputKind = Literal["sigmoid", "probability", "softmax", "value", "raw"]
OUTPUT_KINDS: tuple[str, ...] = ("sigmoid", "probability", "softmax", "value", "raw")
_SCALAR_KINDS = ("sigmoid", "probability", "value")

ItemInput = torch.Tensor | tuple[torch.Tensor, ...]
Signature = tuple[tuple[tuple[int, ...], torch.dtype], ...]


def _fmt_shape(shape: Sequence[int | None]) -> str:
    return str(tuple(shape))


@dataclass(frozen=True)
class TensorSpec:
    """Expected per-example shape (``None`` = any length) and dtype of one model input."""

    shape: tuple[int | None, ...]
    dtype: torch.dtype

    def check(self, t: torch.Tensor) -> str | None:
        """Return why ``t`` cannot be fed to the model, or ``None`` when it can."""
        return self.check_layout(t) or _non_finite_reason(t)

    def check_layout(self, t: torch.Tensor) -> str | None:
        """Shape and dtype only: no pass over the values, so it is O(1) per item."""
        if not isinstance(t, torch.Tensor):
            return f"not a tensor: {type(t).__name__}"
        got = tuple(t.shape)
        if len(got) != len(self.shape) or any(
            want is not None and want != have for want, have in zip(self.shape, got, strict=False)
        ):
            return f"wrong shape: expected {_fmt_shape(self.shape)}, got {_fmt_shape(got)}"
        if t.dtype != self.dtype:
            return f"wrong dtype: expected {self.dtype}, got {t.dtype}"
        return None


def _non_finite_reason(t: torch.Tensor) -> str | None:
    if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
        return "non-finite values in input"
    return None


@dataclass(frozen=True, slots=True)
class ItemResult:
    """Outcome for one input item: ``ok`` with output/score/label, or not ok with a reason."""

    ok: bool
    output: float | int | list[float] | None = None
    score: float | None = None
    label: int | None = None
    reason: str | None = None

    @classmethod
    def fail(cls, reason: str) -> ItemResult:
        return cls(ok=False, reason=reason)


class BatchRunner:
    """Runs a list of items through a ``LoadedModel`` in as few forward calls as possible.

    ``spec`` is one ``TensorSpec`` for single-input models or a tuple of them (one per
    input) for models taking several tensors; each item is then a tuple of tensors in
    the same order. Without a spec only non-finite values and within-batch shape
    agreement are checked.
    """

    def __init__(
        self,
        model: LoadedModel,
        spec: TensorSpec | tuple[TensorSpec, ...] | None = None,
        output: OutputKind = "sigmoid",
        *,
        threshold: float = 0.5,
        max_batch_size: int | None = None,
        history: int = 1024,
    ) -> None:
        if output not in OUTPUT_KINDS:
            raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.specs: tuple[TensorSpec, ...] | None = (
            (spec,) if isinstance(spec, TensorSpec) else spec
        )
        self.output = output
        self.threshold = threshold
        self.max_batch_size = max_batch_size
        self.last_batch_size = 0
        self.batch_sizes: Counter[int] = Counter()
        self.recent_batch_sizes: deque[int] = deque(maxlen=history)

    def run(self, inputs: Sequence[ItemInput]) -> list[ItemResult]:
        """Validate, batch and run ``inputs``; results are in input order and never raise.

        Layout (shape, dtype) is checked per item; finiteness is checked on the stacked
        batch, since a per-item ``isfinite`` call dominates the cost of small models.
        """
        results: list[ItemResult | None] = [None] * len(inputs)
        groups: dict[Signature, list[tuple[int, tuple[torch.Tensor, ...]]]] = {}
        for i, item in enumerate(inputs):
            parts, reason = self._validate(item)
            if reason is not None:
                results[i] = ItemResult.fail(reason)
            else:
                groups.setdefault(_signature(parts), []).append((i, parts))

        stacked = [(sig, *self._stack_finite(members, results)) for sig, members in groups.items()]
        stacked = [entry for entry in stacked if entry[1]]
        if stacked:
            # Items must stack, so one signature wins: the most common (first seen on ties).
            chosen = max(range(len(stacked)), key=lambda k: len(stacked[k][1]))
            sig, indices, batch = stacked[chosen]
            for k, (other, other_indices, _) in enumerate(stacked):
                if k != chosen:
                    reason = _mismatch_reason(sig, other)
                    for i in other_indices:
                        results[i] = ItemResult.fail(reason)
            step = self.max_batch_size or len(indices)
            for start in range(0, len(indices), step):
                window = slice(start, start + step)
                chunk = tuple(column[window] for column in batch)
                for i, res in zip(indices[window], self._run_batch(chunk), strict=True):
                    results[i] = res
        return [r if r is not None else ItemResult.fail("internal: no result") for r in results]

    # -- validation -------------------------------------------------------------------

    def _validate(self, item: ItemInput) -> tuple[tuple[torch.Tensor, ...], str | None]:
        """Per-item layout checks (cheap, Python-level); finiteness comes later, batched."""
        parts = item if isinstance(item, tuple) else (item,)
        for part in parts:
            if not isinstance(part, torch.Tensor):
                return parts, f"not a tensor: {type(part).__name__}"
        if self.specs is None:
            return parts, None
        if len(parts) != len(self.specs):
            return parts, f"wrong number of inputs: expected {len(self.specs)}, got {len(parts)}"
        multi = len(self.specs) > 1
        for k, (spec, part) in enumerate(zip(self.specs, parts, strict=True)):
            if (reason := spec.check_layout(part)) is not None:
                return parts, f"input {k}: {reason}" if multi else reason
        return parts, None

    @staticmethod
    def _stack_finite(
        members: list[tuple[int, tuple[torch.Tensor, ...]]],
        results: list[ItemResult | None],
    ) -> tuple[list[int], tuple[torch.Tensor, ...]]:
        """Stack one signature group and drop rows holding NaN/inf (recorded in ``results``)."""
        indices = [i for i, _ in members]
        try:
            columns = tuple(torch.stack(col) for col in zip(*(p for _, p in members), strict=True))
        except Exception as exc:  # e.g. same shape but tensors on different devices
            for i in indices:
                results[i] = ItemResult.fail(f"cannot batch input: {type(exc).__name__}: {exc}")
            return [], ()
        finite: torch.Tensor | None = None
        for col in columns:
            if col.is_floating_point() or col.is_complex():
                rows = torch.isfinite(col) if col.ndim == 1 else torch.isfinite(col.flatten(1))
                row_ok = rows if col.ndim == 1 else rows.all(dim=1)
                finite = row_ok if finite is None else finite & row_ok
        if finite is None or bool(finite.all()):
            return indices, columns
        keep: list[int] = []
        for i, ok in zip(indices, finite.tolist(), strict=True):
            if ok:
                keep.append(i)
            else:
                results[i] = ItemResult.fail("non-finite values in input")
        return keep, tuple(col[finite] for col in columns)

    # -- inference --------------------------------------------------------------------

    def _run_batch(self, batch: tuple[torch.Tensor, ...]) -> list[ItemResult]:
        """One forward call; any exception or malformed output fails every item in it."""
        n = batch[0].shape[0]
        self.last_batch_size = n
        self.batch_sizes[n] += 1
        self.recent_batch_sizes.append(n)
        try:
            out = self.model(batch if len(batch) > 1 else batch[0])
            if out.ndim == 0 or out.shape[0] != n:
                raise ValueError(f"output shape {tuple(out.shape)} does not match batch of {n}")
            rows = out.detach().reshape(n, -1).to(torch.float64)
        except Exception as exc:
            reason = f"model error: {type(exc).__name__}: {_last_line(exc)}"
            return [ItemResult.fail(reason) for _ in range(n)]
        return self._postprocess(rows)

    def _postprocess(self, rows: torch.Tensor) -> list[ItemResult]:
        """Turn an (n, k) float64 output into per-item results, vectorised over the batch."""
        n, width = rows.shape
        nan = torch.isnan(rows).any(dim=1).tolist()
        inf = torch.isinf(rows).any(dim=1).tolist()
        if self.output in _SCALAR_KINDS and width != 1:
            reason = f"model error: output {self.output!r} needs 1 value per item, got {width}"
            return [ItemResult.fail(reason) for _ in range(n)]
        if self.output == "softmax" and width < 2:
            reason = f"model error: output 'softmax' needs >= 2 classes per item, got {width}"
            return [ItemResult.fail(reason) for _ in range(n)]

        results: list[ItemResult] = []
        if self.output in _SCALAR_KINDS:
            col = rows[:, 0]
            values = (torch.sigmoid(col) if self.output == "sigmoid" else col).tolist()
            for v, is_nan, is_inf in zip(values, nan, inf, strict=True):
                if is_nan or is_inf:
                    results.append(ItemResult.fail(_non_finite_output(is_nan)))
                elif self.output == "value":
                    results.append(ItemResult(ok=True, output=v, score=v))
                elif not 0.0 <= v <= 1.0:
                    results.append(
                        ItemResult.fail(f"model produced probability out of [0, 1]: {v}")
                    )
                else:
                    label = int(v >= self.threshold)
                    results.append(ItemResult(ok=True, output=v, score=v, label=label))
            return results

        listed = (torch.softmax(rows, dim=1) if self.output == "softmax" else rows).tolist()
        for probs, is_nan, is_inf in zip(listed, nan, inf, strict=True):
            if is_nan or is_inf:
                results.append(ItemResult.fail(_non_finite_output(is_nan)))
            elif self.output == "softmax":
                label = max(range(width), key=probs.__getitem__)
                results.append(ItemResult(ok=True, output=probs, score=probs[label], label=label))
            else:
                results.append(ItemResult(ok=True, output=probs))
        return results


def _signature(parts: tuple[torch.Tensor, ...]) -> Signature:
    return tuple((tuple(p.shape), p.dtype) for p in parts)


def _mismatch_reason(want: Signature, got: Signature) -> str:
    """Say which of shape or dtype keeps an item out of the batch."""
    want_shapes = " + ".join(_fmt_shape(shape) for shape, _ in want)
    got_shapes = " + ".join(_fmt_shape(shape) for shape, _ in got)
    if want_shapes != got_shapes:
        return f"shape differs from batch: expected {want_shapes}, got {got_shapes}"
    want_dtypes = " + ".join(str(dtype) for _, dtype in want)
    got_dtypes = " + ".join(str(dtype) for _, dtype in got)
    return f"dtype differs from batch: expected {want_dtypes}, got {got_dtypes}"


def _non_finite_output(is_nan: bool) -> str:
    return "model produced NaN" if is_nan else "model produced inf"


def _last_line(exc: BaseException) -> str:
    """TorchScript errors carry the interpreter's whole traceback; the cause is last."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""
