"""Onboarding: `abdag init` (two model files -> a validated A/B DAG) and the model registry.

The generated DAG must load and validate as written, feed the models the example's numeric
fields in the example's order, and refuse model pairs that cannot be compared with a
message naming both. The slow test runs the generated DAG on the session stack.
"""

from __future__ import annotations

import hashlib
import json
import sys
import uuid
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from abdag.agents.errors import DagError
from abdag.agents.loader import load_dag
from abdag.agents.topology import dag_topics
from abdag.agents.validate import validate
from abdag.clickhouse import connect
from abdag.comparators.report import build_report
from abdag.demo.fraud import FEATURES, generate
from abdag.init import (
    InitResult,
    init_experiment,
    input_spec_from_example,
    input_vector,
    smoke_run,
    synthetic_events,
)
from abdag.models import ModelError, load_model
from abdag.models.onnx import onnxruntime_available
from abdag.models.registry import ModelRegistry, parse_ref
from abdag.topics import Event


class AnyWidth(nn.Module):
    """Accepts a vector of any length: lets a test choose the input freely."""

    def __init__(self, outputs: int = 1) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = x.sum(dim=1, keepdim=True) * 0.01
        return torch.cat([total * (k + 1) for k in range(self.outputs)], dim=1)


class Tiny(nn.Module):
    """A class for the state_dict registry tests (importable as tests.test_onboarding:Tiny)."""

    def __init__(self, n_in: int = 8) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def scripted(module: nn.Module, path: Path) -> Path:
    torch.jit.script(module.eval()).save(str(path))
    return path


def linear(path: Path, n_in: int, n_out: int, seed: int) -> Path:
    torch.manual_seed(seed)
    return scripted(nn.Linear(n_in, n_out), path)


def fraud_example() -> dict:
    event = generate(1, seed=5)[0][0]
    return {"request_id": event["request_id"], "features": event["features"], "merchant": "acme"}


@pytest.fixture
def three_class(tmp_path) -> tuple[Path, Path]:
    return linear(tmp_path / "cls_a.pt", 8, 3, 1), linear(tmp_path / "cls_b.pt", 8, 3, 2)


# -- abdag init ---------------------------------------------------------------------------


def test_init_from_the_fraud_models_writes_a_dag_that_loads_and_validates(fraud_models, tmp_path):
    out = tmp_path / "exp"
    result = init_experiment("fraud_init", *fraud_models, example=fraud_example(), out_dir=out)
    assert isinstance(result, InitResult)
    assert result.dag_file == out / "fraud_init_dag.py"
    assert (result.task, result.output, result.output_width) == ("binary", "sigmoid", 1)
    assert result.experiment == "fraud_init.ab"
    assert result.models == (out / "models" / "fraud_a.pt", out / "models" / "fraud_b.pt")
    for copy, original in zip(result.models, fraud_models, strict=True):
        assert copy.read_bytes() == original.read_bytes()
    assert any("merchant (str)" in note for note in result.notes)

    dag = load_dag(result.dag_file)
    validate(dag)
    assert [n.name for n in dag.topological()] == ["requests", "labels", "model_a", "model_b", "ab"]
    assert dag.nodes["model_a"].path == str(out / "models" / "fraud_a.pt")
    assert dag.nodes["ab"].task == "binary" and dag.nodes["ab"].labels == "labels"

    topics = json.loads(result.topics_file.read_text())
    assert topics == {"dag": "fraud_init", "partitions": 4, "topics": dag_topics(dag)}
    compose = yaml.safe_load(result.compose_file.read_text())
    worker = compose["services"]["worker"]
    assert worker["command"][:3] == ["abdag", "worker", "/dags/fraud_init_dag.py"]
    assert worker["volumes"] == [f"{out.resolve()}:/dags:ro"]

    with pytest.raises(DagError, match="already exists"):
        init_experiment("fraud_init", *fraud_models, example=fraud_example(), out_dir=out)
    init_experiment("fraud_init", *fraud_models, example=fraud_example(), out_dir=out, force=True)


def test_the_generated_input_follows_the_example_order(tmp_path):
    model = scripted(AnyWidth(), tmp_path / "any.pt")
    example = {
        "request_id": "r1",
        "zeta": 1.5,
        "user": {"age": 31, "country": "FR", "vip": True},
        "alpha": 2,
        "embedding": [0.1, 0.2, 0.3],
        "items": [{"price": 9.5, "sku": "x"}, {"price": 3.0, "sku": "y"}],
        "note": None,
    }
    result = init_experiment("order", model, model, example=example, out_dir=tmp_path / "o")
    expected = ["zeta", "user.age", "user.vip", "alpha", "embedding", "items.0.price"]
    expected.append("items.1.price")
    assert list(result.input_spec.fields) == expected
    assert result.input_spec.width == 9
    assert "FIELDS = [" in result.dag_file.read_text()

    dag = load_dag(result.dag_file)
    payload = {k: v for k, v in example.items() if k != "request_id"}
    x = dag.nodes["model_a"].build_input(Event("r1", 0.0, payload))
    want = [1.5, 31.0, 1.0, 2.0, 0.1, 0.2, 0.3, 9.5, 3.0]
    assert x.dtype == torch.float32 and x.tolist() == pytest.approx(want)
    assert input_vector(payload, result.input_spec.fields) == pytest.approx(want)
    # Synthetic events keep the shape of the example and are reproducible per seed.
    events = synthetic_events(payload, 5, seed=3)
    assert events == synthetic_events(payload, 5, seed=3)
    assert [input_spec_from_example(e).fields for e in events] == [result.input_spec.fields] * 5


def test_a_schema_gives_the_fields_in_written_order(tmp_path):
    model = scripted(AnyWidth(), tmp_path / "any.pt")
    schema = {
        "type": "object",
        "properties": {
            "amount": {"type": "number", "examples": [12.5]},
            "name": {"type": "string"},
            "geo": {
                "type": "object",
                "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90}},
            },
            "count": {"type": "integer", "default": 3},
            "vec": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
    }
    result = init_experiment("schema", model, model, schema=schema, out_dir=tmp_path / "s")
    assert result.input_spec.fields == ("amount", "geo.lat", "count", "vec")
    assert result.input_spec.width == 5
    assert result.input_spec.origin == "schema"
    validate(load_dag(result.dag_file))


def test_a_three_class_pair_becomes_a_multiclass_dag(three_class, tmp_path):
    example = {f: 0.5 for f in FEATURES}
    result = init_experiment("three", *three_class, example=example, out_dir=tmp_path / "m")
    assert (result.task, result.output, result.output_width) == ("multiclass", "softmax", 3)
    dag = load_dag(result.dag_file)
    validate(dag)
    assert dag.nodes["ab"].task == "multiclass" and dag.nodes["model_b"].output == "softmax"
    with pytest.raises(DagError, match=r"task 'binary' needs one value.*cls_a\.pt, cls_b\.pt"):
        init_experiment(
            "three2", *three_class, example=example, task="binary", out_dir=tmp_path / "m2"
        )


def test_one_output_with_task_regression_reads_values(tmp_path):
    a, b = linear(tmp_path / "r_a.pt", 4, 1, 1), linear(tmp_path / "r_b.pt", 4, 1, 2)
    example = {"x": [1.0, 2.0, 3.0, 4.0]}
    result = init_experiment("reg", a, b, example=example, task="regression", out_dir=tmp_path)
    assert (result.task, result.output) == ("regression", "value")
    validate(load_dag(result.dag_file))


def test_state_dicts_are_rebuilt_from_their_class_in_the_generated_dag(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    torch.save(Tiny(n_in=3).state_dict(), weights)
    example = {"a": 1.0, "b": 2.0, "c": 3.0}
    with pytest.raises(DagError, match=r"model A \(.*tiny\.pt\) does not load.*model_class"):
        init_experiment("sd", weights, weights, example=example, out_dir=tmp_path / "sd")
    cls, kwargs = "tests.test_onboarding:Tiny", {"n_in": 3}
    result = init_experiment(
        "sd",
        weights,
        weights,
        example=example,
        out_dir=tmp_path / "sd",
        model_class_a=cls,
        model_class_b=cls,
        model_kwargs_a=kwargs,
        model_kwargs_b=kwargs,
    )
    dag = load_dag(result.dag_file)
    assert dag.nodes["model_b"].model_class == cls and dag.nodes["model_b"].model_kwargs == kwargs


def test_models_disagreeing_on_the_input_width_are_named_with_their_shapes(fraud_models, tmp_path):
    seven = linear(tmp_path / "seven.pt", 7, 1, 3)
    with pytest.raises(DagError) as info:
        init_experiment(
            "bad_in", fraud_models[1], seven, example=fraud_example(), out_dir=tmp_path / "x"
        )
    message = str(info.value)
    assert "model A" in message and "fraud_b.pt" in message
    assert "model B" in message and "seven.pt" in message
    assert "(batch, 8)" in message and "(1, 7)" in message and "expect 7 values" in message
    assert not (tmp_path / "x" / "bad_in_dag.py").exists()


def test_models_disagreeing_on_the_output_width_are_named_with_their_shapes(three_class, tmp_path):
    one = linear(tmp_path / "one.pt", 8, 1, 4)
    example = {f: 0.5 for f in FEATURES}
    with pytest.raises(DagError) as info:
        init_experiment("bad_out", one, three_class[0], example=example, out_dir=tmp_path / "y")
    message = str(info.value)
    assert "output" in message and "one.pt" in message and "cls_a.pt" in message
    assert "(batch, 1)" in message and "(batch, 3)" in message


def test_neither_model_accepting_the_example_says_so(fraud_models, tmp_path):
    example = {"features": {f: 0.1 for f in FEATURES[:5]}}
    with pytest.raises(DagError, match=r"neither model accepts.*\(batch, 5\).*fraud_a.*fraud_b"):
        init_experiment("none", *fraud_models, example=example, out_dir=tmp_path)
    with pytest.raises(ValueError, match="no numeric field"):
        init_experiment("none", *fraud_models, example={"s": "text"}, out_dir=tmp_path)


@pytest.mark.slow
def test_init_then_smoke_run_pairs_every_request_on_the_stack(
    stack, fraud_models, tmp_path, capsys
):
    name = f"onb{uuid.uuid4().hex[:8]}"
    result = init_experiment(name, *fraud_models, example=fraud_example(), out_dir=tmp_path)
    counts = smoke_run(result.dag_file, stack, n=100, timeout=90)
    assert counts["paired"] == 100 and counts["labelled"] == 100
    assert counts["missing_a"] == counts["missing_b"] == 0 and counts["rows"] == 100
    # it said what it was doing, step by step, and how far the pairs had come
    progress = capsys.readouterr().err.splitlines()
    steps = [
        f"smoke run: creating the DAG's topics on the broker at {stack.broker}",
        f"smoke run: starting a worker (log: {tmp_path / f'{name}.smoke.log'})",
        f"smoke run: producing 100 events and 100 labels (abdag.{name}.requests.in)",
        f"smoke run: sent; waiting for 100 pairs in ClickHouse (experiment {name}.ab)",
        "smoke run: worker ready (",
    ]
    for step in steps:
        assert any(line.startswith(step) for line in progress), (step, progress)
    done = "smoke run: 100/100 pairs in ClickHouse, 100/100 labelled"
    assert any(line.startswith(done) for line in progress), progress
    # the worker's log (its stdout and stderr) is plain text: Faust's spinner and colours
    # are for terminals only
    log = (tmp_path / f"{name}.smoke.log").read_bytes()
    assert f"abdag worker ready (DAG {name})".encode() in log
    assert b"\x1b" not in log and b"\x08" not in log
    report = build_report(connect(stack), result.experiment, n_resamples=100)
    assert report.counts["paired"] == 100
    assert report.verdict.to_dict()


# -- the model registry -------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry")


def test_versions_increment_and_record_their_metadata(registry, fraud_models):
    spec = {"kind": "flat_float32", "width": 8, "fields": FEATURES}
    v1 = registry.register("fraud", fraud_models[0], task="binary", input_spec=spec)
    v2 = registry.register("fraud", fraud_models[1], task="binary")
    assert (v1.version, v2.version) == ("v1", "v2")
    assert [v.version for v in registry.versions("fraud")] == ["v1", "v2"]
    assert registry.latest("fraud") == v2 and registry.names() == ["fraud"]
    assert v1.path == registry.root / "fraud" / "v1" / "fraud_a.pt"
    assert v1.path.read_bytes() == fraud_models[0].read_bytes()

    meta = json.loads((registry.root / "fraud" / "v1" / "meta.json").read_text())
    assert meta["name"] == "fraud" and meta["version"] == "v1"
    assert meta["format"] == "torchscript" and meta["source"] == "fraud_a.pt"
    assert meta["sha256"] == hashlib.sha256(fraud_models[0].read_bytes()).hexdigest()
    assert meta["task"] == "binary" and meta["input_spec"] == spec
    assert meta["model_class"] is None and meta["file"] == "fraud_a.pt"
    created = datetime.fromisoformat(meta["created"])
    assert created.utcoffset().total_seconds() == 0
    assert registry.versions("unknown") == []


def test_registering_the_same_bytes_again_returns_the_existing_version(registry, fraud_models):
    first = registry.register("fraud", fraud_models[0], task="binary")
    again = registry.register("fraud", fraud_models[0])
    assert again == first and len(registry.versions("fraud")) == 1
    with pytest.raises(ModelError, match=r"already registered as fraud@v1 with task 'binary'"):
        registry.register("fraud", fraud_models[0], task="regression")


def test_references_resolve_to_files(registry, fraud_models):
    registry.register("fraud", fraud_models[0])
    registry.register("fraud", fraud_models[1])
    v1, v2 = (
        registry.root / "fraud" / "v1" / "fraud_a.pt",
        registry.root / "fraud" / "v2" / "fraud_b.pt",
    )
    assert registry.resolve("fraud") == v2 and registry.resolve("fraud@latest") == v2
    assert registry.resolve("fraud@v1") == v1 and registry.resolve("fraud@1") == v1
    assert registry.path("fraud") == v2 and registry.path("fraud", "v1") == v1
    assert parse_ref("a.b-c@v12") == ("a.b-c", "v12")
    for bad in ("fraud@", "@v1", "fraud@x", "fraud@v0", "9lives", "a/b"):
        with pytest.raises(ModelError, match="must look like"):
            registry.resolve(bad)
    with pytest.raises(ModelError, match=r"has no version v3 \(versions: v1, v2\)"):
        registry.resolve("fraud@v3")
    with pytest.raises(ModelError, match=r"no model 'other'.*registered: fraud"):
        registry.resolve("other")


def test_load_gives_the_same_outputs_as_the_file(registry, fraud_models, tmp_path):
    registry.register("fraud", fraud_models[0])
    torch.manual_seed(0)
    state = tmp_path / "tiny_state.pt"
    torch.save(Tiny().state_dict(), state)
    registry.register("tiny", state, model_class="tests.test_onboarding:Tiny")
    x = torch.randn(16, len(FEATURES))

    loaded = registry.load("fraud")
    assert loaded.format == "torchscript" and loaded.name == "fraud"
    assert torch.equal(loaded(x), load_model(fraud_models[0], device="cpu")(x))
    tiny = registry.load("tiny", "v1")
    want = load_model(state, device="cpu", model_class="tests.test_onboarding:Tiny")(x)
    assert tiny.format == "state_dict" and torch.equal(tiny(x), want)

    registry.path("fraud").write_bytes(b"tampered")
    with pytest.raises(ModelError, match="modified after registration"):
        registry.load("fraud")


def test_a_state_dict_without_its_class_is_refused(registry, tmp_path):
    state = tmp_path / "weights.pt"
    torch.save(Tiny().state_dict(), state)
    with pytest.raises(ModelError, match="plain state_dict.*model_class"):
        registry.register("tiny", state)
    with pytest.raises(ModelError, match="does not match"):
        registry.register(
            "tiny", state, model_class="tests.test_onboarding:Tiny", model_kwargs={"n_in": 7}
        )
    assert registry.versions("tiny") == []


def test_onnx_without_onnxruntime_says_how_to_install_it(registry, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were not installed
    assert not onnxruntime_available()
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"\x08\x07\x12\x07pytorch")  # an ONNX header; not runnable
    version = registry.register("onnx_model", fake)
    assert version.format == "onnx"
    with pytest.raises(ModelError, match=r"install abdag\[onnx\] \(onnxruntime\)"):
        registry.load("onnx_model")
    (tmp_path / "not.onnx").write_bytes(b"PK\x03\x04")
    with pytest.raises(ModelError, match="not an ONNX model"):
        registry.register("onnx_model", tmp_path / "not.onnx")


def test_onnx_models_load_and_match_torch(registry, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1)).eval()
    path = tmp_path / "mlp.onnx"
    try:
        torch.onnx.export(
            model,
            (torch.randn(2, 8),),
            str(path),
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
            dynamo=False,
        )
    except Exception as exc:  # noqa: BLE001 - say which part of the export failed
        pytest.fail(f"torch could not export the ONNX model (the test extra pins onnx): {exc}")
    registry.register("mlp", path, task="binary")
    loaded = registry.load("mlp")
    x = torch.randn(5, 8)
    assert loaded.format == "onnx"
    assert torch.allclose(loaded(x), model(x).detach(), atol=1e-5)
