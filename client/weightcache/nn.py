"""torch.nn integration: load a cached model's weights into a module, eagerly or just in time.

from weightcache.nn import load_into, materialize_just_in_time

load_into(module, model, strict=True)              # like load_state_dict, zero-copy source
with torch.device("meta"):
    module = MyLlama(cfg)
jit = materialize_just_in_time(module, model, "cuda:0", prefetch=2)
out = module(tokens)   # each layer's weights arrive right before that layer runs
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._dtypes import torch_module
from .errors import InvalidInputError

if TYPE_CHECKING:
    from ._model import Model

__all__ = ["JustInTime", "load_into", "materialize_just_in_time"]


def _targets(module: Any) -> dict[str, Any]:
    """Every parameter and persistent buffer of a module by its state_dict name."""
    out: dict[str, Any] = dict(module.named_parameters(remove_duplicate=False))
    for name, buf in module.named_buffers(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        if leaf not in getattr(sub, "_non_persistent_buffers_set", set()):
            out[name] = buf
    return out


def _check_keys(module: Any, model: Model, strict: bool) -> tuple[list[str], list[str]]:
    want = set(_targets(module))
    have = set(model.keys())
    missing = sorted(want - have)
    unexpected = sorted(have - want)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(
                f"missing from model {model.name or model.snapshot_id}: {', '.join(missing[:10])}"
                + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
            )
        if unexpected:
            parts.append(
                f"not in the module: {', '.join(unexpected[:10])}"
                + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else "")
            )
        raise InvalidInputError("load_into(strict=True): " + "; ".join(parts))
    return missing, unexpected


def _check_shape(name: str, target: Any, meta_shape: tuple[int, ...]) -> None:
    if tuple(target.shape) != tuple(meta_shape):
        raise InvalidInputError(
            f"tensor {name}: the model has shape {list(meta_shape)} but the module expects {list(target.shape)}"
        )


def load_into(module: Any, model: Model, *, strict: bool = True, device: Any = None) -> tuple[list[str], list[str]]:
    """Copy a cached model's tensors into ``module`` (in place, keeping its dtypes and devices).

    Returns (missing keys, unexpected keys) like ``load_state_dict``; with strict=True any of
    them, or any shape mismatch, is an InvalidInputError that names the tensors. With
    ``device`` set, weights are streamed there group by group instead of read zero-copy.
    """
    torch = torch_module()
    missing, unexpected = _check_keys(module, model, strict)
    targets = _targets(module)
    for name in model.keys():
        if name in targets:
            _check_shape(name, targets[name], model.meta(name).shape)
    with torch.no_grad():
        if device is None:
            for name in model.keys():
                if name in targets:
                    targets[name].copy_(model.get_tensor(name))
        else:
            for _, group in model.stream(device, copy=True):
                for name, tensor in group.items():
                    if name in targets:
                        targets[name].copy_(tensor, non_blocking=True)
    return missing, unexpected


def _owner_modules(names: list[str]) -> list[str]:
    """Where to hook a group: its common module prefix, or each tensor's own module if the
    group has none below the root (the root's hook would fire before every other layer)."""
    owners = sorted({n.rpartition(".")[0] for n in names})
    common = owners[0].split(".") if owners else []
    for o in owners[1:]:
        parts = o.split(".")
        i = 0
        while i < min(len(common), len(parts)) and common[i] == parts[i]:
            i += 1
        common = common[:i]
    return [".".join(common)] if common else owners


class JustInTime:
    """Forward pre-hooks that materialise each layer group's weights right before it runs.

    The groups arrive through ``model.stream(device, prefetch)``, so while layer i computes,
    layers i+1…i+prefetch are already being read and copied. A hook that needs group k
    consumes the stream up to k (materialising every group on the way), so any execution
    order is correct; the hooks remove themselves once every group has arrived.
    """

    def __init__(
        self, module: Any, model: Model, device: Any, prefetch: int = 2, layer_of: Callable[[str], str] | None = None
    ) -> None:
        self.module = module
        self.model = model
        _check_keys(module, model, strict=True)
        targets = _targets(module)
        for name in model.keys():
            _check_shape(name, targets[name], model.meta(name).shape)
        self._groups = model._groups(layer_of)
        self._stream = iter(model.stream(device, prefetch=prefetch, layer_of=layer_of))
        self._arrived: set[str] = set()
        self._handles: list[Any] = []
        for gname, metas in self._groups:
            for owner in _owner_modules([m.name for m in metas]):
                sub = module.get_submodule(owner) if owner else module
                self._handles.append(sub.register_forward_pre_hook(self._hook_for(gname)))

    def _hook_for(self, gname: str) -> Callable[..., None]:
        def hook(_mod: Any, _args: Any) -> None:
            self.wait_for(gname)

        return hook

    def wait_for(self, gname: str) -> None:
        while gname not in self._arrived:
            try:
                name, tensors = next(self._stream)
            except StopIteration:
                raise InvalidInputError(f"layer group {gname} never arrived from the stream") from None
            self._materialise(tensors)
            self._arrived.add(name)
        if len(self._arrived) == len(self._groups):
            self.remove()

    def _materialise(self, tensors: dict[str, Any]) -> None:
        torch = torch_module()
        for full, tensor in tensors.items():
            owner, _, leaf = full.rpartition(".")
            sub = self.module.get_submodule(owner) if owner else self.module
            old = getattr(sub, leaf)
            if isinstance(old, torch.nn.Parameter):
                value = tensor if tensor.dtype == old.dtype else tensor.to(old.dtype)
                sub._parameters[leaf] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
            else:
                sub._buffers[leaf] = tensor if tensor.dtype == old.dtype else tensor.to(old.dtype)

    def finish(self) -> None:
        """Materialise whatever has not arrived yet (e.g. weights no forward pass touched)."""
        for gname, _ in self._groups:
            self.wait_for(gname)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def materialize_just_in_time(
    module: Any, model: Model, device: Any, prefetch: int = 2, layer_of: Callable[[str], str] | None = None
) -> JustInTime:
    """Arm a module built on the meta device; see ``JustInTime``."""
    return JustInTime(module, model, device, prefetch, layer_of)
