"""Errors raised while reading and checking a DAG file."""

from __future__ import annotations


class DagError(ValueError):
    """A DAG that cannot run; the message names the file and the node."""

    def __init__(self, message: str, *, node: str | None = None, file: str | None = None) -> None:
        where = ", ".join(
            p for p in (f"file {file}" if file else "", f"node {node!r}" if node else "") if p
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.message = message
        self.node = node
        self.file = file
