"""Where a model node's model comes from: a file, or a version in the model registry.

``path="registry:fraud_b"`` (or ``fraud_b@latest``) follows the newest registered version:
the worker checks the registry every few seconds and swaps the model between two batches,
so no event is lost and every prediction records the version that made it.
``path="registry:fraud_b@v3"`` pins a version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from abdag.settings import Settings

PREFIX = "registry:"


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    version: str  # what predictions record: registry version and content hash, or file hash
    model_class: str | None
    model_kwargs: dict | None
    follows_latest: bool


def is_registry_ref(path: str) -> bool:
    return path.startswith(PREFIX)


def resolve(node, settings: Settings | None = None) -> ResolvedModel:
    """Resolve a model node's ``path`` to the file to load now."""
    if not is_registry_ref(node.path):
        return ResolvedModel(Path(node.path), "", node.model_class, node.model_kwargs, False)
    from abdag.models.registry import ModelRegistry, parse_ref

    settings = settings or Settings.from_env()
    name, version = parse_ref(node.path[len(PREFIX) :])
    mv = ModelRegistry(settings.registry_dir()).get(name, version)
    return ResolvedModel(
        mv.path,
        f"{mv.version}-{mv.sha256[:12]}",
        mv.model_class or node.model_class,
        mv.model_kwargs or node.model_kwargs,
        version in (None, "latest"),
    )
