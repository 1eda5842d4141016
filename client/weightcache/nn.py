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
from ._keymap import Fill, fills, is_transformers_model
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
    """What a load will do. ``fills``: which checkpoint tensors make which module tensors (names
    one to one, or transformers' own conversions: see ``_keymap``); ``names[i]``: for each
    tensor fill i makes, every module name it goes to: itself and the names the module ties to
    it (same tensor object), so a tied weight the checkpoint omits (``lm_head.weight`` saved once
    as ``model.embed_tokens.weight``) is filled, and stays tied, rather than reported missing.
    ``by_key``: checkpoint name -> the fill that takes it."""

    targets: dict[str, Any]
    fills: list[Fill]
    names: list[dict[str, list[str]]]
    by_key: dict[str, int]
    missing: list[str]
    unexpected: list[str]

    def covered(self) -> set[str]:
        return {n for names in self.names for group in names.values() for n in group}

    def module_names(self, key: str) -> list[str]:
        """Every module name the checkpoint tensor ``key`` helps to fill."""
        i = self.by_key.get(key)
        return [] if i is None else [n for group in self.names[i].values() for n in group]


def _tie(module: Any) -> None:
    """Tie what a transformers model declares tied (``_tied_weights_keys`` with its config's
    ``tie_word_embeddings``): built under ``init_empty_weights()`` a transformers 5 model is not
    tied yet, and its checkpoint holds the tied weight once."""
    if is_transformers_model(module) and callable(getattr(module, "tie_weights", None)):
        module.tie_weights()


def _plan(module: Any, model: Model, strict: bool, who: str) -> _Plan:
    label = model.name or model.snapshot_id
    _tie(module)
    targets = _targets(module)
    tied: dict[int, list[str]] = {}
    for name, t in targets.items():
        tied.setdefault(id(t), []).append(name)
    order = {k: i for i, k in enumerate(model.keys())}
    made, unexpected = fills(module, order, targets, lambda k: model.meta(k).shape)
    made.sort(key=lambda f: min(order[k] for k in f.keys))
    # transformers' rule for a tie group the checkpoint holds more than once: each name takes
    # its own tensor (it ties them only when equal, so the values are the same either way); a
    # plain module's tie stays, filled by the first copy.
    untie = is_transformers_model(module)
    owner: dict[int, tuple[int, str]] = {}
    kept: list[Fill] = []
    names: list[dict[str, list[str]]] = []
    for fill in made:
        mine: dict[str, list[str]] = {}
        for target in fill.targets:
            if target not in targets:
                continue
            group = id(targets[target])
            if group not in owner:
                owner[group] = (len(kept), target)
                mine[target] = list(tied[group])
            elif untie:
                first, first_target = owner[group]
                names[first][first_target] = [n for n in names[first][first_target] if n != target]
                mine[target] = [target]
            # else: saved more than once (an untied save of tied weights): the first copy fills them all
        if mine:
            kept.append(fill)
            names.append(mine)
    by_key = {k: i for i, fill in enumerate(kept) for k in fill.keys}
    covered = {n for ns in names for group in ns.values() for n in group}
    missing = sorted(n for n in targets if n not in covered)
    unexpected = sorted(unexpected)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing from model {label}: {_first(missing)}")
        if unexpected:
            parts.append(f"not in the module: {_first(unexpected)}")
        raise InvalidInputError(f"{who}(strict=True): " + "; ".join(parts))
    for fill, ns in zip(kept, names, strict=True):
        if fill.convert is None:  # a converted tensor is checked once it is made (see _Collector)
            _check_shape(next(iter(ns.values()))[0], targets[fill.targets[0]], model.meta(fill.keys[0]).shape)
    stuck = [n for n, b in module.named_buffers(remove_duplicate=False) if b.is_meta and n not in covered]
    if stuck:
        raise InvalidInputError(
            f"{who}: buffer(s) {_first(sorted(stuck))} are on the meta device and model {label} does not carry "
            "them, so nothing would ever fill them (the forward pass would fail or compute garbage); build the "
            "module with only its parameters on meta and its buffers on a real device, as accelerate's "
            "init_empty_weights() does by default (torch.device('meta') puts buffers on meta too)"
        )
    return _Plan(targets, kept, names, by_key, missing, unexpected)


class _Collector:
    """Checkpoint tensors in, module tensors out: a fill runs once every tensor it takes has
    arrived (a converter's inputs may span several stream groups)."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.waiting: dict[int, dict[str, Any]] = {}

    def add(self, key: str, tensor: Any) -> list[tuple[list[str], Any]]:
        """(module names, tensor) for whatever ``key`` completes."""
        i = self.plan.by_key.get(key)
        if i is None:  # strict=False: tensors the module does not have are dropped
            return []
        got = self.waiting.setdefault(i, {})
        got[key] = tensor
        fill = self.plan.fills[i]
        if len(got) < len(fill.keys):
            return []
        del self.waiting[i]
        out = []
        for made, value in fill.run(got).items():
            names = self.plan.names[i].get(made)
            if names:
                if fill.convert is not None:
                    _check_shape(names[0], self.plan.targets[names[0]], tuple(value.shape), fill.keys)
                out.append((names, value))
        return out


def _check_shape(name: str, target: Any, meta_shape: tuple[int, ...], made_from: tuple[str, ...] = ()) -> None:
    if tuple(target.shape) != tuple(meta_shape):
        source = f" (made by transformers' conversion from {_first(list(made_from), 3)})" if made_from else ""
        raise InvalidInputError(
            f"tensor {name}{source}: the model has shape {list(meta_shape)} but the module expects {list(target.shape)}"
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

    A transformers model loads as transformers' own ``from_pretrained`` loads it: what it
    declares tied is tied first (``tie_weights()``), and checkpoint names go through the
    installed transformers' conversion mapping (renamed keys, fused MoE experts; see
    ``_keymap``); missing and unexpected then speak of the module's and the checkpoint's names.

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
    collector = _Collector(plan)

    def put(names: list[str], value: Any) -> None:
        target = plan.targets[names[0]]
        if target.is_meta:
            _assign(module, names, target, value)
        else:
            target.copy_(value, non_blocking=device is not None)

    with torch.no_grad():
        if device is None:
            for fill in plan.fills:
                for key in fill.keys:
                    for names, value in collector.add(key, model.get_tensor(key)):
                        put(names, value)
        else:
            for _, group in model.stream(device, copy=True):
                for name, tensor in group.items():
                    for names, value in collector.add(name, tensor):
                        put(names, value)
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
        self._plan = plan
        self._collector = _Collector(plan)
        self._groups = model.groups(layer_of)
        self._stream = model.stream(device, prefetch=prefetch, copy=copy, layer_of=layer_of)
        self._move_the_rest(self._stream.device)
        self._arrived: set[str] = set()
        self._handles: list[Any] = []
        for gname, metas in self._groups:
            names = [n for m in metas for n in plan.module_names(m.name)]
            for owner in _owner_modules(names) if names else ():
                sub = module.get_submodule(owner) if owner else module
                self._handles.append(sub.register_forward_pre_hook(self._hook_for(gname)))

    def _move_the_rest(self, device: Any) -> None:
        covered = self._plan.covered()
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
                for names, value in self._collector.add(full, tensor):
                    owner, _, leaf = names[0].rpartition(".")
                    sub = self.module.get_submodule(owner) if owner else self.module
                    _assign(self.module, names, getattr(sub, leaf), value)

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
