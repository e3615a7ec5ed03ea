"""The model input of a generated DAG: which payload fields, in which order, and synthetic
events jittered from an example.

A generated DAG file imports :func:`synthetic_events` from here at run time, so this module
stays light: the standard library only.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any

_RESERVED = ("request_id", "ts")  # read by abdag itself (abdag.topics.records.request_from_raw)


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

    def fields_text(self, limit: int = 10) -> str:
        """The first ``limit`` field names, comma-separated, with the total when cut."""
        shown = ", ".join(self.fields[:limit])
        more = len(self.fields) > limit
        return shown + (f", ... ({len(self.fields)} in all)" if more else "")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float)  # bool is an int: counted as 0/1


def input_spec_from_example(example: dict[str, Any]) -> InputSpec:
    """The input fields of an example event, in the documented order (``abdag.init``)."""
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

    payload = {k: v for k, v in example.items() if k not in _RESERVED}
    walk(payload, "")
    if not fields:
        raise ValueError(
            "the example event has no numeric field to build a model input from "
            f"(skipped: {', '.join(skipped) or 'nothing'})"
        )
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
    ``syn-<seed>-<i>``. Used by the generated DAG's sampler and by the smoke run.
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
