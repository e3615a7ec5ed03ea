"""One import namespace: abdag's modules import as abdag.*, so a user's own models/, agents/
or topics/ package (common in ML repositories) never shadows them."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from abdag.demo.fraud import generate
from abdag.topics import input_topic
from abdag.topics.producer import produce
from tests.experiments import wait_for_counts
from tests.workers import stop_worker

pytestmark = pytest.mark.slow

DAG = """
from abdag import Dag
from abdag.demo.fraud import features_tensor, generate
from models.mine import HELLO  # the user's own models/ package, beside the DAG file

assert HELLO == "mine"
dag = Dag({name!r}, partitions=4)
tx = dag.source("tx", sampler=lambda n, seed: generate(n, seed)[0])
a = dag.model("model_a", tx, path={a!r}, inputs=lambda e: features_tensor(e.payload))
b = dag.model("model_b", tx, path={b!r}, inputs=lambda e: features_tensor(e.payload))
dag.compare("ab", a=a, b=b, task="binary")
"""


def _users_folder(root: Path) -> None:
    """A folder with packages named like abdag's folders, each of them not abdag's."""
    for pkg in ("models", "agents", "topics", "comparators"):
        (root / pkg).mkdir()
        (root / pkg / "__init__.py").write_text("raise ImportError('the user package')\n")
    (root / "models" / "__init__.py").write_text("")
    (root / "models" / "mine.py").write_text("HELLO = 'mine'\n")


def test_a_dag_and_a_worker_work_from_a_folder_with_the_users_own_packages(
    stack, stack_env, tmp_path, fraud_models
):
    _users_folder(tmp_path)
    name = f"ns{uuid.uuid4().hex[:8]}"
    (tmp_path / "dag.py").write_text(
        DAG.format(name=name, a=str(fraud_models[0]), b=str(fraud_models[1]))
    )
    # the user's folder first on the path, as running `python -m ...` from it puts it
    env = {**stack_env, "PYTHONPATH": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    topics = subprocess.run(
        [sys.executable, "-m", "abdag.cli", "topics", "dag.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert topics.returncode == 0, topics.stderr[-2000:]
    log = open(tmp_path / "worker.log", "ab")  # noqa: SIM115 - the child owns it
    worker = subprocess.Popen(
        [sys.executable, "-m", "abdag.cli", "worker", "dag.py", "--loglevel", "warn"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        events, _ = generate(20, seed=81)
        produce(stack.broker, input_topic(name, "tx"), events, progress=False)
        counts = wait_for_counts(stack, f"{name}.ab", paired=20, timeout=120)
    finally:
        stop_worker(worker)
    assert counts["paired"] == 20 and counts["rows"] == 20


def test_a_dag_file_written_for_the_old_top_level_packages_gets_a_hint(tmp_path):
    old = tmp_path / "old_dag.py"
    old.write_text("from agents import Dag\ndag = Dag('x')\n")
    got = subprocess.run(  # from the user's folder: no agents/ package there
        [sys.executable, "-m", "abdag.cli", "topics", "old_dag.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert got.returncode == 2 and "Traceback" not in got.stderr, got.stderr
    assert "No module named 'agents'" in got.stderr
    assert "a DAG file starts with `from abdag import Dag`" in got.stderr


def test_every_package_folder_is_in_the_distribution():
    """A non-editable install (the Docker image's ``pip install .``) ships only the packages
    pyproject.toml lists: a subpackage missing there imports in a checkout and fails in
    the image."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = set()
    for package, folder in tool["package-dir"].items():
        for init in (root / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(root / folder).parts
            if "__pycache__" not in rel:
                found.add(".".join((package, *rel)))
    assert found <= listed, sorted(found - listed)
