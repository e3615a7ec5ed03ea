"""Reading a DAG file: a Python file that builds a :class:`~abdag.agents.dag.Dag`.

The file runs with its own directory first on ``sys.path`` (so it can import helpers next
to it) and model paths relative to it resolve against that directory. Any failure becomes
a :class:`DagError` naming the file (and the line, for syntax errors).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from abdag.agents.dag import Dag, ModelNode
from abdag.agents.errors import DagError
from abdag.agents.model_source import is_registry_ref

# Top-level packages of abdag before everything moved under ``abdag.`` (2026-12): a DAG file
# written for them gets a hint instead of a bare ModuleNotFoundError.
_MOVED = ("agents", "topics", "models", "comparators")


def load_dag(path: str | Path) -> Dag:
    file = Path(path)
    if not file.is_file():
        raise DagError("no such DAG file", file=str(path))
    folder = str(file.resolve().parent)
    sys.path.insert(0, folder)
    try:
        namespace = runpy.run_path(str(file), run_name="abdag_dag")
    except DagError as exc:
        if exc.file is None:
            raise DagError(exc.message, node=exc.node, file=str(path)) from None
        raise
    except SyntaxError as exc:
        raise DagError(f"syntax error on line {exc.lineno}: {exc.msg}", file=str(path)) from None
    except ImportError as exc:
        hint = ""
        if exc.name and exc.name.split(".")[0] in _MOVED:
            hint = (
                f"; abdag's modules import as abdag.{exc.name.split('.')[0]}... (a DAG file "
                "starts with `from abdag import Dag`)"
            )
        raise DagError(
            f"the file failed to run: {type(exc).__name__}: {exc}{hint}", file=str(path)
        ) from exc
    except Exception as exc:  # noqa: BLE001 - the user's file failed while building the DAG
        raise DagError(
            f"the file failed to run: {type(exc).__name__}: {exc}", file=str(path)
        ) from exc
    finally:
        if sys.path and sys.path[0] == folder:
            sys.path.pop(0)
    dags = [v for v in namespace.values() if isinstance(v, Dag)]
    if "dag" in namespace and isinstance(namespace["dag"], Dag):
        dag = namespace["dag"]
    elif len(dags) == 1:
        dag = dags[0]
    else:
        found = "none" if not dags else f"{len(dags)} (name one of them `dag`)"
        raise DagError(f"the file must define one Dag; found {found}", file=str(path))
    dag.file = str(path)
    for node in dag.nodes.values():
        if (
            isinstance(node, ModelNode)
            and not is_registry_ref(node.path)
            and not Path(node.path).is_absolute()
        ):
            node.path = str(Path(folder, node.path))
    return dag
