"""The worked examples under examples/: they load, validate, compute and run on the stack.

Also: a broken DAG file fails validation with a message that names the file and the node
(and the line, for a syntax error), never later in a worker.
"""

from __future__ import annotations

import base64
import importlib.util
import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from abdag.agents import Comparison, Dag, DagError, ModelNode, Source
from abdag.agents.loader import load_dag
from abdag.agents.validate import validate
from abdag.settings import Settings
from abdag.topics import Event, node_topic, request_from_raw
from tests.workers import read_topic, start_worker, stop_worker

ROOT = Path(__file__).resolve().parent.parent
MULTIMODAL = ROOT / "examples" / "multimodal"
MULTIMODAL_DAG = MULTIMODAL / "dag.py"


def _import(path: Path, name: str) -> ModuleType:
    """Import an example's helper module by path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mm() -> ModuleType:
    return _import(MULTIMODAL / "make_models.py", "multimodal_make_models")


@pytest.fixture(scope="module")
def mm_models(mm: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The multimodal example's four models, built once for this module (about 2 s)."""
    folder = tmp_path_factory.mktemp("multimodal-models")
    mm.build(folder)
    return folder


@pytest.fixture
def mm_dag(mm_models: Path, monkeypatch: pytest.MonkeyPatch) -> Dag:
    monkeypatch.setenv("ABDAG_EXAMPLE_MODELS", str(mm_models))
    dag = load_dag(MULTIMODAL_DAG)
    validate(dag)  # loads every model and dry-runs the example event through all nodes
    return dag


# -- the multimodal example ---------------------------------------------------------------
def test_multimodal_dag_validates_in_chain_order(mm_dag: Dag, mm_models: Path) -> None:
    order = [n.name for n in mm_dag.topological()]
    assert order == [
        "listings",
        "clicks",
        "image",
        "text_a",
        "text_b",
        "fusion",
        "fusion__text_b",
        "ctr_ab",
    ]
    nodes = mm_dag.nodes
    assert nodes["text_a"].inputs == nodes["text_b"].inputs == ("image",)
    assert nodes["fusion"].inputs == ("text_a",)
    assert all(str(nodes[n].path).startswith(str(mm_models)) for n in ("image", "text_b"))
    assert str(nodes["text_b"].path).endswith(".pt2")
    assert {n.output for n in mm_dag.of_kind(ModelNode)} == {"raw", "sigmoid"}
    source = nodes["listings"]
    assert isinstance(source, Source) and source.sampler is not None
    assert source.example is not None


def test_multimodal_shadow_copies_fusion_to_read_text_b(mm_dag: Dag) -> None:
    shadow = mm_dag.nodes["fusion__text_b"]
    fusion = mm_dag.nodes["fusion"]
    assert isinstance(shadow, ModelNode) and isinstance(fusion, ModelNode)
    assert shadow.inputs == ("text_b",)
    assert shadow.replaces == "fusion"
    assert (shadow.path, shadow.output) == (fusion.path, fusion.output)
    probe = Event("r", 0.0, {}, {"image": {"output": [0.5]}, "text_b": {"output": [1.0, 2.0]}})
    image, text = shadow.build_input(probe)
    assert image.tolist() == [0.5] and text.tolist() == [1.0, 2.0]
    compare = mm_dag.nodes["ctr_ab"]
    assert isinstance(compare, Comparison)
    assert (compare.a, compare.b, compare.labels, compare.task) == (
        "fusion",
        "fusion__text_b",
        "clicks",
        "binary",
    )


def _run_in_process(dag: Dag, raw_events: list[dict[str, Any]]) -> dict[str, list[Event]]:
    """Each node's output events, computed the way a worker does, without Kafka."""
    from abdag.models import BatchRunner, load_model

    streams: dict[str, list[Event]] = {}
    for node in dag.topological():
        if isinstance(node, Source):
            streams[node.name] = [request_from_raw(orjson.dumps(e), None, 0.0) for e in raw_events]
        elif isinstance(node, ModelNode):
            upstream = streams[node.inputs[0]]
            model = load_model(node.path, name=node.name, device="cpu")
            runner = BatchRunner(model, None, node.output, threshold=node.threshold)
            results = runner.run([node.build_input(e) for e in upstream])
            assert all(r.ok for r in results), [r.reason for r in results if not r.ok][:3]
            streams[node.name] = [
                Event(e.request_id, e.ts, e.payload, {**e.outputs, node.name: {"output": r.output}})
                for e, r in zip(upstream, results, strict=True)
            ]
    return streams


def test_multimodal_branches_compute_on_their_own_text_model(mm_dag: Dag, mm: ModuleType) -> None:
    streams = _run_in_process(mm_dag, mm.sample_events(20, seed=5))
    a, b = streams["fusion"], streams["fusion__text_b"]
    assert all(set(e.outputs) == {"image", "text_a", "fusion"} for e in a)
    assert all(set(e.outputs) == {"image", "text_b", "fusion__text_b"} for e in b)
    assert all(len(e.outputs["image"]["output"]) == mm.EMBED for e in a)
    # B's fusion score is the fusion model applied to the image and *text_b* embeddings.
    fusion = torch.jit.load(str(mm_dag.nodes["fusion"].path))
    image = torch.tensor([e.outputs["image"]["output"] for e in b])
    text_b = torch.tensor([e.outputs["text_b"]["output"] for e in b])
    expected = torch.sigmoid(fusion(image.float(), text_b.float())).flatten().tolist()
    got = [e.outputs["fusion__text_b"]["output"] for e in b]
    assert got == pytest.approx(expected, abs=1e-6)
    scores_a = [e.outputs["fusion"]["output"] for e in a]
    assert all(0.0 <= s <= 1.0 for s in scores_a + got)
    assert scores_a != pytest.approx(got, abs=1e-6), "B's branch should see other embeddings"


def test_multimodal_models_come_in_both_formats(mm_models: Path) -> None:
    from abdag.models import detect_format

    formats = {p.name: detect_format(p) for p in mm_models.iterdir()}
    assert formats == {
        "image.pt": "torchscript",
        "text_a.pt": "torchscript",
        "text_b.pt2": "export",
        "fusion.pt": "torchscript",
    }


def test_sample_events_are_deterministic_listings(mm: ModuleType) -> None:
    events = mm.sample_events(30, seed=3)
    assert events == mm.sample_events(30, seed=3)
    assert events != mm.sample_events(30, seed=4)
    assert len({e["request_id"] for e in events}) == 30
    img = mm.image_array(events[0]["image"])
    assert img.shape == (3, 16, 16) and img.dtype == np.float32
    assert img.min() >= 0.0 and img.max() <= 1.0
    clicks = mm.sample_clicks(events, seed=3)
    assert [c["request_id"] for c in clicks] == [e["request_id"] for e in events]
    assert {c["label"] for c in clicks} <= {0, 1}


def test_tokenizer_hashes_words_into_a_fixed_length(mm: ModuleType) -> None:
    ids = mm.tokenize("Red  vintage HANDBAG!")
    assert ids == mm.tokenize("red vintage handbag")
    assert len(ids) == mm.MAX_TOKENS and ids[3:] == [0] * (mm.MAX_TOKENS - 3)
    assert all(0 < i < mm.VOCAB for i in ids[:3]) and len(set(ids[:3])) == 3
    long = mm.tokenize(" ".join(f"w{i}" for i in range(40)))
    assert len(long) == mm.MAX_TOKENS and 0 not in long
    assert mm.tokenize("") == [0] * mm.MAX_TOKENS


def test_netpbm_decoder_reads_ppm_pgm_and_resizes(mm: ModuleType) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    assert np.array_equal(mm.decode_netpbm(mm.encode_ppm(rgb)), rgb)
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    pgm = b"P5\n# a comment\n4 3\n255\n" + gray.tobytes()
    assert np.array_equal(mm.decode_netpbm(pgm), np.repeat(gray[:, :, None], 3, axis=2))
    wide = b"P5 2 1 65535\n" + np.array([0, 65535], dtype=">u2").tobytes()
    assert mm.decode_netpbm(wide)[0, :, 0].tolist() == [0, 255]
    resized = mm.image_array(base64.b64encode(mm.encode_ppm(rgb)).decode())
    assert resized.shape == (3, 16, 16)
    for bad in (b"P3\n1 1\n255\n0 0 0", b"P6\n2 2\n255\n\x00"):
        with pytest.raises(ValueError):
            mm.decode_netpbm(bad)


def test_multimodal_token_ids_as_floats_fail_validation_on_the_text_node(
    mm_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = MULTIMODAL_DAG.read_text().replace("dtype=torch.int64", "dtype=torch.float32")
    assert broken != MULTIMODAL_DAG.read_text()
    (tmp_path / "make_models.py").write_text((MULTIMODAL / "make_models.py").read_text())
    dag_file = tmp_path / "dag.py"
    dag_file.write_text(broken)
    monkeypatch.setenv("ABDAG_EXAMPLE_MODELS", str(mm_models))
    with pytest.raises(DagError) as info:
        validate(load_dag(dag_file))
    message = str(info.value)
    assert f"file {dag_file}" in message and "node 'text_a'" in message
    assert "refused the sample input" in message and "FloatTensor" in message


# -- validation errors name the file and the node -----------------------------------------
BROKEN_TEMPLATE = """\
import torch
from abdag import Dag

dag = Dag("broken")
src = dag.source("events", example={{"request_id": "r1", "x": [1.0, 2.0, 3.0, 4.0]}})


def features(event):
    return torch.tensor(event.payload["x"], dtype=torch.float32)


{body}
"""
BODY_LINE = BROKEN_TEMPLATE.splitlines().index("{body}") + 1
MODEL = 'dag.model("score", {input}, path={path!r}, inputs={inputs}, output="sigmoid")'


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TorchScript logistic model over 4 float32 features."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 1).eval()), str(path))
    return path


def _broken(case: str, tiny: Path, tmp_path: Path) -> tuple[str, str | None, list[str]]:
    """(DAG body, node the error must name, fragments the message must hold) for ``case``."""

    def model(input: str = "src", path: Path = tiny, inputs: str = "features") -> str:
        return MODEL.format(input=input, path=str(path), inputs=inputs)

    not_a_model = tmp_path / "weights.pt"
    not_a_model.write_bytes(b"these are not weights")
    cases: dict[str, tuple[str, str | None, list[str]]] = {
        "cycle": (
            'dag.transform("first", "second", lambda p: p)\n'
            'dag.transform("second", "first", lambda p: p)',
            "first",
            ["cycle: first -> second -> first"],
        ),
        "unknown input": (model(input='"nowhere"'), "score", ["unknown input 'nowhere'"]),
        "duplicate name": (model() + "\n" + model(), "score", ["duplicate node name"]),
        "model does not load": (
            model(path=not_a_model),
            "score",
            ["model does not load", "not a model file", str(not_a_model)],
        ),
        "wrong shape": (
            model(inputs="lambda e: features(e)[:3]"),
            "score",
            ["refused the sample input", "shapes cannot be multiplied (1x3 and 4x1)"],
        ),
        "wrong dtype": (
            model(inputs="lambda e: features(e).double()"),
            "score",
            ["refused the sample input", "must have the same dtype, but got Double and Float"],
        ),
        "syntax error": (
            "def oops(:\n    pass",
            None,
            [f"syntax error on line {BODY_LINE}"],
        ),
    }
    return cases[case]


@pytest.mark.parametrize(
    "case",
    [
        "cycle",
        "unknown input",
        "duplicate name",
        "model does not load",
        "wrong shape",
        "wrong dtype",
        "syntax error",
    ],
)
def test_validation_errors_name_the_node_and_the_file(
    case: str, tiny_model: Path, tmp_path: Path
) -> None:
    body, node, fragments = _broken(case, tiny_model, tmp_path)
    dag_file = tmp_path / "broken_dag.py"
    dag_file.write_text(BROKEN_TEMPLATE.format(body=body))
    with pytest.raises(DagError) as info:
        validate(load_dag(dag_file))
    message = str(info.value)
    assert message.startswith(f"file {dag_file}"), message
    if node is not None:
        assert f"node {node!r}" in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_the_broken_template_itself_validates(tiny_model: Path, tmp_path: Path) -> None:
    """So each broken variant above fails for its own reason, not the template's."""
    dag_file = tmp_path / "ok_dag.py"
    body = MODEL.format(input="src", path=str(tiny_model), inputs="features")
    dag_file.write_text(BROKEN_TEMPLATE.format(body=body))
    validate(load_dag(dag_file))


# -- end to end on the session stack ------------------------------------------------------
def _read_while_alive(
    bootstrap: str, node: str, worker: subprocess.Popen, deadline: float, expect: int = 200
) -> list[tuple[int, bytes | None, dict]]:
    """A node's topic from the start, re-read every few seconds until it holds ``expect``
    request ids, the deadline passes or the worker dies (fail fast, with its log)."""
    while True:
        left = deadline - time.monotonic()
        records = read_topic(
            bootstrap,
            node_topic("multimodal", node),
            expect=expect,
            timeout=max(1.0, min(5.0, left)),
        )
        done = len({v["request_id"] for _, _, v in records}) >= expect
        if done or left <= 5.0 or worker.poll() is not None:
            return records


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_multimodal_end_to_end_both_branches_score_every_listing(
    stack: Settings,
    stack_env: dict[str, str],
    mm: ModuleType,
    mm_models: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One worker runs all seven nodes; both fusion branches score every listing, each on
    its own text model's embedding (the README's `abdag worker` + `abdag produce`)."""
    from abdag.cli import main as abdag

    env = {**stack_env, "ABDAG_EXAMPLE_MODELS": str(mm_models)}
    for name, value in env.items():
        if name.startswith("ABDAG_"):
            monkeypatch.setenv(name, value)  # for the in-process `abdag produce`
    deadline = time.monotonic() + 60
    log_file = tmp_path / "worker.log"
    worker = start_worker(MULTIMODAL_DAG, env, log_file)
    outputs: dict[str, dict[str, dict]] = {}
    try:
        produce = ["produce", str(MULTIMODAL_DAG), "--source", "listings", "--synthetic", "200"]
        assert abdag([*produce, "--seed", "11"]) == 0
        for node in ("fusion", "fusion__text_b"):
            records = _read_while_alive(stack.broker, node, worker, deadline)
            outputs[node] = {v["request_id"]: v["outputs"] for _, _, v in records}
    finally:
        stop_worker(worker, timeout=5)  # SIGTERM, then SIGKILL: keeps the test bounded
    log = log_file.read_text(errors="replace")[-3000:]
    sent = {e["request_id"] for e in mm.sample_events(200, seed=11)}
    a, b = outputs.get("fusion", {}), outputs.get("fusion__text_b", {})
    assert set(a) == sent, f"A: {len(set(a) & sent)} of 200\n{log}"
    assert set(b) == sent, f"B: {len(set(b) & sent)} of 200\n{log}"
    for rid in sent:
        assert set(a[rid]) == {"image", "text_a", "fusion"}
        assert set(b[rid]) == {"image", "text_b", "fusion__text_b"}
        assert 0.0 <= a[rid]["fusion"]["score"] <= 1.0
        assert 0.0 <= b[rid]["fusion__text_b"]["score"] <= 1.0
        assert a[rid]["image"]["output"] == b[rid]["image"]["output"]  # one image node
        assert b[rid]["fusion__text_b"]["version"] == a[rid]["fusion"]["version"]  # same file
        assert b[rid]["text_b"]["version"] != a[rid]["text_a"]["version"]
    differ = sum(a[r]["fusion"]["score"] != b[r]["fusion__text_b"]["score"] for r in sent)
    assert differ > 150, f"only {differ} of 200 scores differ between A and B"
