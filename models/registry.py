"""A local model registry: versioned copies of model files with their metadata, in a folder.

Layout (plain files, so it can live on a shared disk, in git-lfs or be rsynced)::

    <root>/<name>/v1/<file>        the model file as registered (original basename)
    <root>/<name>/v1/meta.json     name, version, format, sha256, task, input_spec, ...
    <root>/<name>/v2/...

Versions are sequential (``v1``, ``v2``, ...) and never rewritten; registering bytes that
are already registered under the name returns that version instead of adding one, so a CI
job can register on every run. ``meta.json`` is plain JSON: listing and resolving never
load a model (torch is imported only to check a file at registration and to load it).

Refer to a version as ``name`` or ``name@latest`` (the newest), ``name@v2`` or ``name@2``.

Formats: TorchScript, torch.export ``.pt2``, a state_dict with its ``model_class`` (and
``model_kwargs``), and ONNX (``.onnx``; loading it needs the ``abdag[onnx]`` extra).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abdag.comparators.tasks import TASKS
from abdag.models.errors import ModelError

if TYPE_CHECKING:
    from abdag.models.loading import LoadedModel

__all__ = [
    "META_FILE",
    "REGISTRY_FORMATS",
    "ModelRegistry",
    "ModelVersion",
    "parse_ref",
]

META_FILE = "meta.json"
META_SCHEMA = 1
REGISTRY_FORMATS = ("torchscript", "export", "state_dict", "onnx")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,99}$")
_VERSION_DIR = re.compile(r"^v([1-9][0-9]*)$")
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelVersion:
    """One registered version: where its file is and what ``meta.json`` says about it."""

    name: str
    version: str
    format: str
    sha256: str
    path: Path
    created: str
    source: str
    size: int
    task: str | None = None
    input_spec: dict[str, Any] | None = None
    model_class: str | None = None
    model_kwargs: dict[str, Any] | None = None

    @property
    def number(self) -> int:
        return int(self.version[1:])

    @property
    def ref(self) -> str:
        """``name@vN``: what ``resolve`` and the CLI accept."""
        return f"{self.name}@{self.version}"

    def meta(self) -> dict[str, Any]:
        """The ``meta.json`` body (the file is stored by basename, next to it)."""
        body = asdict(self)
        body["file"] = self.path.name
        del body["path"]
        return {"schema": META_SCHEMA, **body}

    @classmethod
    def from_meta(cls, folder: Path) -> ModelVersion:
        meta_file = folder / META_FILE
        try:
            body = json.loads(meta_file.read_text(encoding="utf-8"))
            return cls(
                name=body["name"],
                version=body["version"],
                format=body["format"],
                sha256=body["sha256"],
                path=folder / body["file"],
                created=body["created"],
                source=body["source"],
                size=int(body["size"]),
                task=body.get("task"),
                input_spec=body.get("input_spec"),
                model_class=body.get("model_class"),
                model_kwargs=body.get("model_kwargs"),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{meta_file}: unreadable registry metadata: {exc!r}") from exc


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``"name@v2"`` -> ``("name", "v2")``; ``"name"`` and ``"name@latest"`` -> version None."""
    name, sep, version = str(ref).partition("@")
    if not _NAME.match(name) or (sep and not version):
        raise ModelError(
            f"model reference {ref!r} must look like NAME, NAME@latest or NAME@v2 "
            "(NAME: a letter, then letters, digits, '_', '-' or '.')"
        )
    if not sep or version == "latest":
        return name, None
    return name, _version_label(version)


def _version_label(version: str | int) -> str:
    text = str(version)
    label = text if text.startswith("v") else f"v{text}"
    if not _VERSION_DIR.match(label):
        raise ModelError(f"version {version!r} must look like v2, 2 or latest")
    return label


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ModelRegistry:
    """Versioned model files under ``root`` (created on the first registration)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- reading (no torch) ----------------------------------------------------------------
    def names(self) -> list[str]:
        """Registered model names, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(d.name for d in self.root.iterdir() if d.is_dir() and _NAME.match(d.name))

    def versions(self, name: str) -> list[ModelVersion]:
        """Every version of ``name``, oldest first (empty when the name is unknown)."""
        folder = self.root / name
        if not _NAME.match(name) or not folder.is_dir():
            return []
        found = [
            ModelVersion.from_meta(d)
            for d in folder.iterdir()
            if _VERSION_DIR.match(d.name) and (d / META_FILE).is_file()
        ]
        return sorted(found, key=lambda v: v.number)

    def all(self) -> list[ModelVersion]:
        """Every version of every model (for ``abdag models list``)."""
        return [v for name in self.names() for v in self.versions(name)]

    def latest(self, name: str) -> ModelVersion:
        found = self.versions(name)
        if not found:
            known = ", ".join(self.names()) or "none"
            raise ModelError(f"no model {name!r} in the registry {self.root} (registered: {known})")
        return found[-1]

    def get(self, name: str, version: str | int | None = None) -> ModelVersion:
        """One version: ``None``/``"latest"`` for the newest, else ``"v2"``, ``"2"`` or 2."""
        if version is None or version == "latest":
            return self.latest(name)
        label = _version_label(version)
        found = self.versions(name)
        for v in found:
            if v.version == label:
                return v
        if not found:
            self.latest(name)  # raises: unknown name
        have = ", ".join(v.version for v in found)
        raise ModelError(f"model {name!r} has no version {label} (versions: {have})")

    def path(self, name: str, version: str | int | None = None) -> Path:
        """The model file of a version (the newest by default)."""
        return self.get(name, version).path

    def resolve(self, ref: str) -> Path:
        """The model file for ``name``, ``name@latest``, ``name@v2`` or ``name@2``."""
        name, version = parse_ref(ref)
        return self.get(name, version).path

    # -- registering -----------------------------------------------------------------------
    def register(
        self,
        name: str,
        source_path: str | Path,
        *,
        task: str | None = None,
        input_spec: dict[str, Any] | None = None,
        model_class: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        fmt: str | None = None,
        verify: bool = True,
    ) -> ModelVersion:
        """Copy ``source_path`` in as the next version of ``name`` and return it.

        Content already registered under ``name`` returns that version (metadata given now
        must not contradict it). With ``verify`` the file is loaded once on CPU first, so a
        broken file or a wrong ``model_class`` is refused here rather than in a worker.
        """
        if not _NAME.match(str(name)):
            raise ModelError(
                f"model name {name!r} is not allowed: a letter, then letters, digits, '_', '-' "
                "or '.' (at most 100 characters)"
            )
        source = Path(source_path)
        if not source.is_file():
            raise ModelError(f"{source}: model file does not exist")
        if task is not None and task not in TASKS:
            raise ModelError(f"task must be one of {TASKS}, got {task!r}")
        for label, value in (("input_spec", input_spec), ("model_kwargs", model_kwargs)):
            if value is not None:
                try:
                    json.dumps(value)
                except (TypeError, ValueError) as exc:
                    raise ModelError(f"{label} must be JSON-serialisable: {exc}") from exc
        fmt = self._format(source, fmt)
        if fmt == "state_dict":
            from abdag.models.loading import refuse_raw_pickle

            refuse_raw_pickle(source)  # a plain pickle.dump is no state_dict
        if fmt == "state_dict" and not model_class:
            raise ModelError(
                f"{source}: is a plain state_dict (weights only); register it with "
                "model_class='package.module:ClassName' (and model_kwargs) so it can be rebuilt"
            )
        if fmt != "state_dict" and (model_class or model_kwargs):
            raise ModelError(
                f"{source}: is a {fmt} file, which carries its own code; "
                "do not pass model_class/model_kwargs"
            )
        digest = _sha256(source)
        wanted = {
            "task": task,
            "input_spec": input_spec,
            "model_class": model_class,
            "model_kwargs": model_kwargs,
        }
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock(folder):
            for existing in self.versions(name):
                if existing.sha256 == digest:
                    self._check_same(existing, wanted)
                    return existing
            if verify:
                self._verify(source, fmt, model_class, model_kwargs)
            number = max((v.number for v in self.versions(name)), default=0) + 1
            version = ModelVersion(
                name=name,
                version=f"v{number}",
                format=fmt,
                sha256=digest,
                path=folder / f"v{number}" / source.name,
                created=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
                source=source.name,
                size=source.stat().st_size,
                **wanted,
            )
            self._publish(source, version)
        return version

    @staticmethod
    def _format(source: Path, fmt: str | None) -> str:
        from abdag.models.onnx import looks_like_onnx

        if fmt is not None and fmt not in REGISTRY_FORMATS:
            raise ModelError(f"format must be one of {REGISTRY_FORMATS}, got {fmt!r}")
        if fmt == "onnx" or (fmt is None and source.suffix.lower() == ".onnx"):
            if not looks_like_onnx(source):
                raise ModelError(f"{source}: not an ONNX model (no ONNX ModelProto header)")
            return "onnx"
        from abdag.models.loading import detect_format

        found = detect_format(source)
        if fmt is not None and fmt != found:
            raise ModelError(f"{source}: registered as {fmt!r} but the file is {found!r}")
        return found

    @staticmethod
    def _verify(
        source: Path, fmt: str, model_class: str | None, model_kwargs: dict[str, Any] | None
    ) -> None:
        if fmt == "onnx":
            from abdag.models.onnx import load_onnx, onnxruntime_available

            if onnxruntime_available():  # else: checked when loaded (needs the extra)
                load_onnx(source)
            return
        from abdag.models.loading import load_model

        load_model(source, device="cpu", model_class=model_class, model_kwargs=model_kwargs)

    @staticmethod
    def _check_same(existing: ModelVersion, wanted: dict[str, Any]) -> None:
        """Re-registering the same bytes is fine; giving them other metadata is not."""
        clashes = [
            f"{key} {getattr(existing, key)!r} (now {value!r})"
            for key, value in wanted.items()
            if value is not None and value != getattr(existing, key)
        ]
        if clashes:
            raise ModelError(
                f"this file is already registered as {existing.ref} with "
                f"{'; '.join(clashes)}; register a changed file to make a new version"
            )

    @staticmethod
    def _publish(source: Path, version: ModelVersion) -> None:
        """Write into a temporary folder, then rename: a version folder is complete or
        absent, never half-written."""
        final = version.path.parent
        tmp = final.with_name(f".tmp-{uuid.uuid4().hex}")
        tmp.mkdir()
        try:
            shutil.copyfile(source, tmp / source.name)
            (tmp / META_FILE).write_text(
                json.dumps(version.meta(), indent=2) + "\n", encoding="utf-8"
            )
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @staticmethod
    @contextlib.contextmanager
    def _lock(folder: Path) -> Iterator[None]:
        """One registration per name at a time (processes sharing the folder included)."""
        with open(folder / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- loading ---------------------------------------------------------------------------
    def load(self, name: str, version: str | int | None = None, device: str = "cpu") -> LoadedModel:
        """Load a version (newest by default) after checking its file still has the
        registered content."""
        v = self.get(name, version)
        if not v.path.is_file():
            raise ModelError(f"{v.ref}: its file {v.path} is missing from the registry")
        if _sha256(v.path) != v.sha256:
            raise ModelError(f"{v.ref}: {v.path} was modified after registration (sha256 differs)")
        if v.format == "onnx":
            from abdag.models.onnx import load_onnx

            return load_onnx(v.path, name=name, device=device)
        from abdag.models.loading import load_model

        return load_model(
            v.path,
            name=name,
            device=device,
            model_class=v.model_class,
            model_kwargs=v.model_kwargs,
        )
