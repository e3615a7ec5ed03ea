"""Every setting is declared once (abdag/settings.py): the README's table lists exactly
them, a bad value names its variable, and the model registry is where workers read it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from abdag.agents.dag import ModelNode
from abdag.agents.model_source import resolve
from abdag.settings import SETTINGS, Settings

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_configuration_table_lists_every_setting_and_only_them():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration") :].split("\n\n")[1]
    listed = re.findall(r"^\| `(ABDAG_\w+)` \|", table, flags=re.M)
    assert listed == list(SETTINGS)


def test_no_module_reads_an_abdag_variable_but_the_settings():
    readers = []
    for path in ROOT.glob("*/**/*.py"):
        if path.parts[len(ROOT.parts)] in (".venv", "tests", "bench", "build", "examples"):
            continue  # examples are a user's DAG files: they may read what they like
        text = path.read_text()
        if re.search(r"environ(\.get\(|\[)\s*[\"']ABDAG_\w+[\"']\s*[),\]](?!\s*=[^=])", text):
            readers.append(str(path.relative_to(ROOT)))
    assert readers == [], f"read ABDAG_* through abdag.settings.Settings: {readers}"


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("ABDAG_SESSION_TIMEOUT", "soon", "ABDAG_SESSION_TIMEOUT must be a number, got 'soon'"),
        ("ABDAG_TORCH_THREADS", "2.5", "ABDAG_TORCH_THREADS must be a whole number, got '2.5'"),
        (
            "ABDAG_BROKER_KIND",
            "kfk",
            "ABDAG_BROKER_KIND must be one of ['tansu', 'kafka'], got 'kfk'",
        ),
        (
            "ABDAG_ON_BROKER_LOSS",
            "x",
            "ABDAG_ON_BROKER_LOSS must be one of ['resume', 'stop'], got 'x'",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_its_variable(tmp_path, variable, value, says):
    got = subprocess.run(
        [sys.executable, "-m", "abdag.cli", "status"],
        env={"PATH": "/usr/bin:/bin", variable: value, "ABDAG_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert got.returncode == 2 and "Traceback" not in got.stderr
    assert got.stderr.strip() == f"abdag status: {says}"


def test_models_register_writes_where_workers_read_the_registry(tmp_path, fraud_models):
    registry = tmp_path / "elsewhere"
    env = {"PATH": "/usr/bin:/bin", "ABDAG_MODEL_REGISTRY": str(registry)}
    env["ABDAG_DATA_DIR"] = str(tmp_path / "data")
    got = subprocess.run(
        [sys.executable, "-m", "abdag.cli", "models", "register", "fraud", str(fraud_models[0])],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert got.returncode == 0, got.stderr
    assert not (tmp_path / "data" / "registry").exists()
    settings = Settings.from_env(env)
    source = resolve(ModelNode("m", ("tx",), path="registry:fraud"), settings)
    assert Path(source.path).is_relative_to(registry)
