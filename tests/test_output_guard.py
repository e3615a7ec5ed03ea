"""The guard on ``output="sigmoid"``: a model that already returns probabilities, declared
``"sigmoid"``, has every score squashed a second time (every score in [0.5, 0.73], every
prediction 1) without any error. `abdag topics` and `abdag worker` say so in one line
naming the node and the model file, from the dry run on the sample event and stretched
copies of it; a worker without a sample event says so after the node's first requests;
`abdag init` reads such a model with ``output="probability"`` itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from abdag import cli, commands
from abdag.agents.loader import load_dag
from abdag.agents.nodes.model import FIRST_REQUESTS_CHECKED, ModelSlot, output_warnings
from abdag.agents.validate import validate
from abdag.settings import Settings

EXAMPLE = {"x": [1.0, 2.0, 3.0]}

DAG = """
import torch
from abdag import Dag

dag = Dag("guard", partitions=2)
src = dag.source("requests"{example})

def vector(event):
    return torch.tensor(event.payload["x"], dtype=torch.float32)

{models}
"""


class EndsInSigmoid(nn.Module):
    """Returns probabilities: what a classifier trained with BCELoss often ships as."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.linear = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(x))


class SmallLogits(nn.Module):
    """Returns logits, in [0, 1] near the example (0.56 there) but not beyond it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)
        with torch.no_grad():
            self.linear.weight.fill_(0.01)
            self.linear.bias.fill_(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def scripted(module: nn.Module, path: Path) -> Path:
    torch.jit.script(module.eval()).save(str(path))
    return path


@pytest.fixture
def models(tmp_path) -> dict[str, Path]:
    return {
        "probabilities": scripted(EndsInSigmoid(), tmp_path / "ends_in_sigmoid.pt"),
        "logits": scripted(SmallLogits(), tmp_path / "small_logits.pt"),
    }


def dag_file(tmp_path: Path, nodes: dict[str, Path], *, example: bool = True) -> Path:
    lines = [
        f'{name} = dag.model("{name}", src, path={str(path)!r}, inputs=vector, output="sigmoid")'
        for name, path in nodes.items()
    ]
    text = DAG.format(example=", example=EXAMPLE" if example else "", models="\n".join(lines))
    path = tmp_path / "guard_dag.py"
    path.write_text(f"EXAMPLE = {EXAMPLE!r}\n" + text)
    return path


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "warning:" in line]


def test_the_logit_model_really_is_in_0_1_on_the_sample(models):
    """What makes the next test meaningful: one sample cannot tell the two models apart."""
    x = torch.tensor([EXAMPLE["x"]])
    for path in models.values():
        out = float(torch.jit.load(str(path))(x))
        assert 0.0 <= out <= 1.0


def test_topics_and_worker_warn_about_a_sigmoid_ending_model_declared_sigmoid(
    models, tmp_path, monkeypatch, capsys
):
    dag = dag_file(tmp_path, {"model_p": models["probabilities"], "model_l": models["logits"]})
    monkeypatch.setattr("abdag.topics.admin.ensure_topics", lambda *a, **k: [])  # no broker
    assert cli.main(["topics", str(dag)]) == 0
    (line,) = warnings_in(capsys.readouterr().err)
    assert line.startswith("abdag topics: warning: node model_p: model ")
    assert f"model {models['probabilities']} returns values in [0, 1]" in line
    assert 'declare output="probability" for it' in line
    assert "model_l" not in line and str(models["logits"]) not in line

    # the worker dry-runs the models the same way before Faust starts
    commands._load_valid_dag(str(dag), command="worker")
    (line,) = warnings_in(capsys.readouterr().err)
    assert line.startswith("abdag worker: warning: node model_p: model ")
    assert str(models["probabilities"]) in line


def test_a_logit_model_gives_no_warning(models, tmp_path, monkeypatch, capsys):
    dag = dag_file(tmp_path, {"model_l": models["logits"]})
    monkeypatch.setattr("abdag.topics.admin.ensure_topics", lambda *a, **k: [])
    assert cli.main(["topics", str(dag)]) == 0
    assert warnings_in(capsys.readouterr().err) == []
    loaded = load_dag(dag)
    validate(loaded)
    assert output_warnings(loaded) == []


def test_without_a_sample_event_the_worker_warns_once_after_the_first_requests(models, tmp_path):
    dag = load_dag(
        dag_file(
            tmp_path,
            {"model_p": models["probabilities"], "model_l": models["logits"]},
            example=False,
        )
    )
    validate(dag)  # no sample event: nothing to dry-run the models on
    assert output_warnings(dag) == []
    settings = Settings(data_dir=tmp_path)
    torch.manual_seed(0)
    inputs = [torch.randn(3) * 100 for _ in range(FIRST_REQUESTS_CHECKED)]

    slot = ModelSlot(dag.nodes["model_p"], settings)
    assert slot.watch is not None
    half = FIRST_REQUESTS_CHECKED // 2
    assert slot.watch.see(slot.runner.run(inputs[:half])) is None  # too few requests yet
    warning = slot.watch.see(slot.runner.run(inputs[half:]))
    assert warning is not None and warning.startswith("node model_p: model ")
    assert str(models["probabilities"]) in warning
    assert f"on its first {FIRST_REQUESTS_CHECKED} requests" in warning
    assert slot.watch.see(slot.runner.run(inputs)) is None  # once

    logits = ModelSlot(dag.nodes["model_l"], settings)
    assert logits.watch is not None
    assert logits.watch.see(logits.runner.run(inputs)) is None and logits.watch.done

    judged = load_dag(dag_file(tmp_path, {"model_p": models["probabilities"]}))
    validate(judged)  # the dry run has warned already: nothing left to watch
    assert ModelSlot(judged.nodes["model_p"], settings).watch is None


def test_init_reads_a_probability_model_with_output_probability(
    models, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("ABDAG_DATA_DIR", str(tmp_path / "data"))
    example = tmp_path / "event.json"
    example.write_text(json.dumps({"request_id": "r-1", **EXAMPLE}))
    out = tmp_path / "exp"
    argv = ["init", "guarded", "--a", str(models["logits"]), "--b", str(models["probabilities"])]
    argv += ["--example", str(example), "--out", str(out), "--no-check"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out

    text = (out / "guarded_dag.py").read_text()
    assert text.count('output="probability"') == 1 and text.count('output="sigmoid"') == 1
    dag = load_dag(out / "guarded_dag.py")
    assert dag.nodes["model_a"].output == "sigmoid"  # logits, as it returns
    assert dag.nodes["model_b"].output == "probability"
    assert "task:         binary (output 'sigmoid' for A, 'probability' for B" in printed
    note = next(line for line in printed.splitlines() if "node model_b" in line)
    assert note.startswith("note: node model_b: model ")
    assert "ends_in_sigmoid.pt returns values in [0, 1]" in note
    assert 'output="probability"' in note

    validate(dag)  # as written, the DAG has nothing to warn about
    assert output_warnings(dag) == []
