"""`abdag -h` and `abdag COMMAND -h` explain every command and every argument, and
`abdag models list` on an empty registry says so instead of printing nothing."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
from torch import nn

from abdag import cli


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = (), listed: str | None = None
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str | None]]:
    """Every parser under ``parser`` (nested subcommands too) with its path and the help
    its parent lists it with."""
    yield path, parser, listed
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name), helps.get(name))


def test_every_command_and_argument_has_help():
    walked = list(commands(cli.build_parser()))
    paths = [path for path, _, _ in walked]
    assert ("worker",) in paths and ("models", "register") in paths and ("models", "list") in paths
    missing = []
    for path, parser, listed in walked:
        name = " ".join(("abdag", *path))
        if path and not (listed or "").strip():
            missing.append(f"{name}: no help in its parent's list of commands")
        if not (parser.description or "").strip():
            missing.append(f"{name}: no description")
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not (action.help or "").strip():
                missing.append(f"{name}: {'/'.join(action.option_strings) or action.dest}")
        assert parser.format_help()  # `abdag ... -h` renders
    assert missing == []


def test_command_help_starts_with_what_abdag_lists():
    by_path = {path: (parser, listed) for path, parser, listed in commands(cli.build_parser())}
    parser, listed = by_path[("init",)]
    assert listed == "write a runnable A/B DAG for two model files, and check it"
    assert parser.description == "Write a runnable A/B DAG for two model files, and check it."
    assert "the DAG file (a Python file that builds a Dag)" in by_path[("worker",)][0].format_help()


def test_models_list_on_an_empty_registry_says_how_to_add_one(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ABDAG_MODEL_REGISTRY", raising=False)
    data = tmp_path / "data"
    assert cli.main(["--data-dir", str(data), "models", "list"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"no models registered in {data / 'registry'}; "
        "add one with: abdag models register NAME FILE"
    )

    model = tmp_path / "m.pt"
    torch.jit.script(nn.Linear(2, 1).eval()).save(str(model))
    assert cli.main(["--data-dir", str(data), "models", "register", "tiny", str(model)]) == 0
    capsys.readouterr()
    assert cli.main(["--data-dir", str(data), "models", "list"]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("tiny@v1") and "no models registered" not in listed
