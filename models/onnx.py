"""Running ONNX models (optional): an onnxruntime session behind a torch-shaped interface.

ONNX is an optional extra (``pip install abdag[onnx]``, which brings onnxruntime), so this
module imports onnxruntime only when a model is loaded, and says how to install it when it
is missing. Sessions run on CPU; inputs are cast to the dtypes the graph declares and the
first output comes back as a torch tensor, so :class:`~abdag.models.batching.BatchRunner` treats
an ONNX model like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from abdag.models.errors import ModelError
from abdag.models.loading import LoadedModel, file_version

__all__ = ["INSTALL_HINT", "ONNXModule", "load_onnx", "looks_like_onnx", "onnxruntime_available"]

INSTALL_HINT = "install abdag[onnx] (onnxruntime)"

# ONNX element types (as onnxruntime names them) -> numpy dtype names.
_NUMPY_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def onnxruntime_available() -> bool:
    """True when onnxruntime can be imported (the ``abdag[onnx]`` extra is installed)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _onnxruntime(path: Path) -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelError(
            f"{path}: is an ONNX model; running it needs onnxruntime: {INSTALL_HINT}"
        ) from exc
    return onnxruntime


def looks_like_onnx(path: str | Path) -> bool:
    """Cheap check without onnx installed: an ONNX ModelProto starts with ``ir_version``
    (protobuf field 1, a varint: byte 0x08), and is not a zip archive."""
    with Path(path).open("rb") as fh:
        head = fh.read(2)
    return head[:1] == b"\x08"


class ONNXModule(torch.nn.Module):
    """Calls an onnxruntime CPU session with torch tensors and returns its first output."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        path = Path(path)
        ort = _onnxruntime(path)
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"{path}: onnxruntime cannot load it: {exc}") from exc
        self.path = path
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_types = [_NUMPY_TYPES.get(i.type) for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        if len(tensors) != len(self.input_names):
            raise ValueError(
                f"{self.path.name} takes {len(self.input_names)} input(s) "
                f"({', '.join(self.input_names)}), got {len(tensors)}"
            )
        feed = {}
        for name, kind, tensor in zip(self.input_names, self.input_types, tensors, strict=True):
            array = tensor.detach().cpu().numpy()
            feed[name] = array.astype(kind, copy=False) if kind else array
        (out,) = self.session.run([self.output_name], feed)
        return torch.from_numpy(out.copy())


def load_onnx(path: str | Path, *, name: str | None = None, device: str = "cpu") -> LoadedModel:
    """An ONNX file as a :class:`LoadedModel` (CPU only; version = content hash)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file does not exist")
    if device not in ("cpu", "auto"):
        raise ModelError(f"{path}: ONNX models run on CPU here, not {device!r}")
    return LoadedModel(
        name=name or path.stem,
        path=path,
        format="onnx",
        version=file_version(path),
        module=ONNXModule(path),
        device=torch.device("cpu"),
    )
