"""``model_loader_extra_config`` of the ``weightcache`` load format, checked before anything loads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..contract.errors import InvalidInputError

__all__ = ["LOAD_FORMAT", "LoaderOptions"]

LOAD_FORMAT = "weightcache"

_KEYS = {
    "model": "name, source URI or snapshot id to take the weights from (required)",
    "socket_dir": "the daemon's client socket directory (default: $WEIGHTCACHE_SOCKET_DIR, then the usual places)",
    "enable_weights_track": "check that every parameter was loaded (vLLM's default loader's rule when unset)",
}


@dataclass(frozen=True)
class LoaderOptions:
    """What the load format reads from vLLM's ``model_loader_extra_config``."""

    model: str
    socket_dir: str | None = None
    enable_weights_track: bool | None = None

    @classmethod
    def parse(cls, extra: object) -> LoaderOptions:
        """Options from ``model_loader_extra_config``; a clear error for anything else."""
        if not isinstance(extra, Mapping):
            raise InvalidInputError(
                f"model_loader_extra_config for load format {LOAD_FORMAT!r} must be a JSON object, "
                f'got {type(extra).__name__}; e.g. {{"model": "llama-8b"}}'
            )
        unknown = sorted(set(extra) - set(_KEYS))
        if unknown:
            known = "; ".join(f"{k}: {v}" for k, v in _KEYS.items())
            raise InvalidInputError(
                f"model_loader_extra_config for load format {LOAD_FORMAT!r} has unknown keys {unknown}; known: {known}"
            )
        model = extra.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidInputError(
                f'model_loader_extra_config for load format {LOAD_FORMAT!r} needs "model": a name, source URI '
                f"or snapshot id (a non-empty string), got {model!r}"
            )
        socket_dir = extra.get("socket_dir")
        if socket_dir is not None and (not isinstance(socket_dir, str) or not socket_dir):
            raise InvalidInputError(
                f'model_loader_extra_config "socket_dir" must be a non-empty string, got {socket_dir!r}'
            )
        track = extra.get("enable_weights_track")
        if track is not None and not isinstance(track, bool):
            raise InvalidInputError(
                f'model_loader_extra_config "enable_weights_track" must be true or false, got {track!r}'
            )
        return cls(model, socket_dir, track)

    def to_config(self) -> dict[str, Any]:
        """The JSON object to pass as ``model_loader_extra_config`` (the inverse of ``parse``)."""
        out: dict[str, Any] = {"model": self.model}
        if self.socket_dir is not None:
            out["socket_dir"] = self.socket_dir
        if self.enable_weights_track is not None:
            out["enable_weights_track"] = self.enable_weights_track
        return out
