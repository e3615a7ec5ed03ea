"""Loading both models on CPU, running them on the example's input vector, and telling the
task from what they return; a pair that cannot be compared is refused naming both.

A one-output model is also run on stretched copies of the example's vector
(:func:`abdag.models.probes.probe_inputs`): when every output lies in [0, 1], it already
ends in a sigmoid, and the DAG reads it with ``output="probability"``, not ``"sigmoid"``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abdag.agents.dag import TASKS
from abdag.agents.errors import DagError
from abdag.init.inputs import InputSpec, input_vector, synthetic_events

if TYPE_CHECKING:
    from abdag.models import LoadedModel

_PROBE_ROWS = 2  # run the models on a batch of two, so a model ignoring the batch shows up

Build = tuple[str | None, dict[str, Any] | None]  # (model_class, model_kwargs) of a state_dict


@dataclass
class _Probe:
    """One model run on the probe batch: its output width, or why it failed."""

    label: str
    model: LoadedModel | None = None
    width: int | None = None
    error: str | None = None
    unit_samples: int = 0  # one output per request, in [0, 1] on this many probe inputs


@dataclass(frozen=True)
class ModelOutputs:
    """What both models return: ``width`` values per request, and per model (A, B) how many
    probe inputs it answered with a value in [0, 1] each, 0 unless it always did (it then
    returns probabilities, not logits)."""

    width: int
    unit_samples: tuple[int, int] = (0, 0)


def _weight_hint(model: LoadedModel) -> str:
    """Guess a model's input width from its first matrix, to make a refusal actionable."""
    try:
        params = getattr(model.module, "parameters", None)
        first = next((p for p in params() if p.ndim == 2), None) if params else None
    except Exception:  # noqa: BLE001 - only a hint
        return ""
    if first is None:
        return ""
    shape = tuple(first.shape)
    return f" (its first weight matrix has shape {shape}: it may expect {shape[1]} values)"


def _reason(exc: BaseException) -> str:
    """One line saying why a model failed; TorchScript puts the real error on its last line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if "TorchScript interpreter" in lines[0] and len(lines) > 1:
        return lines[-1]
    return f"{type(exc).__name__}: {lines[0]}"


def _probe(side: str, path: Path, build: Build, batch: Any) -> _Probe:
    from abdag.models import ModelError, load_model

    probe = _Probe(f"model {side} ({path})")
    try:
        probe.model = load_model(
            path,
            name=f"model_{side.lower()}",
            device="cpu",
            model_class=build[0],
            model_kwargs=build[1],
        )
    except ModelError as exc:
        raise DagError(f"{probe.label} does not load: {exc}") from exc
    rows = batch.shape[0]
    try:
        out = probe.model(batch)
        if out.ndim == 0 or out.shape[0] != rows:
            raise ValueError(
                f"returned shape {tuple(out.shape)} for a batch of {rows}: the first "
                "dimension must be the batch"
            )
        probe.width = int(out.reshape(rows, -1).shape[1])
    except Exception as exc:  # noqa: BLE001 - the user's model; its message is the answer
        probe.error = _reason(exc)
        probe.error += _weight_hint(probe.model)
        return probe
    if probe.width == 1:
        probe.unit_samples = _unit_samples(probe.model, batch)
    return probe


def _unit_samples(model: LoadedModel, batch: Any) -> int:
    """How many probe inputs (the batch's rows and stretched copies of the example) the
    model answered with a value in [0, 1], when it always did; 0 otherwise."""
    from abdag.models.probes import in_unit_interval, probe_inputs, raw_scores

    rows = list(batch)
    scores = raw_scores(model, [*rows, *probe_inputs(rows[0])])
    if scores is None:  # a stretched copy was refused: the batch alone
        scores = raw_scores(model, rows) or []
    return len(scores) if in_unit_interval(scores) else 0


def output_width(paths: tuple[Path, Path], builds: tuple[Build, Build], spec: InputSpec) -> int:
    """Run both models on the example's vector; return the common output width."""
    return probe_models(paths, builds, spec).width


def probe_models(
    paths: tuple[Path, Path], builds: tuple[Build, Build], spec: InputSpec
) -> ModelOutputs:
    """Run both models on the example's vector (and, for one output, stretched copies of
    it); return their common output width and whether each returns probabilities."""
    import torch

    rows = [input_vector(e, spec.fields) for e in synthetic_events(spec.example, _PROBE_ROWS, 0)]
    rows[0] = input_vector(spec.example, spec.fields)
    batch = torch.tensor(rows, dtype=torch.float32)
    a = _probe("A", paths[0], builds[0], batch)
    b = _probe("B", paths[1], builds[1], batch)
    shape = f"(batch, {spec.width})"
    where = f"float32 input of shape {shape} built from {len(spec.fields)} example field(s)"
    if a.error and b.error:
        raise DagError(
            f"neither model accepts the {where} [{spec.fields_text()}]: "
            f"{a.label}: {a.error}; {b.label}: {b.error}"
        )
    if a.error or b.error:
        ok, bad = (b, a) if a.error else (a, b)
        raise DagError(
            f"the models disagree on the input: {ok.label} accepts the {where}, "
            f"{bad.label} refuses it: {bad.error}"
        )
    if a.width != b.width:
        raise DagError(
            f"the models disagree on the output: {a.label} returns shape (batch, {a.width}), "
            f"{b.label} returns (batch, {b.width}) for the same input {shape}; an A/B "
            "comparison needs the same kind of answer from both"
        )
    assert a.width is not None
    return ModelOutputs(a.width, (a.unit_samples, b.unit_samples))


def task_for(width: int, task: str | None, paths: tuple[Path, Path]) -> str:
    """Binary (1 logit), multiclass (k logits) or regression (1 value, only when asked)."""
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    both = f"both models ({paths[0].name}, {paths[1].name}) return {width} value(s) per request"
    if width == 1:
        if task == "multiclass":
            raise DagError(f"task 'multiclass' needs one score per class, but {both}")
        return task or "binary"
    if task in ("binary", "regression"):
        hint = " (a 2-logit binary classifier is --task multiclass)" if width == 2 else ""
        raise DagError(f"task {task!r} needs one value per request, but {both}{hint}")
    return "multiclass"
