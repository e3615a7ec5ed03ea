"""Errors raised by the model layer.

A single exception type lets the DAG agents catch "this model cannot be used"
without also swallowing programming errors from the rest of the stack.
"""

from __future__ import annotations


class ModelError(Exception):
    """A model file, class path or device cannot be used; the message says which and why."""
