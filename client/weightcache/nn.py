"""torch.nn integration: load a cached model's weights into a module, eagerly or just in time.

from weightcache.nn import load_into, materialize_just_in_time

load_into(module, model, strict=True)      # like load_state_dict, zero-copy source
with accelerate.init_empty_weights():      # parameters on meta, buffers (inv_freq…) real
    module = MyLlama(cfg)
load_into(module, model)                   # meta parameters are assigned, like assign=True
# or, on a fresh meta module:
jit = materialize_just_in_time(module, model, "cuda:0", prefetch=2)
out = module(tokens)   # each layer's weights arrive right before that layer runs
# on "cpu": zero-copy views of the shared pages (copy=True: private copies)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._dtypes import torch_module
from .contract.errors import InvalidInputError

if TYPE_CHECKING:
    from ._model import Model

__all__ = ["JustInTime", "load_into", "materialize_just_in_time"]


def _targets(module: Any) -> dict[str, Any]:
    """Every parameter and persistent buffer of a module by its state_dict name (tied names included)."""
    out: dict[str, Any] = dict(module.named_parameters(remove_duplicate=False))
    for name, buf in module.named_buffers(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        if leaf not in getattr(sub, "_non_persistent_buffers_set", set()):
            out[name] = buf
    return out


def _first(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


@dataclass
class _Plan:
    """What a load will do. ``sources``: checkpoint name -> every module name it fills: itself
    and the names the module ties to it (same tensor object), so a tied weight the checkpoint
    omits (``lm_head.weight`` saved once as ``model.embed_tokens.weight``) is filled, and stays
    tied, rather than reported missing."""

    targets: dict[str, Any]
    sources: dict[str, list[str]]
    missing: list[str]
    unexpected: list[str]


def _plan(module: Any, model: Model, strict: bool, who: str) -> _Plan:
    label = model.name or model.snapshot_id
    targets = _targets(module)
    tied: dict[int, list[str]] = {}
    for name, t in targets.items():
        tied.setdefault(id(t), []).append(name)
    have = set(model.keys())
    sources: dict[str, list[str]] = {}
    missing: list[str] = []
    for names in tied.values():
        present = [n for n in names if n in have]
        if present:
            # Saved more than once (an untied save of tied weights): the first copy fills them all.
            sources[present[0]] = names
        else:
            missing.extend(names)
    missing.sort()
    unexpected = sorted(have - set(targets))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing from model {label}: {_first(missing)}")
        if unexpected:
            parts.append(f"not in the module: {_first(unexpected)}")
        raise InvalidInputError(f"{who}(strict=True): " + "; ".join(parts))
    for src, names in sources.items():
        _check_shape(names[0], targets[names[0]], model.meta(src).shape)
    covered = {n for names in sources.values() for n in names}
    stuck = [n for n, b in module.named_buffers(remove_duplicate=False) if b.is_meta and n not in covered]
    if stuck:
        raise InvalidInputError(
            f"{who}: buffer(s) {_first(sorted(stuck))} are on the meta device and model {label} does not carry "
            "them, so nothing would ever fill them (the forward pass would fail or compute garbage); build the "
            "module with only its parameters on meta and its buffers on a real device, as accelerate's "
            "init_empty_weights() does by default (torch.device('meta') puts buffers on meta too)"
        )
    return _Plan(targets, sources, missing, unexpected)


def _check_shape(name: str, target: Any, meta_shape: tuple[int, ...]) -> None:
    if tuple(target.shape) != tuple(meta_shape):
        raise InvalidInputError(
            f"tensor {name}: the model has shape {list(meta_shape)} but the module expects {list(target.shape)}"
        )


def _assign(module: Any, names: list[str], old: Any, value: Any) -> None:
    """Put ``value`` in place of ``old`` under every name (one object for tied names), keeping
    the module's dtype (a cast copies; matching dtypes stay zero-copy) and requires_grad."""
    torch = torch_module()
    if value.dtype != old.dtype:
        value = value.to(old.dtype)
    new = torch.nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, torch.nn.Parameter) else value
    for full in names:
        owner, _, leaf = full.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        # Module.__setattr__ replaces a parameter with a Parameter and a buffer with a tensor
        # under the same name (a buffer keeps its persistence).
        setattr(sub, leaf, new)


def load_into(module: Any, model: Model, *, strict: bool = True, device: Any = None) -> tuple[list[str], list[str]]:
    """Load a cached model's tensors into ``module``.

    Real tensors are filled in place (``copy_``, keeping their dtypes and devices). Tensors on
    the meta device are replaced, like ``load_state_dict(assign=True)``: by zero-copy views of
    the shared pages (or, with ``device`` set, by tensors streamed there group by group), in
    the module's dtype. A tied weight the checkpoint omits is filled with, and stays tied to,
    the tensor it is tied to. Buffers the checkpoint does not carry are left as the module
    computed them; one still on meta is an InvalidInputError naming it, raised before anything
    is loaded.

    Returns (missing keys, unexpected keys) like ``load_state_dict``; with strict=True any of
    them, or any shape mismatch, is an InvalidInputError that names the tensors.

    A model still downloading (an early open) is loaded only once it is verified and
    committed: eagerly, the whole snapshot is waited for first; with ``device``, group by
    group, the final group after verification (``model.stream``'s rule).
    """
    torch = torch_module()
    plan = _plan(module, model, strict, "load_into")
    if device is None:
        model.backing.wait_complete()  # the module is usable as soon as this returns

    def put(src: str, value: Any) -> None:
        names = plan.sources[src]
        target = plan.targets[names[0]]
        if target.is_meta:
            _assign(module, names, target, value)
        else:
            target.copy_(value, non_blocking=device is not None)

    with torch.no_grad():
        if device is None:
            for name in model.keys():
                if name in plan.sources:
                    put(name, model.get_tensor(name))
        else:
            for _, group in model.stream(device, copy=True):
                for name, tensor in group.items():
                    if name in plan.sources:
                        put(name, tensor)
    return plan.missing, plan.unexpected


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

    The rules are ``load_into``'s: every tensor the checkpoint carries replaces the module's
    (meta or not), tied weights the checkpoint omits arrive with the tensor they are tied to,
    a buffer left on meta is an error at arming time. Tensors the checkpoint does not carry
    (rotary ``inv_freq``, position ids) keep their values and are moved to ``device`` now, so
    the forward pass finds everything on one device. ``missing``/``unexpected`` say what
    strict=False let through.

    On CPU the weights are zero-copy views of the shared page-cache pages where the model's
    backing maps its files (``copy=None``, like ``load_into``): every process on the node that
    runs the model holds one copy of it, and nothing is copied. Each group's pages are brought
    in by the stream's reader before its hook runs. ``copy=True`` gives private copies instead.

    A model still downloading (an early open): each hook waits for exactly its group's
    bytes, and the hook that materialises the last group waits for ``wait_complete()`` first
    (so does the stream), so a forward pass that uses every group cannot finish on bytes that
    fail verification; a failed download raises from the next hook that needs a group.
    """

    def __init__(
        self,
        module: Any,
        model: Model,
        device: Any,
        prefetch: int = 2,
        layer_of: Callable[[str], str] | None = None,
        *,
        strict: bool = True,
        copy: bool | None = None,
    ) -> None:
        torch = torch_module()  # without torch, fail here with the install hint
        if copy is None:
            copy = not (torch.device(device).type == "cpu" and model.zero_copy)
        self.module = module
        self.model = model
        plan = _plan(module, model, strict, "materialize_just_in_time")
        self.missing, self.unexpected = plan.missing, plan.unexpected
        self._sources = plan.sources
        self._groups = model.groups(layer_of)
        self._stream = model.stream(device, prefetch=prefetch, copy=copy, layer_of=layer_of)
        self._move_the_rest(self._stream.device)
        self._arrived: set[str] = set()
        self._handles: list[Any] = []
        for gname, metas in self._groups:
            names = [n for m in metas for n in self._sources.get(m.name, ())]
            for owner in _owner_modules(names) if names else ():
                sub = module.get_submodule(owner) if owner else module
                self._handles.append(sub.register_forward_pre_hook(self._hook_for(gname)))

    def _move_the_rest(self, device: Any) -> None:
        covered = {n for names in self._sources.values() for n in names}
        rest: dict[int, tuple[Any, list[str]]] = {}
        for name, t in [*self.module.named_parameters(remove_duplicate=False),
                        *self.module.named_buffers(remove_duplicate=False)]:  # fmt: skip
            if name not in covered and not t.is_meta and t.device != device:
                rest.setdefault(id(t), (t, []))[1].append(name)
        with torch_module().no_grad():
            for t, names in rest.values():
                _assign(self.module, names, t, t.to(device))

    def _hook_for(self, gname: str) -> Callable[..., None]:
        def hook(_mod: Any, _args: Any) -> None:
            self.wait_for(gname)

        return hook

    def wait_for(self, gname: str) -> None:
        while gname not in self._arrived:
            if len(self._arrived) == len(self._groups) - 1:
                self.model.backing.wait_complete()  # the last group materialises on verified bytes only
            try:
                name, tensors = next(self._stream)
            except StopIteration:
                raise InvalidInputError(
                    f"materialize_just_in_time: layer group {gname} never arrived from the stream"
                ) from None
            self._materialise(tensors)
            self._arrived.add(name)
        if len(self._arrived) == len(self._groups):
            self.remove()

    def _materialise(self, tensors: dict[str, Any]) -> None:
        with torch_module().no_grad():
            for full, tensor in tensors.items():
                names = self._sources.get(full)
                if names is not None:  # strict=False: tensors the module does not have are dropped
                    owner, _, leaf = names[0].rpartition(".")
                    sub = self.module.get_submodule(owner) if owner else self.module
                    _assign(self.module, names, getattr(sub, leaf), tensor)

    def finish(self) -> None:
        """Materialise whatever has not arrived yet (e.g. weights no forward pass touched)."""
        for gname, _ in self._groups:
            self.wait_for(gname)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def materialize_just_in_time(
    module: Any,
    model: Model,
    device: Any,
    prefetch: int = 2,
    layer_of: Callable[[str], str] | None = None,
    *,
    strict: bool = True,
    copy: bool | None = None,
) -> JustInTime:
    """Arm a module built with its parameters on the meta device; see ``JustInTime``."""
    return JustInTime(module, model, device, prefetch, layer_of, strict=strict, copy=copy)
