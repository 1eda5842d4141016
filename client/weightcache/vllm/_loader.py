"""The ``weightcache`` load format: vLLM's ``BaseModelLoader`` fed from the daemon.

Imported only inside vLLM (by ``weightcache.vllm.register``, vLLM's plugin hook), in each
process that may load a model. ``load_weights`` opens the model named in
``model_loader_extra_config`` over the daemon's sockets and feeds vLLM's
``model.load_weights`` one tensor at a time, group by group in layer order
(``Model.stream(copy=False)``):

- each tensor is a zero-copy view of the shared page cache; vLLM's weight loaders copy it
  into the parameter they allocated (a tensor vLLM keeps as is stays a view of the shared
  pages, copy-on-write);
- a model still downloading is consumed as it lands: each group once its bytes are on disk,
  the final group only once every file is verified, so a load never completes on bytes that
  fail verification (the error is raised from ``load_weights`` and vLLM does not start);
- afterwards the same check as vLLM's default loader: every parameter came from the checkpoint.

Config and weights come from the same snapshot: the non-weight files (config.json, the
tokenizer's files, ...) found in vLLM's ``--model`` directory must be byte for byte the
snapshot's, which holds for ``Model.path`` (or the launcher's directory) of the same model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from .._client import connect
from .._model import Model
from ..contract.errors import InvalidInputError
from ._options import LOAD_FORMAT, LoaderOptions

__all__ = ["WeightcacheModelLoader", "register_loader"]

logger = init_logger("vllm.model_executor.model_loader.weightcache")  # under vLLM's own log handler

# Files vLLM reads weights from; every other file of a snapshot is configuration.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class WeightcacheModelLoader(BaseModelLoader):  # type: ignore[misc]  # vLLM ships no type information
    """``--load-format weightcache``: weights from the daemon (see the module docstring)."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        self.options = LoaderOptions.parse(load_config.model_loader_extra_config)

    def download_model(self, model_config: ModelConfig) -> None:
        """Make the model present in the node's cache (downloading it if the daemon allows)."""
        with connect(self.options.socket_dir) as client:
            client.ensure(self.options.model)

    def load_weights(self, model: Any, model_config: ModelConfig) -> None:  # a vLLM model (nn.Module)
        with connect(self.options.socket_dir) as client, client.open(self.options.model) as handle:
            if not len(handle):
                raise InvalidInputError(
                    f"model {self.options.model} (snapshot {handle.snapshot_id}) has no safetensors tensors to load"
                )
            check_same_snapshot(handle, str(model_config.model))
            loaded = model.load_weights(_weights(handle))
            snapshot = handle.snapshot_id  # the committed id once the last group arrived
        logger.info("Loaded %d tensors of %s (snapshot %s) from weightcache", len(handle), self.options.model, snapshot)
        # vLLM's own rule and check: strict for unquantized models that report what they loaded.
        track = self.options.enable_weights_track
        if track is None:
            track = model_config.quantization is None and loaded is not None
        if track:
            DefaultModelLoader.track_weights_loading(
                self, model, loaded, quantized=model_config.quantization is not None
            )


def _weights(handle: Model) -> Iterator[tuple[str, Any]]:
    """(name, tensor) in layer order; views of the shared pages, each group faulted in before
    it is handed over while the next one is read (waiting for bytes still downloading)."""
    groups = handle.stream("cpu", copy=False)
    try:
        for _group, tensors in groups:
            yield from tensors.items()
    finally:
        groups.close()  # vLLM stopped early (an error): stop reading ahead


def check_same_snapshot(handle: Model, directory: str) -> None:
    """Every non-weight file of the snapshot that ``directory`` (vLLM's ``--model``) has must
    be the snapshot's own bytes: config and weights of one snapshot, never a mix."""
    if not os.path.isdir(directory):
        raise InvalidInputError(
            f"load format {LOAD_FORMAT!r} reads the config from a local directory, but --model {directory!r} is "
            "not one; pass the model's path (weightcache Model.path, or use the weightcache-vllm launcher)"
        )
    for info in handle.files:
        if info.path.endswith(_WEIGHT_SUFFIXES):
            continue
        local = os.path.join(directory, info.path)
        if not os.path.isfile(local):
            continue
        with open(local, "rb") as f:
            seen = f.read(info.size + 1)
        expected = bytearray(info.size)
        if info.size:
            handle.backing.read_into(info.path, 0, memoryview(expected))
        if seen != expected:
            raise InvalidInputError(
                f"{local} is not the file {info.path} of model {handle.name or handle.snapshot_id} (snapshot "
                f"{handle.snapshot_id}) that load format {LOAD_FORMAT!r} takes the weights from: config and weights "
                "must come from the same snapshot; pass that model's path as --model"
            )


def register_loader() -> None:
    """Register the load format with vLLM (idempotent: vLLM calls plugins in every process)."""
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER

    if _LOAD_FORMAT_TO_MODEL_LOADER.get(LOAD_FORMAT) is not WeightcacheModelLoader:
        register_model_loader(LOAD_FORMAT)(WeightcacheModelLoader)
