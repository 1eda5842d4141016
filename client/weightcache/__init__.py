"""weightcache client: zero-copy tensors from the node's weight cache.

import weightcache
with weightcache.connect() as cache, cache.open("llama-8b") as model:
    state = model.state_dict()
    for name, layer in model.stream("cuda:0", prefetch=2):
        ...
"""

from ._client import Client, connect
from ._model import FileInfo, Layer, Model, TensorMeta
from .errors import (
    AlreadyExistsError,
    BusyError,
    CorruptedError,
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

__all__ = [
    "AlreadyExistsError",
    "BusyError",
    "Client",
    "CorruptedError",
    "DeadlineError",
    "ExhaustedError",
    "FileInfo",
    "InternalError",
    "InvalidInputError",
    "Layer",
    "Model",
    "NotFoundError",
    "PermissionDeniedError",
    "SourceError",
    "TensorMeta",
    "WeightcacheError",
    "connect",
]
