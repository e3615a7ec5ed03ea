"""Loading a model file into a ready-to-call, versioned module.

Three on-disk formats are supported, chosen by looking inside the file (the suffix is
only a hint, since ``.pt`` is used for everything):

* ``torchscript``: a ``torch.jit.save`` zip (members ``code/...``, ``constants.pkl``);
* ``export``: a ``torch.export.save`` zip (``archive_format`` = ``pt2``, ``models/*.json``;
  older releases wrote ``serialized_exported_program.json``);
* ``state_dict``: a ``torch.save`` of tensors (zip with ``data.pkl``, or the legacy
  pickle format), rebuilt through ``model_class="package.module:ClassName"``.

Arbitrary pickled objects are never loaded: state dicts go through
``torch.load(weights_only=True)``, and TorchScript/export archives are not pickles of
Python objects. The version is a content hash, so the A/B comparison can tell two
deployments of "the same" model apart when their weights differ.
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from abdag.models.device import resolve_device
from abdag.models.errors import ModelError

__all__ = [
    "FORMATS",
    "LoadedModel",
    "ModelError",
    "detect_format",
    "file_version",
    "import_class",
    "load_model",
]

FORMATS = ("torchscript", "export", "state_dict")

# First bytes of a pickle stream (protocol 2+), which is how legacy torch.save files start.
_PICKLE_MAGIC = b"\x80"
_HASH_CHUNK = 1 << 20

ModelInput = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass
class LoadedModel:
    """A model ready for inference: the callable plus what identifies it in results."""

    name: str
    path: Path
    format: str
    version: str
    module: torch.nn.Module | Callable[..., torch.Tensor]
    device: torch.device

    def __call__(self, batch: ModelInput) -> torch.Tensor:
        """Run one forward pass on ``batch`` (a tensor, or a tuple for multi-input models).

        Inputs are moved to the model's device and the output comes back on CPU, so
        callers never have to care where the model lives.
        """
        parts = batch if isinstance(batch, tuple) else (batch,)
        with torch.inference_mode():
            moved = tuple(t.to(self.device, non_blocking=True) for t in parts)
            out = self.module(*moved)
        if not isinstance(out, torch.Tensor):
            raise ModelError(
                f"model {self.name!r} returned {type(out).__name__}, expected a single Tensor"
            )
        return out.cpu()

    def info(self) -> dict[str, str]:
        """Identity fields for logs and result messages."""
        return {
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "path": str(self.path),
            "device": str(self.device),
        }


def file_version(*paths: Path) -> str:
    """First 12 hex digits of the SHA-256 of the files' bytes, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def detect_format(path: str | Path) -> str:
    """Say which of ``FORMATS`` a file holds by reading its zip directory or first bytes.

    Raises ``ModelError`` when the file is missing or is not a model file at all.
    """
    path = _existing_file(Path(path))
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ModelError(f"{path}: unreadable zip archive: {exc}") from exc
        found = _format_from_members(names)
        if found is None:
            raise ModelError(
                f"{path}: zip archive is not a TorchScript, torch.export or torch.save file "
                f"(members: {', '.join(sorted(names)[:6])}{', ...' if len(names) > 6 else ''})"
            )
        return found
    with path.open("rb") as fh:
        head = fh.read(2)
    if head[:1] == _PICKLE_MAGIC:
        return "state_dict"  # legacy (pre-1.6) torch.save format
    hint = " (ONNX is not supported)" if path.suffix.lower() == ".onnx" else ""
    raise ModelError(
        f"{path}: not a model file{hint}: expected a TorchScript archive, "
        "a torch.export .pt2 archive or a torch.save state_dict"
    )


def _format_from_members(names: list[str]) -> str | None:
    """Classify a zip by member names, ignoring the per-archive top-level folder."""
    inner = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if (
        "archive_format" in inner
        or "serialized_exported_program.json" in inner
        or any(n.startswith("models/") and n.endswith(".json") for n in inner)
    ):
        return "export"
    if "constants.pkl" in inner or any(n.startswith("code/") for n in inner):
        return "torchscript"
    if "data.pkl" in inner:
        return "state_dict"
    return None


def _existing_file(path: Path) -> Path:
    if not path.exists():
        raise ModelError(f"{path}: model file does not exist")
    if not path.is_file():
        raise ModelError(f"{path}: not a regular file")
    return path


def load_model(
    path: str | Path,
    *,
    name: str | None = None,
    device: str = "auto",
    model_class: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a model file in any supported format, in eval mode, on ``device``.

    ``model_class`` ("package.module:ClassName") and ``model_kwargs`` are required for
    a state_dict and rejected for self-describing archives, so a config cannot
    silently carry a class that is not the one being served. Every failure is a
    ``ModelError`` naming the file.
    """
    path = Path(path)
    fmt = detect_format(path)
    target = resolve_device(device)
    if fmt != "state_dict" and model_class is not None:
        raise ModelError(
            f"{path}: is a {fmt} archive, which carries its own code; "
            f"do not pass model_class ({model_class!r})"
        )
    if fmt == "torchscript":
        module = _load_torchscript(path, target)
    elif fmt == "export":
        module = _load_export(path, target)
    else:
        module = _load_state_dict(path, target, model_class, model_kwargs)
    return LoadedModel(
        name=name or path.stem,
        path=path,
        format=fmt,
        version=file_version(path),
        module=module,
        device=target,
    )


def _load_torchscript(path: Path, device: torch.device) -> torch.nn.Module:
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise ModelError(f"{path}: cannot load TorchScript archive: {_first_line(exc)}") from exc
    module.eval()
    return module


def _load_export(path: Path, device: torch.device) -> torch.nn.Module:
    """Load a torch.export archive; note exported graphs cannot be switched to eval mode.

    ``.module()`` refuses ``eval()``: the graph keeps whatever mode it was traced in,
    so archives must be exported from a model already in ``eval()``.
    """
    try:
        program = torch.export.load(str(path))
        module = program.module().to(device)
    except Exception as exc:
        raise ModelError(f"{path}: cannot load torch.export archive: {_first_line(exc)}") from exc
    return module


def _load_state_dict(
    path: Path,
    device: torch.device,
    model_class: str | None,
    model_kwargs: dict[str, Any] | None,
) -> torch.nn.Module:
    refuse_raw_pickle(path)
    if model_class is None:
        raise ModelError(
            f"{path}: is a plain state_dict (weights only); pass "
            "model_class='package.module:ClassName' (and model_kwargs) to rebuild the model"
        )
    cls = import_class(model_class, path)
    try:
        module = cls(**(model_kwargs or {}))
    except Exception as exc:
        raise ModelError(
            f"{path}: cannot instantiate {model_class} with {model_kwargs or {}}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"{path}: {model_class} is not a torch.nn.Module subclass")
    state = _read_state_dict(path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"{path}: state_dict does not match {model_class}: {_compact(exc)}"
        ) from exc
    return module.to(device).eval()


_PICKLE_TYPES = {
    "EMPTY_DICT": "dict",
    "DICT": "dict",
    "EMPTY_LIST": "list",
    "LIST": "list",
    "EMPTY_TUPLE": "tuple",
    "TUPLE": "tuple",
    "TUPLE1": "tuple",
    "TUPLE2": "tuple",
    "TUPLE3": "tuple",
    "EMPTY_SET": "set",
    "NONE": "None",
    "NEWTRUE": "bool",
    "NEWFALSE": "bool",
    "BINFLOAT": "float",
}
_PICKLE_SKIP = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "MARK"}


def refuse_raw_pickle(path: Path) -> None:
    """Raise :class:`ModelError` saying what a plain ``pickle.dump`` file holds and what to
    save instead; return for anything else (a torch.save file is a state_dict)."""
    pickled = _raw_pickle_of(path)
    if pickled is not None:
        raise ModelError(
            f"{path}: is a pickle of a {pickled} (not a torch.save state_dict): abdag does not "
            "unpickle arbitrary objects; save the model with torch.jit.save or "
            "torch.export.save, or save model.state_dict() with torch.save and give "
            "model_class='package.module:ClassName'"
        )


def _raw_pickle_of(path: Path) -> str | None:
    """What a pickle file holds (``"torch.nn.modules.linear.Linear"``, ``"dict"``) when it
    is a plain ``pickle.dump``, not a legacy ``torch.save``; None for a torch.save file.

    Legacy torch.save files start with a pickled magic number; anything else that starts
    like a pickle was written by ``pickle.dump`` (or joblib), and used to be described as
    "a plain state_dict". Only the opcodes are read (``pickletools``): nothing is executed.
    """
    import pickletools

    from torch.serialization import MAGIC_NUMBER

    strings: list[str] = []
    try:
        with path.open("rb") as fh:
            if fh.read(1) != _PICKLE_MAGIC:  # a zip (torch.save since 1.6): not a raw pickle
                return None
            fh.seek(0)
            for op, arg, _ in pickletools.genops(fh):
                name = op.name
                if name in _PICKLE_SKIP:
                    continue
                if "UNICODE" in name or name.endswith("STRING"):
                    strings.append(str(arg))  # STACK_GLOBAL's module and name come first
                    continue
                if name == "GLOBAL":
                    return str(arg).replace(" ", ".")
                if name == "STACK_GLOBAL":
                    return ".".join(strings[-2:]) if len(strings) >= 2 else "Python object"
                if name.startswith(("LONG", "INT", "BININT")):
                    return None if arg == MAGIC_NUMBER else "int"
                if strings:
                    return "str"
                return _PICKLE_TYPES.get(name, "Python object")
    except (ValueError, OSError):  # not a readable pickle: torch.load words the error
        return None
    return None


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """Read tensors only; anything else in the pickle is refused, never executed."""
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"{path}: refused to load: file contains non-tensor Python objects and only "
            f"weights_only=True loading is allowed ({_unpickler_detail(exc)})"
        ) from exc
    except Exception as exc:
        raise ModelError(f"{path}: cannot read state_dict: {_first_line(exc)}") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # common training-checkpoint wrapper
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ModelError(
            f"{path}: expected a state_dict (mapping of name -> tensor), got {type(obj).__name__}"
        )
    return obj


def import_class(class_path: str, path: Path | None = None) -> type:
    """Import ``"package.module:ClassName"`` (``ClassName`` may be dotted for nested classes)."""
    where = f"{path}: " if path is not None else ""
    module_name, sep, qualname = class_path.partition(":")
    if not sep or not module_name or not qualname:
        raise ModelError(
            f"{where}model_class {class_path!r} must look like 'package.module:ClassName'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelError(
            f"{where}cannot import module {module_name!r} for model_class {class_path!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    for attr in qualname.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as exc:
            raise ModelError(
                f"{where}model_class {class_path!r}: module {module_name!r} has no {qualname!r}"
            ) from exc
    if not isinstance(obj, type):
        raise ModelError(f"{where}model_class {class_path!r} is not a class")
    return obj


def _unpickler_detail(exc: BaseException) -> str:
    """Pick the line naming the refused global out of torch's multi-paragraph message."""
    match = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if match:
        return f"unsupported global {match.group(1)}"
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _compact(exc: BaseException) -> str:
    """load_state_dict errors span lines; keep them on one for log lines."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
