"""Model loading and batched inference for abdag DAG nodes.

``load_model`` turns a file (TorchScript, torch.export ``.pt2`` or state_dict + class
path) into a versioned ``LoadedModel``; ``BatchRunner`` validates items and runs them
in one forward call, turning every failure into a per-item reason.
"""

from abdag.models.batching import (
    OUTPUT_KINDS,
    BatchRunner,
    ItemInput,
    ItemResult,
    OutputKind,
    TensorSpec,
)
from abdag.models.device import apply_cpu_threads, resolve_device
from abdag.models.errors import ModelError
from abdag.models.loading import (
    FORMATS,
    LoadedModel,
    detect_format,
    file_version,
    import_class,
    load_model,
)

__all__ = [
    "FORMATS",
    "OUTPUT_KINDS",
    "BatchRunner",
    "ItemInput",
    "ItemResult",
    "LoadedModel",
    "ModelError",
    "OutputKind",
    "TensorSpec",
    "detect_format",
    "file_version",
    "import_class",
    "load_model",
    "apply_cpu_threads",
    "resolve_device",
]
