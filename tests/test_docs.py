"""The documentation site (mkdocs.yml, docs/) builds strictly, and what it shows is true.

* ``mkdocs build --strict`` succeeds: no broken link, no page left out of the nav, no
  docstring the API reference cannot render.
* Every ```python block of README.md and docs/writing-a-dag.md that builds a ``Dag`` is
  loaded like a DAG file (``load_dag``, in a folder holding small models at the paths it
  names) and validated with its models loaded and dry-run, as ``abdag worker`` does. A
  block preceded by ``<!-- fragment -->`` is only compiled.
* Every ``abdag ...`` command line of a ```bash block (README.md, docs/*.md) parses with
  abdag's own argument parser (nothing is run).
* The reference pages list what the code declares: every command and option of the parser
  (docs/cli.md), every setting with its default and meaning (docs/configuration.md, and the
  README's table, with one helper), every column of every ClickHouse table with its type
  (docs/tables.md), every metric (docs/statistics.md) and every dashboard endpoint
  (docs/http-api.md).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import pytest

from abdag.agents.dag import Source
from abdag.agents.loader import load_dag
from abdag.agents.validate import validate
from abdag.cli import build_parser
from abdag.comparators.metric_specs import METRICS
from abdag.comparators.schema import TABLES
from abdag.comparators.statistics import EXACT_BELOW
from abdag.settings import SETTINGS, Settings, env_name

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FRAGMENT = "<!-- fragment -->"
EXAMPLE_PAGES = ("README.md", "docs/writing-a-dag.md")
COMMAND_PAGES = ("README.md", *sorted(f"docs/{p.name}" for p in DOCS.glob("*.md")))


# -- reading pages ----------------------------------------------------------------------
def code_blocks(page: str, lang: str) -> list[tuple[int, str, bool]]:
    """``(line, code, is_fragment)`` of each fenced ``lang`` block of a page."""
    lines = (ROOT / page).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == f"```{lang}":
            start = i
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            before = [s.strip() for s in lines[:start] if s.strip()]
            fragment = bool(before) and before[-1] == FRAGMENT
            blocks.append((start + 1, "\n".join(lines[start + 1 : end]) + "\n", fragment))
            i = end
        i += 1
    return blocks


def sections(text: str, level: str = "## ") -> dict[str, str]:
    """The body under each heading of ``level``, by heading text."""
    out: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if line.startswith(level):
            current = line[len(level) :].strip()
            out[current] = ""
        elif current is not None:
            out[current] += line + "\n"
    return out


def tables(text: str) -> dict[str, list[list[str]]]:
    """The body rows (as cells) of each Markdown table in ``text``, by its first header."""
    found: dict[str, list[list[str]]] = {}
    rows: list[list[str]] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            rows = None
        elif re.match(r"^\|\s*-", line):
            continue
        else:
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if rows is None:
                rows = found.setdefault(cells[0], [])
            else:
                rows.append(cells)
    return found


def settings_table(text: str, heading: str) -> list[str]:
    """The configuration table that follows ``heading`` (the first block after it), read
    the way tests/test_settings.py reads the README's."""
    table = text[text.index(heading) :].split("\n\n")[1]
    return [line for line in table.splitlines() if re.match(r"^\| `ABDAG_\w+` \|", line)]


def expected_settings_rows() -> list[str]:
    """One row per declared setting: variable, default, meaning (abdag/settings.py)."""
    rows = []
    for f in fields(Settings):
        if "meaning" not in f.metadata:
            continue
        d = f.default
        default = "none" if d is None else "empty" if d == "" else f"`{d}`"
        rows.append(f"| `{env_name(f.name)}` | {default} | {f.metadata['meaning']} |")
    return rows


# -- (a) the site builds ----------------------------------------------------------------
def test_the_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    got = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert got.returncode == 0, got.stdout + got.stderr
    assert "WARNING" not in got.stderr, got.stderr
    for page in DOCS.glob("*.md"):
        built = site / ("index.html" if page.stem == "index" else f"{page.stem}/index.html")
        assert built.is_file(), f"{page.name} was not built"
    api = (site / "api" / "index.html").read_text()
    for anchor in ("agents.dag.Dag.model", "topics.records.Event", "comparators.verdict.decide"):
        assert f'id="{anchor}"' in api, f"the API reference lacks {anchor}"


# -- (b) the Python examples load and validate ------------------------------------------
def _python_blocks() -> list[tuple[str, int, str, bool]]:
    return [
        (p, line, code, frag)
        for p in EXAMPLE_PAGES
        for line, code, frag in code_blocks(p, "python")
    ]


PYTHON_BLOCKS = _python_blocks()


def _script(module, path: Path) -> None:
    import torch

    with warnings.catch_warnings():  # torch.jit is deprecated but is what abdag loads
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module.eval()).save(str(path))


@pytest.fixture(scope="module")
def dag_folder(tmp_path_factory, fraud_models):
    """A folder with ``models/`` holding every model the pages' examples name: the demo's
    two fraud models and small TorchScript ones for the other output kinds."""
    import torch
    from torch import nn

    folder = tmp_path_factory.mktemp("doc-dags")
    models = folder / "models"
    models.mkdir()
    shutil.copy(fraud_models[0], models / "fraud_a.pt")
    shutil.copy(fraud_models[1], models / "fraud_b.pt")
    torch.manual_seed(0)
    small = {
        "fraud_p": nn.Sequential(nn.Linear(8, 1), nn.Sigmoid()),  # returns a probability
        "kind_a": nn.Linear(8, 3),  # 3-class logits
        "kind_b": nn.Linear(8, 3),
        "amount_a": nn.Linear(8, 1),  # a value
        "amount_b": nn.Linear(8, 1),
        "embed_a": nn.Linear(8, 4),  # raw embeddings
        "embed_b": nn.Linear(8, 4),
        "ranker": nn.Linear(4, 1),  # a logit from an embedding
    }
    for name, module in small.items():
        _script(module, models / f"{name}.pt")
    return folder


def test_the_pages_have_dag_examples():
    loadable = [b for b in PYTHON_BLOCKS if not b[3] and "Dag(" in b[2]]
    assert {p for p, *_ in loadable} == set(EXAMPLE_PAGES)
    assert len(loadable) >= 6


@pytest.mark.parametrize(
    ("page", "line", "code", "fragment"),
    PYTHON_BLOCKS,
    ids=[f"{p}:{line}" for p, line, _, _ in PYTHON_BLOCKS],
)
def test_python_blocks_load_and_validate(page, line, code, fragment, dag_folder):
    compile(code, f"{page}:{line}", "exec")
    if fragment:
        return
    if "Dag(" not in code:
        assert "dag." not in code, (
            f"{page}:{line} uses a DAG without building one: mark it {FRAGMENT}"
        )
        return
    dag_file = dag_folder / f"{Path(page).stem.replace('-', '_')}_{line}.py"
    dag_file.write_text(code)
    dag = load_dag(dag_file)  # as every command reads a DAG file: model paths resolved
    validate(dag)  # models loaded and dry-run on the sources' sample events
    for source in dag.of_kind(Source):  # so every inputs function of the example ran
        assert source.example is not None or source.sampler is not None, source.name


# -- (c) the command lines parse ----------------------------------------------------------
def _tokens(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a bash block (continuations joined, quotes that go on over
    lines followed), as argument lists, redirections left out."""
    commands: list[list[str]] = []
    pending = ""
    for line in code.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            tokens = _tokens(pending)
        except ValueError:  # an open quote: the command goes on on the next line
            continue
        pending = ""
        current: list[str] = []
        skip = False
        for tok in tokens:
            if skip:
                skip = False
            elif set(tok) <= set("();<>|&"):
                if "<" in tok or ">" in tok:  # a redirection: drop `2` and the target
                    if current and current[-1].isdigit():
                        current.pop()
                    skip = True
                else:
                    commands.append(current)
                    current = []
            else:
                current.append(tok)
        commands.append(current)
    assert not pending, f"unclosed quote in: {pending}"
    return [c for c in commands if c]


def abdag_argv(command: list[str]) -> list[str] | None:
    """The arguments after ``abdag`` (or ``python -m abdag``), None for other programs."""
    words = list(command)
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):  # VAR=value abdag ...
        words.pop(0)
    if words and (words[0] == "abdag" or words[0].endswith("/abdag")):
        return words[1:]
    python = len(words) > 2 and Path(words[0]).name.startswith("python") and words[1] == "-m"
    if python and words[2] in ("abdag", "abdag.cli"):
        return words[3:]
    return None


def _command_lines() -> list[tuple[str, int, list[str]]]:
    found = []
    for page in COMMAND_PAGES:
        for line, code, _ in code_blocks(page, "bash"):
            for command in shell_commands(code):
                argv = abdag_argv(command)
                if argv is not None:
                    found.append((page, line, argv))
    return found


COMMAND_LINES = _command_lines()


def test_the_shell_reader_finds_commands_as_bash_would():
    code = 'ABDAG_X=1 abdag worker d.py --loglevel info &  # comment\necho x | abdag sql "a\nb"\n'
    assert [abdag_argv(c) for c in shell_commands(code)] == [
        ["worker", "d.py", "--loglevel", "info"],
        None,
        ["sql", "a\nb"],
    ]
    assert shell_commands("abdag report x.y 2>/dev/null > out.txt\n") == [
        ["abdag", "report", "x.y"]
    ]
    commands = {" ".join(argv[:1]) for _, _, argv in COMMAND_LINES}
    assert {"up", "worker", "produce", "sql", "report", "topics"} <= commands


@pytest.mark.parametrize(
    ("page", "line", "argv"),
    COMMAND_LINES,
    ids=[f"{p}:{line}:{' '.join(a)[:40]}" for p, line, a in COMMAND_LINES],
)
def test_abdag_command_lines_parse(page, line, argv):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{page}:{line}: `abdag {shlex.join(argv)}` does not parse: {err.getvalue()}")
        raise AssertionError from exc  # pragma: no cover


# -- (d) the reference pages list what the code declares --------------------------------
def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                if nested:
                    yield from _subcommands(sub, (*prefix, name))
                else:
                    yield (*prefix, name), sub


def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    """How the page must name each argument: its long option, or its dest in capitals."""
    names = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.option_strings:
            names.append(max(action.option_strings, key=len))
        else:
            names.append(action.dest.upper())
    return names


def test_the_cli_page_names_every_command_and_option():
    parser = build_parser()
    page = sections((DOCS / "cli.md").read_text())
    documented = {h for h in page if h.startswith("abdag ")}
    commands = {"abdag " + " ".join(path): sub for path, sub in _subcommands(parser)}
    assert documented == set(commands), "docs/cli.md sections differ from the parser's commands"
    missing = [
        f"{name}: {arg}"
        for name, sub in commands.items()
        for arg in _arguments(sub)
        if f"`{arg}" not in page[name]
    ]
    missing += [
        f"global: {arg}" for arg in _arguments(parser) if f"`{arg}" not in page["Global options"]
    ]
    assert missing == [], f"docs/cli.md does not name: {missing}"


@pytest.mark.parametrize(
    ("page", "heading"),
    [("README.md", "## Configuration"), ("docs/configuration.md", "## Settings")],
)
def test_the_settings_tables_list_every_setting_with_its_default_and_meaning(page, heading):
    rows = settings_table((ROOT / page).read_text(), heading)
    assert [re.match(r"^\| `(ABDAG_\w+)`", r).group(1) for r in rows] == list(SETTINGS)
    assert rows == expected_settings_rows()


def test_the_tables_page_documents_every_column_of_every_table():
    page = sections((DOCS / "tables.md").read_text())
    documented = {h.strip("`"): body for h, body in page.items()}
    assert set(documented) == set(TABLES), "docs/tables.md sections differ from TABLES"
    for name, table in TABLES.items():
        rows = tables(documented[name])["column"]
        columns = [(r[0].strip("`"), r[1].strip("`")) for r in rows]
        assert columns == list(table.columns), f"docs/tables.md `{name}`"
        assert all(len(r) == 3 and r[2] for r in rows), f"docs/tables.md `{name}`: a meaning"


def test_the_statistics_page_lists_every_metric_and_the_mcnemar_rule():
    text = (DOCS / "statistics.md").read_text()
    rows = {r[0].strip("`"): r for r in tables(sections(text)["The metrics"])["metric"]}
    assert set(rows) == set(METRICS)
    for name, (_, tasks, reads, better, default, _) in rows.items():
        m = METRICS[name]
        assert tuple(t.strip() for t in tasks.split(",")) == m.tasks, name
        assert reads == {"pred": "class", "score": "score"}[m.reads], name
        assert better == ("higher" if m.higher_is_better else "lower"), name
        assert default == ("yes" if m.default else "no"), name
    assert f"`EXACT_BELOW = {EXACT_BELOW}`" in text
    assert f"`b01 + b10 < {EXACT_BELOW}`" in text and f"`b01 + b10 >= {EXACT_BELOW}`" in text


def test_the_http_page_documents_every_dashboard_endpoint():
    server = (ROOT / "abdag" / "dashboard" / "server.py").read_text()
    paths = set(re.findall(r'url\.path == "(/api/\w+)"', server))
    assert paths, "no API path found in abdag/dashboard/server.py"
    documented = set(re.findall(r"^### `GET (/api/\w+)`", (DOCS / "http-api.md").read_text(), re.M))
    assert documented == paths


def test_every_curl_of_pairs_reads_one_experiment():
    """A query of the ClickHouse endpoint over `pairs` without an experiment filter mixes
    every experiment of every DAG."""
    curls = [
        " ".join(command)
        for page in COMMAND_PAGES
        for _, code, _ in code_blocks(page, "bash")
        for command in shell_commands(code)
        if command[0] == "curl"
    ]
    pairs = [c for c in curls if re.search(r"\bpairs\b", c)]
    assert pairs
    assert [c for c in pairs if "WHERE experiment =" not in c] == []


def test_the_guide_names_the_line_a_ready_worker_logs():
    from abdag.agents import config

    ready = getattr(config, "WORKER_READY", None)
    assert ready, "abdag.agents.config.WORKER_READY is gone: update 'When is a worker ready'"
    guide = sections((DOCS / "writing-a-dag.md").read_text(), "### ")["When is a worker ready"]
    assert f"{ready} (DAG fraud)" in guide and "abdag.agents.config.WORKER_READY" in guide


def test_the_readme_links_to_pages_that_exist():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", readme)
    assert "docs/writing-a-dag.md" in links and "docs/cli.md" in links
    assert [link for link in links if not (ROOT / link).is_file()] == []
    assert "mkdocs serve" in sections(readme)["Documentation"]
