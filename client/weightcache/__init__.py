"""weightcache client: zero-copy tensors from the node's weight cache.

import weightcache
with weightcache.connect() as cache, cache.open("llama-8b") as model:
    state = model.state_dict()
    for name, layer in model.stream("cuda:0", prefetch=2):
        ...
"""

from ._backing import Backing
from ._client import Client, connect
from ._model import Model
from ._records import FileInfo, Layer, Lease, Manifest, ModelInfo, Progress, TensorMeta
from .contract.errors import (
    AlreadyExistsError,
    BusyError,
    CorruptedError,
    DaemonUnavailableError,
    DeadlineError,
    ExhaustedError,
    InternalError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    SourceError,
    WeightcacheError,
)

__version__ = "0.1.0"

# Submodules that import torch (or transformers) load on first use, so ``import weightcache``
# stays light and ``weightcache.nn`` works without a separate import.
_LAZY = ("nn", "transformers")


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AlreadyExistsError",
    "Backing",
    "BusyError",
    "Client",
    "CorruptedError",
    "DaemonUnavailableError",
    "DeadlineError",
    "ExhaustedError",
    "FileInfo",
    "InternalError",
    "InvalidInputError",
    "Layer",
    "Lease",
    "Manifest",
    "Model",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "Progress",
    "SourceError",
    "TensorMeta",
    "WeightcacheError",
    "connect",
]
