"""``abdag init``: from two model files to a runnable, validated A/B DAG in one command.

:func:`init_experiment` inspects both models on CPU and writes everything a first experiment
needs next to each other in ``out_dir``::

    <name>_dag.py                 the DAG: source ``requests``, labels ``labels``, model nodes
                                  ``model_a`` / ``model_b`` and the comparison ``ab``
    models/                       copies of both model files (the DAG points here)
    <name>.topics.json            the DAG's topics and partition count
    docker-compose.<name>.yml     a compose override running a worker for this DAG

**The input vector.** The models get one float32 vector per request, made of the numeric
fields of the request's JSON payload, in this order (recorded in the DAG file as ``FIELDS``
so that serving never depends on dict ordering at run time):

* depth first, in the example's own key order (JSON document order); nested objects give
  dotted paths (``features.amount``), items of lists of objects give their index
  (``items.0.price``);
* numbers and booleans (as 0/1) are one value each; a list of numbers is one field that
  contributes all its elements (``embedding`` -> as many values as the list is long);
* strings, nulls and empty lists are skipped (listed in ``InitResult.notes``), and so are
  the top-level ``request_id`` and ``ts``, which abdag reads itself.

With a JSON Schema instead of an example, fields come from ``properties`` in their written
order (``number``/``integer``/``boolean``; arrays of numbers need ``minItems ==
maxItems``) and an example is made from ``examples``, ``default`` or the bounds.

**The task.** Both models run on the vector: one output per request means a binary
classifier (logit, read through a sigmoid) unless ``task="regression"``; ``k > 1`` outputs
mean a ``k``-class classifier (logits, read through a softmax). Models that disagree on
the input or the output are refused with both names and shapes.

:func:`smoke_run` then runs the DAG on a running stack with a worker process and synthetic
traffic, and checks that every request reached ClickHouse as an A/B pair.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.dag import TASKS, Comparison, Dag, ModelNode, Source
from agents.errors import DagError
from comparators.schema import DEAD_LETTER_COUNT
from topics import check_name

if TYPE_CHECKING:
    from abdag.settings import Settings
    from models import LoadedModel

__all__ = [
    "COMPARISON",
    "LABELS",
    "MODEL_A",
    "MODEL_B",
    "SOURCE",
    "InitResult",
    "InputSpec",
    "SmokeError",
    "init_experiment",
    "input_spec_from_example",
    "input_spec_from_schema",
    "input_vector",
    "smoke_run",
    "synthetic_events",
]

SOURCE = "requests"
LABELS = "labels"
MODEL_A = "model_a"
MODEL_B = "model_b"
COMPARISON = "ab"
OUTPUT_OF_TASK = {"binary": "sigmoid", "multiclass": "softmax", "regression": "value"}

_RESERVED = ("request_id", "ts")  # read by abdag itself (topics.records.request_from_raw)
_PROBE_ROWS = 2  # run the models on a batch of two, so a model ignoring the batch shows up


# -- the input vector ---------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """Which payload fields make the model input, in order, and how many values each gives."""

    fields: tuple[str, ...]
    widths: tuple[int, ...]
    skipped: tuple[str, ...] = ()
    origin: str = "example"  # "example" or "schema"
    example: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def width(self) -> int:
        """Length of the float32 vector the models receive."""
        return sum(self.widths)

    def summary(self) -> dict[str, Any]:
        """JSON-safe description, for the CLI and the model registry's ``input_spec``."""
        return {
            "kind": "flat_float32",
            "width": self.width,
            "fields": list(self.fields),
            "widths": list(self.widths),
            "skipped": list(self.skipped),
            "origin": self.origin,
        }


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float)  # bool is an int: counted as 0/1


def input_spec_from_example(example: dict[str, Any]) -> InputSpec:
    """The input fields of an example event, in the documented order (module docstring)."""
    if not isinstance(example, dict):
        raise ValueError(f"the example event must be a JSON object, got {type(example).__name__}")
    fields: list[tuple[str, int]] = []
    skipped: list[str] = []

    def walk(value: Any, path: str) -> None:
        if _is_number(value):
            fields.append((path, 1))
        elif isinstance(value, dict):
            for key, inner in value.items():
                if not isinstance(key, str) or not key or "." in key:
                    raise ValueError(
                        f"example field {key!r} under {path or 'the top level'!r}: field names "
                        "must be non-empty and contain no '.' (dots separate nested fields)"
                    )
                walk(inner, f"{path}.{key}" if path else key)
        elif isinstance(value, list) and value and all(_is_number(v) for v in value):
            fields.append((path, len(value)))
        elif isinstance(value, list) and value:
            for i, inner in enumerate(value):
                walk(inner, f"{path}.{i}")
        else:
            kind = "empty list" if isinstance(value, list) else type(value).__name__
            skipped.append(f"{path} ({kind})")

    walk({k: v for k, v in example.items() if k not in _RESERVED}, "")
    if not fields:
        raise ValueError(
            "the example event has no numeric field to build a model input from "
            f"(skipped: {', '.join(skipped) or 'nothing'})"
        )
    payload = {k: v for k, v in example.items() if k not in _RESERVED}
    return InputSpec(
        fields=tuple(p for p, _ in fields),
        widths=tuple(w for _, w in fields),
        skipped=tuple(skipped),
        origin="example",
        example=payload,
    )


def _schema_value(prop: dict[str, Any], path: str) -> Any:
    """An example value for one JSON Schema property (None: not a model input)."""
    kinds = prop.get("type")
    kinds = set(kinds) if isinstance(kinds, list) else {kinds}
    if "object" in kinds or "properties" in prop:
        return _schema_object(prop, path)
    if "array" in kinds:
        items = prop.get("items") or {}
        n_min, n_max = prop.get("minItems"), prop.get("maxItems")
        if n_min is None or n_min != n_max or not n_min:
            return None
        return [_schema_value(items, f"{path}.{i}") for i in range(n_min)]
    if kinds & {"number", "integer", "boolean"}:
        for key in ("examples", "default"):
            given = prop.get(key)
            given = given[0] if key == "examples" and isinstance(given, list) and given else given
            if _is_number(given):
                return given
        low, high = prop.get("minimum"), prop.get("maximum")
        if "boolean" in kinds:
            return False
        if _is_number(low) and _is_number(high):
            mid = (low + high) / 2
            return round(mid) if "integer" in kinds else mid
        value = low if _is_number(low) else (high if _is_number(high) else 0)
        return int(value) if "integer" in kinds else float(value)
    return None


def _schema_object(schema: dict[str, Any], path: str) -> dict[str, Any]:
    props = schema.get("properties")
    if not isinstance(props, dict):
        raise ValueError(f"schema object {path or '(top level)'!r} has no 'properties' mapping")
    return {
        name: _schema_value(prop if isinstance(prop, dict) else {}, f"{path}.{name}")
        for name, prop in props.items()
    }


def input_spec_from_schema(schema: dict[str, Any]) -> InputSpec:
    """Input fields from a JSON Schema (``properties`` in written order), with an example."""
    if not isinstance(schema, dict):
        raise ValueError(f"the schema must be a JSON object, got {type(schema).__name__}")
    example = _schema_object(schema, "")
    spec = input_spec_from_example(example)
    skipped = tuple(s.replace("(NoneType)", "(not numeric in the schema)") for s in spec.skipped)
    return InputSpec(spec.fields, spec.widths, skipped, "schema", spec.example)


def _lookup(payload: Any, path: str) -> Any:
    for key in path.split("."):
        payload = payload[int(key)] if isinstance(payload, list) else payload[key]
    return payload


def input_vector(payload: dict[str, Any], fields: tuple[str, ...] | list[str]) -> list[float]:
    """The payload's ``fields`` as floats, in order (what the generated ``features`` does)."""
    values: list[float] = []
    for path in fields:
        value = _lookup(payload, path)
        if isinstance(value, list):
            values.extend(float(v) for v in value)
        else:
            values.append(float(value))
    return values


def synthetic_events(example: dict[str, Any], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` copies of ``example`` with every numeric value jittered (deterministic per seed).

    Floats move by about 10 % of their size (plus 0.1), integers are rounded, values that
    were >= 0 stay >= 0 (counts, amounts) and booleans flip one time in ten. Request ids are
    ``syn-<seed>-<i>``. Used by the generated DAG's sampler and by :func:`smoke_run`.
    """
    rng = random.Random(seed)

    def jitter(value: Any) -> Any:
        if isinstance(value, bool):
            return (not value) if rng.random() < 0.1 else value
        if isinstance(value, int | float):
            moved = value + 0.1 * (abs(value) + 1.0) * rng.gauss(0.0, 1.0)
            moved = max(moved, 0.0) if value >= 0 else moved
            return round(moved) if isinstance(value, int) else round(moved, 6)
        if isinstance(value, dict):
            return {k: jitter(v) for k, v in value.items()}
        if isinstance(value, list):
            return [jitter(v) for v in value]
        return copy.deepcopy(value)

    base = {k: v for k, v in example.items() if k not in _RESERVED}
    return [{"request_id": f"syn-{seed}-{i}", **jitter(base)} for i in range(n)]


# -- inspecting the models ----------------------------------------------------------------


@dataclass
class _Probe:
    """One model run on the probe batch: its output width, or why it failed."""

    label: str
    model: LoadedModel | None = None
    width: int | None = None
    error: str | None = None


def _label(side: str, path: Path) -> str:
    return f"model {side} ({path})"


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


Build = tuple[str | None, dict[str, Any] | None]  # (model_class, model_kwargs) of a state_dict


def _probe(side: str, path: Path, build: Build, batch: Any) -> _Probe:
    from models import ModelError, load_model

    probe = _Probe(_label(side, path))
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


def _inspect(paths: tuple[Path, Path], builds: tuple[Build, Build], spec: InputSpec) -> int:
    """Run both models on the example's vector; return the common output width."""
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
            f"neither model accepts the {where} [{_fields_text(spec)}]: "
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
    return a.width


def _fields_text(spec: InputSpec, limit: int = 10) -> str:
    shown = ", ".join(spec.fields[:limit])
    return shown + (f", ... ({len(spec.fields)} in all)" if len(spec.fields) > limit else "")


def _reason(exc: BaseException) -> str:
    """One line saying why a model failed; TorchScript puts the real error on its last line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if "TorchScript interpreter" in lines[0] and len(lines) > 1:
        return lines[-1]
    return f"{type(exc).__name__}: {lines[0]}"


def _task_for(width: int, task: str | None, paths: tuple[Path, Path]) -> str:
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


# -- writing the files --------------------------------------------------------------------


@dataclass(frozen=True)
class InitResult:
    """What ``abdag init`` wrote and decided; ``notes`` are things the user should check."""

    name: str
    dag_file: Path
    models: tuple[Path, Path]
    topics_file: Path
    compose_file: Path
    input_spec: InputSpec
    task: str
    output: str
    output_width: int
    notes: tuple[str, ...] = ()

    @property
    def experiment(self) -> str:
        """The experiment name ClickHouse and ``abdag report`` know it by."""
        return f"{self.name}.{COMPARISON}"

    def render(self) -> str:
        """A few lines for the terminal."""
        spec = self.input_spec
        lines = [
            f"DAG file:     {self.dag_file}",
            f"models:       {self.models[0]}, {self.models[1]}",
            f"input:        float32 vector of {spec.width} from {len(spec.fields)} field(s): "
            f"{_fields_text(spec, 6)}",
            f"task:         {self.task} (output {self.output!r}, {self.output_width} value(s))",
            f"topics:       {self.topics_file}",
            f"compose:      {self.compose_file}",
            f"experiment:   {self.experiment}",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _copy_models(paths: tuple[Path, Path], models_dir: Path) -> tuple[Path, Path]:
    """Copy both files into ``models/`` (keeping names; prefixed a_/b_ when they clash)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    names = [p.name for p in paths]
    if names[0] == names[1] and paths[0].resolve() != paths[1].resolve():
        names = [f"a_{names[0]}", f"b_{names[1]}"]
    copies = []
    for src, name in zip(paths, names, strict=True):
        dest = models_dir / name
        if not (dest.exists() and dest.resolve() == src.resolve()):
            shutil.copy2(src, dest)
        copies.append(dest)
    return copies[0], copies[1]


_DAG_TEMPLATE = '''\
"""A/B experiment "{name}": production model A against retrained model B.

Generated by `abdag init` on {created}; edit freely (the DAG API: agents/dag.py).
Send request events (JSON objects) to source "{source}" and ground truth
({{"request_id": ..., "label": ...}}) to "{labels}"; node "{comparison}" pairs A and B
per request, and `abdag report {name}.{comparison}` gives the verdict.
"""

import torch

from agents import Dag
from agents.generate import synthetic_events

# The model input: these payload fields, in this order, as one float32 vector of {width}
# values. Dots reach into nested objects, numbers index lists; a field holding a list of
# numbers contributes all of them.
FIELDS = {fields}

# One request as seen at init time: validation dry-runs both models on it, and
# `abdag produce --synthetic N` sends jittered copies of it.
EXAMPLE = {example}

dag = Dag("{name}", partitions={partitions})
requests = dag.source(
    "{source}", example=EXAMPLE, sampler=lambda n, seed: synthetic_events(EXAMPLE, n, seed)
)
labels = dag.labels("{labels}")

_PATHS = [path.split(".") for path in FIELDS]


def features(event):
    """The FIELDS of the payload as a float32 vector (a missing field fails that request)."""
    values = []
    for path in _PATHS:
        value = event.payload
        for key in path:
            value = value[int(key)] if isinstance(value, list) else value[key]
        if isinstance(value, list):
            values.extend(value)
        else:
            values.append(value)
    return torch.tensor(values, dtype=torch.float32)


{model_lines}
dag.compare("{comparison}", a=a, b=b, labels=labels, task="{task}")
'''


def _literal(value: Any, indent: int = 0, used: int = 0) -> str:
    """A JSON value as Python source, one item per line when it does not fit in 100 columns
    (black style); ``used`` is how many columns the line already holds."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float):
        return repr(value)
    pad = indent + 4
    if isinstance(value, dict):
        keys = [f"{json.dumps(k, ensure_ascii=False)}: " for k in value]
        inner = [
            k + _literal(v, pad, pad + len(k)) for k, v in zip(keys, value.values(), strict=True)
        ]
        opening, closing = "{", "}"
    else:
        inner = [_literal(v, pad, pad) for v in value]
        opening, closing = "[", "]"
    flat = opening + ", ".join(inner) + closing
    if "\n" not in flat and used + len(flat) + 1 <= 100:
        return flat
    body = "".join(f"{' ' * pad}{item},\n" for item in inner)
    return f"{opening}\n{body}{' ' * indent}{closing}"


def _model_line(var: str, node: str, path: str, output: str, build: Build) -> str:
    args = [json.dumps(node), "requests", f"path={json.dumps(path)}", "inputs=features"]
    args.append(f'output="{output}"')
    if build[0]:
        args.append(f"model_class={json.dumps(build[0])}")
    if build[1]:
        args.append(f"model_kwargs={_literal(build[1], 4, 4 + len('model_kwargs='))}")
    line = f"{var} = dag.model({', '.join(args)})"
    if len(line) <= 100 and "\n" not in line:
        return line
    return f"{var} = dag.model(\n" + "".join(f"    {a},\n" for a in args) + ")"


def _dag_text(
    name: str,
    spec: InputSpec,
    task: str,
    output: str,
    model_files: tuple[str, str],
    builds: tuple[Build, Build],
    partitions: int,
) -> str:
    models = "\n".join(
        _model_line(var, node, path, output, build)
        for var, node, path, build in zip(
            ("a", "b"), (MODEL_A, MODEL_B), model_files, builds, strict=True
        )
    )
    return _DAG_TEMPLATE.format(
        name=name,
        created=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        source=SOURCE,
        labels=LABELS,
        comparison=COMPARISON,
        width=spec.width,
        fields=_literal(list(spec.fields), used=len("FIELDS = ")),
        example=_literal(spec.example, used=len("EXAMPLE = ")),
        partitions=partitions,
        model_lines=models,
        task=task,
    )


def _compose_text(name: str, out_dir: Path) -> str:
    mount = json.dumps(f"{out_dir.resolve()}:/dags:ro")
    command = json.dumps(["abdag", "worker", f"/dags/{name}_dag.py", "--loglevel", "warn"])
    return f"""\
# Workers for the {name!r} A/B DAG, generated by `abdag init`. Use it on top of the
# project's docker-compose.yml (one DAG per compose project, hence -p):
#   docker compose -p {name.lower()} -f docker-compose.yml -f {out_dir}/docker-compose.{name}.yml \\
#       up -d --scale worker=2
# It changes only the worker service: its command and the folder mounted at /dags (this
# folder, an absolute path on this machine: edit it when the folder moves).
services:
  worker:
    command: {command}
    volumes:
      - {mount}
"""


def init_experiment(
    name: str,
    model_a: Path,
    model_b: Path,
    *,
    example: dict[str, Any] | None = None,
    schema: dict[str, Any] | None = None,
    task: str | None = None,
    out_dir: Path,
    model_class_a: str | None = None,
    model_class_b: str | None = None,
    model_kwargs_a: dict[str, Any] | None = None,
    model_kwargs_b: dict[str, Any] | None = None,
    partitions: int = 4,
    force: bool = False,
) -> InitResult:
    """Inspect two models, write a DAG comparing them (plus topics and compose files) and
    validate it. Raises :class:`DagError` (a ValueError) naming both models on a mismatch.

    ``model_class_*``/``model_kwargs_*`` rebuild state_dict files (as in ``dag.model``);
    ``force`` allows overwriting an existing ``<name>_dag.py``; without it an earlier
    (possibly hand-edited) DAG file is never replaced.
    """
    try:
        check_name("DAG", name)
    except ValueError as exc:
        raise DagError(str(exc)) from None
    if (example is None) == (schema is None):
        raise ValueError("give exactly one of example (an event) or schema (a JSON Schema)")
    paths = (Path(model_a), Path(model_b))
    for side, path in zip("AB", paths, strict=True):
        if not path.is_file():
            raise DagError(f"model {side} ({path}): no such file")
    spec = input_spec_from_example(example) if example is not None else None
    spec = spec or input_spec_from_schema(schema or {})
    out_dir = Path(out_dir)
    dag_file = out_dir / f"{name}_dag.py"
    if dag_file.exists() and not force:
        raise DagError(f"{dag_file} already exists; remove it or pass --force to replace it")

    builds = ((model_class_a, model_kwargs_a), (model_class_b, model_kwargs_b))
    width = _inspect(paths, builds, spec)
    task = _task_for(width, task, paths)
    output = OUTPUT_OF_TASK[task]

    out_dir.mkdir(parents=True, exist_ok=True)
    copies = _copy_models(paths, out_dir / "models")
    relative = tuple(str(p.relative_to(out_dir)) for p in copies)
    dag_file.write_text(
        _dag_text(name, spec, task, output, relative, builds, partitions), encoding="utf-8"
    )

    from agents.loader import load_dag
    from agents.topology import dag_topics
    from agents.validate import validate

    dag = load_dag(dag_file)
    validate(dag)
    topics_file = out_dir / f"{name}.topics.json"
    topics_file.write_text(
        json.dumps(
            {"dag": dag.name, "partitions": dag.partitions, "topics": dag_topics(dag)}, indent=2
        )
        + "\n",
        encoding="utf-8",
    )
    compose_file = out_dir / f"docker-compose.{name}.yml"
    compose_file.write_text(_compose_text(name, out_dir), encoding="utf-8")
    return InitResult(
        name=name,
        dag_file=dag_file,
        models=copies,
        topics_file=topics_file,
        compose_file=compose_file,
        input_spec=spec,
        task=task,
        output=output,
        output_width=width,
        notes=tuple(_notes(spec, task)),
    )


def _notes(spec: InputSpec, task: str) -> list[str]:
    notes = []
    if spec.skipped:
        notes.append(f"not model inputs (not numeric): {', '.join(spec.skipped)}")
    if task == "binary":
        notes.append(
            "output='sigmoid' assumes the models return logits; if they end in a sigmoid "
            "already, change both nodes to output='probability'"
        )
    if task == "multiclass":
        notes.append("output='softmax' assumes the models return logits, one per class")
    if spec.origin == "schema":
        notes.append("EXAMPLE was made from the schema: replace it with a real request")
    return notes


# -- the smoke run ------------------------------------------------------------------------


class SmokeError(DagError):
    """The smoke run did not see every request paired in ClickHouse; ``counts`` says what it
    did see."""

    def __init__(self, message: str, *, file: str, counts: dict[str, Any]) -> None:
        super().__init__(message, file=file)
        self.counts = counts


def _comparison(dag: Dag) -> Comparison:
    comparisons = [n for n in dag.topological() if isinstance(n, Comparison)]
    if not comparisons:
        raise DagError("the DAG has no comparison node (dag.compare) to check", file=dag.file)
    return comparisons[0]


def _smoke_events(source: Source, n: int, seed: int, run: str) -> list[dict[str, Any]]:
    if source.sampler is not None:
        events = source.sampler(n, seed)
    elif source.example is not None:
        events = synthetic_events(source.example, n, seed)
    else:
        raise DagError("the source has no example or sampler to make events from", node=source.name)
    if len(events) < n:
        raise DagError(f"the sampler made {len(events)} events, {n} wanted", node=source.name)
    return [{**e, "request_id": f"smoke-{run}-{i}"} for i, e in enumerate(events[:n])]


def _class_count(dag: Dag, node: ModelNode, event: dict[str, Any]) -> int:
    """k of a multiclass model, from one forward pass (labels must be 0..k-1)."""
    import orjson

    from models import load_model
    from topics import request_from_raw

    model = load_model(
        node.path, device="cpu", model_class=node.model_class, model_kwargs=node.model_kwargs
    )
    x = node.build_input(request_from_raw(orjson.dumps(event), None, time.time()))
    x = tuple(t.unsqueeze(0) for t in x) if isinstance(x, tuple) else x.unsqueeze(0)
    return int(model(x).reshape(1, -1).shape[1])


def _smoke_labels(
    dag: Dag, comp: Comparison, events: list[dict[str, Any]], seed: int
) -> list[dict[str, Any]]:
    rng = random.Random(seed + 1)
    draw: Callable[[], float]
    if comp.task == "binary":
        draw = lambda: rng.randint(0, 1)  # noqa: E731
    elif comp.task == "multiclass":
        k = _class_count(dag, dag.nodes[comp.a], events[0])
        draw = lambda: rng.randrange(k)  # noqa: E731
    else:
        draw = lambda: round(rng.gauss(0.0, 1.0), 6)  # noqa: E731
    return [{"request_id": e["request_id"], "label": draw()} for e in events]


_COUNTS_SQL = (
    "SELECT countIf(status = 'paired'), countIf(stage = 3), countIf(status = 'missing_a'), "
    "countIf(status = 'missing_b'), count() FROM pairs FINAL "
    "WHERE experiment = {e:String} AND startsWith(request_id, {p:String})"
)
_DEAD_SQL = (
    f"SELECT node, reason, {DEAD_LETTER_COUNT} FROM dead_letters "
    "WHERE dag = {d:String} AND startsWith(request_id, {p:String}) GROUP BY node, reason"
)


def _counts(client: Any, experiment: str, dag: str, prefix: str) -> dict[str, Any]:
    try:
        row = client.query(_COUNTS_SQL, parameters={"e": experiment, "p": prefix}).result_rows[0]
    except Exception:  # noqa: BLE001 - the table appears with the first insert
        row = (0, 0, 0, 0, 0)
    counts: dict[str, Any] = dict(
        zip(("paired", "labelled", "missing_a", "missing_b", "rows"), map(int, row), strict=True)
    )
    try:
        dead = client.query(_DEAD_SQL, parameters={"d": dag, "p": prefix}).result_rows
    except Exception:  # noqa: BLE001
        dead = []
    counts["dead_letters"] = {f"{node}: {reason}": int(c) for node, reason, c in dead}
    return counts


def _worker_env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "ABDAG_BROKER": settings.broker,
        "ABDAG_CLICKHOUSE_URL": settings.clickhouse_url,
        "ABDAG_DATA_DIR": str(Path(settings.data_dir).resolve()),
        "ABDAG_DATABASE": settings.database,
        "ABDAG_CLICKHOUSE_USER": settings.clickhouse_user,
        "ABDAG_CLICKHOUSE_PASSWORD": settings.clickhouse_password,
        "PYTHONUNBUFFERED": "1",
    }


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the worker we started (by PID), SIGKILL if it does not stop in 20 s."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _tail(log: Path, lines: int = 8) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def smoke_run(
    dag_file: Path,
    settings: Settings,
    n: int = 100,
    timeout: float = 90,
    *,
    seed: int = 0,
    log: Path | None = None,
) -> dict[str, Any]:
    """Run the DAG on ``n`` synthetic requests (plus labels) with one worker process against
    a running stack, and wait until ClickHouse holds ``n`` labelled A/B pairs.

    Requests get ids ``smoke-<run>-<i>`` so earlier runs of the same DAG never count. The
    worker's output goes to ``log`` (default ``<name>.smoke.log`` next to the DAG file).
    Returns the counts (paired, labelled, missing_a, missing_b, rows, dead_letters, sent,
    seconds, experiment); raises :class:`SmokeError` with the counts when a request did not
    pair in time or the worker stopped.
    """
    from abdag.clickhouse import connect
    from agents.loader import load_dag
    from agents.topology import dag_topics
    from agents.validate import validate
    from comparators.rows import experiment_name
    from topics import input_topic
    from topics.admin import ensure_topics
    from topics.producer import produce

    dag_file = Path(dag_file).resolve()
    dag = load_dag(dag_file)
    validate(dag, load_models=False)  # the worker loads and dry-runs the models itself
    comp = _comparison(dag)
    source = dag.root_source(comp.a)
    if source is None:
        raise DagError("model A's input does not come from a source", file=str(dag_file))
    run = uuid.uuid4().hex[:8]
    prefix = f"smoke-{run}-"
    events = _smoke_events(source, n, seed, run)
    labels = _smoke_labels(dag, comp, events, seed) if comp.labels else []
    experiment = experiment_name(dag.name, comp.name)
    ensure_topics(settings.broker, dag_topics(dag), dag.partitions)
    log = Path(log) if log is not None else dag_file.with_name(f"{dag.name}.smoke.log")
    started = time.monotonic()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "abdag.cli", "worker", str(dag_file), "--loglevel", "warn"],
            env=_worker_env(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        produce(settings.broker, input_topic(dag.name, source.name), events, progress=False)
        if labels:
            produce(settings.broker, input_topic(dag.name, comp.labels), labels, progress=False)
        client = connect(settings)
        deadline = started + timeout
        while True:
            counts = _counts(client, experiment, dag.name, prefix)
            done = counts["paired"] >= n and (not labels or counts["labelled"] >= n)
            decided = counts["paired"] + counts["missing_a"] + counts["missing_b"] >= n
            if done or decided:
                break
            if proc.poll() is not None:
                raise SmokeError(
                    f"the worker exited with code {proc.returncode} after "
                    f"{time.monotonic() - started:.0f} s: {_tail(log)} (log: {log})",
                    file=str(dag_file),
                    counts=counts,
                )
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        _stop(proc)
    counts.update(
        experiment=experiment,
        sent=n,
        labels=len(labels),
        seconds=round(time.monotonic() - started, 1),
    )
    if not (counts["paired"] >= n and (not labels or counts["labelled"] >= n)):
        dead = "; ".join(f"{k} x{v}" for k, v in counts["dead_letters"].items())
        raise SmokeError(
            f"{counts['paired']}/{n} requests paired and {counts['labelled']}/{len(labels)} "
            f"labelled in {counts['seconds']} s (missing_a {counts['missing_a']}, missing_b "
            f"{counts['missing_b']}){'; dead letters: ' + dead if dead else ''} (log: {log})",
            file=str(dag_file),
            counts=counts,
        )
    return counts
