"""Turning a device string from configuration into a ``torch.device``.

Configuration says ``"auto"`` in most deployments; resolving it in one place keeps
every node on the same rule and gives a clear error when a GPU is asked for but absent.
"""

from __future__ import annotations

import re

import torch

from abdag.models.errors import ModelError

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


def apply_cpu_threads(value: str | int | None) -> int | None:
    """Give torch ``value`` CPU threads (``ABDAG_TORCH_THREADS``); empty keeps torch's
    default of one per core. Returns the number set, or None.

    A worker shares the CPU between inference and its event loop (fetching, decoding,
    sending). With every core given to torch the two take turns; with a core left to the
    event loop, the next batch is fetched and the last one sent while the model runs.

    >>> apply_cpu_threads(None) is None
    True
    >>> apply_cpu_threads("zero")
    Traceback (most recent call last):
    ...
    abdag.models.errors.ModelError: ABDAG_TORCH_THREADS must be a whole number >= 1, got 'zero'
    """
    if value is None or str(value).strip() == "":
        return None
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ModelError(f"ABDAG_TORCH_THREADS must be a whole number >= 1, got {value!r}")
    torch.set_num_threads(int(text))
    return int(text)
