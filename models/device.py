"""Turning a device string from configuration into a ``torch.device``.

Configuration says ``"auto"`` in most deployments; resolving it in one place keeps
every node on the same rule and gives a clear error when a GPU is asked for but absent.
"""

from __future__ import annotations

import re

import torch

from models.errors import ModelError

_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


def resolve_device(spec: str = "auto") -> torch.device:
    """Map ``"auto" | "cpu" | "cuda" | "cuda:N"`` to a device that exists on this machine.

    ``"auto"`` picks CUDA when available, else CPU. Asking for CUDA explicitly on a
    machine without it raises ``ModelError`` instead of silently falling back, so a
    misconfigured GPU node fails at start-up rather than running slowly on CPU.
    """
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA_RE.match(text)
    if match is None:
        raise ModelError(f"unsupported device {spec!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ModelError(
            f"device {spec!r} requested but CUDA is not available on this machine "
            f"(torch {torch.__version__}); use device='auto' or 'cpu'"
        )
    index = int(match.group(1)) if match.group(1) is not None else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise ModelError(f"device {spec!r} requested but only {count} CUDA device(s) exist")
    return torch.device("cuda", index)
