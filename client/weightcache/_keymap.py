"""Which checkpoint tensors fill which of a module's tensors.

    checkpoint names ──► Fill(keys, targets, convert) ──► module names (then their tie groups, nn._plan)

A plain ``torch.nn.Module`` takes the checkpoint's names one to one. A transformers model takes
them as transformers' own ``from_pretrained`` does: its conversion mapping for the model
(``transformers.conversion_mapping.get_model_conversion_mapping``: renames such as ViT's
``encoder.layer.N.attention.attention.query`` → ``layers.N.attention.q_proj`` and converters
such as the MoE fusion of ``experts.N.w1/w3`` into ``experts.gate_up_proj``), its key renaming
(``core_model_loading.rename_source_key``, which also adds or strips the base model prefix), and
the converters' own ``convert``. Nothing of it is copied here: a newer transformers brings its
newer mapping. Renames stay zero-copy; a converter builds new tensors (a stack of experts is a
copy by nature).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

__all__ = ["Fill", "fills", "is_transformers_model"]


@dataclass(frozen=True)
class Fill:
    """The checkpoint tensors ``keys`` make the module tensors ``targets``: through ``convert``
    (a transformers converter), or, without one, ``keys[0]`` is ``targets[0]`` as it is."""

    keys: tuple[str, ...]
    targets: tuple[str, ...]
    convert: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def run(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """The module tensors, given every tensor of ``keys``."""
        if self.convert is None:
            return {self.targets[0]: tensors[self.keys[0]]}
        return self.convert(tensors)


def is_transformers_model(module: Any) -> bool:
    """Without importing transformers: a module can only be one if transformers is loaded."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


def fills(
    module: Any, keys: Iterable[str], targets: dict[str, Any], shape_of: Callable[[str], tuple[int, ...]]
) -> tuple[list[Fill], list[str]]:
    """How the checkpoint names ``keys`` fill ``targets`` (the module's state_dict names; tied
    names are one tensor object), and the checkpoint names that fill nothing. ``shape_of``: a
    checkpoint tensor's shape."""
    keys = list(keys)
    prefix = None
    if is_transformers_model(module) and not _as_saved(keys, targets, shape_of):
        machinery = _machinery()
        if machinery is not None:
            return _converted(module, keys, targets, machinery)
        prefix = getattr(module, "base_model_prefix", None) or None
    out: list[Fill] = []
    unexpected: list[str] = []
    for key in keys:
        name = key
        if key not in targets and prefix is not None:
            # transformers' own rule: a base model's checkpoint in a model with a head, and back
            stripped = key.removeprefix(prefix + ".")
            name = stripped if stripped != key and stripped in targets else f"{prefix}.{key}"
        if name in targets:
            out.append(Fill((key,), (name,)))
        else:
            unexpected.append(key)
    return out, unexpected


def _as_saved(keys: list[str], targets: dict[str, Any], shape_of: Callable[[str], tuple[int, ...]]) -> bool:
    """The checkpoint already is the module's state dict: every tensor (or one of each tie
    group) under the module's name, in the module's shape. Then there is nothing to convert,
    and transformers' conversion table (~1,100 patterns, whose compiling costs transformers some
    50 ms of CPU on its first load in a process) is not needed. What this cannot see is a
    conversion that keeps a tensor's name and shape and changes its layout: transformers has
    none today but Qwen3-VL-MoE's transposes of its fused expert tensors, which keep the shape
    only when those are square (hidden size equal to the expert width, or twice it)."""
    have = set(keys)
    if not have <= targets.keys():
        return False
    filled = {id(targets[k]) for k in have}
    if any(id(t) not in filled for t in targets.values()):
        return False
    return all(tuple(targets[k].shape) == tuple(shape_of(k)) for k in have)


def _machinery() -> Any:
    """transformers' conversion machinery (5.0 and later), or None for an older transformers,
    whose checkpoints then load by name (and base model prefix)."""
    try:
        from transformers import conversion_mapping, core_model_loading
    except ImportError:
        return None
    needed = ("WeightConverter", "WeightRenaming", "rename_source_key", "dot_natural_key")
    if not hasattr(conversion_mapping, "get_model_conversion_mapping") or not all(
        hasattr(core_model_loading, n) for n in needed
    ):
        return None
    return conversion_mapping, core_model_loading


def _converted(module: Any, keys: list[str], targets: dict[str, Any], machinery: Any) -> tuple[list[Fill], list[str]]:
    """``convert_and_load_state_dict_in_model``'s first pass (rename every key, collect the keys
    of each converter target), with our tensors arriving later, group by group."""
    conversion_mapping, core = machinery
    transforms = conversion_mapping.get_model_conversion_mapping(module)
    renamings = [t for t in transforms if isinstance(t, core.WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, core.WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = getattr(module, "base_model_prefix", None) or None
    plain: list[Fill] = []
    unexpected: list[str] = []
    collected: dict[str, tuple[Any, list[tuple[str, str]]]] = {}
    # transformers' own order: the experts of a layer are stacked in the order their keys sort.
    for key in sorted(keys, key=core.dot_natural_key):
        renamed, pattern = core.rename_source_key(key, renamings, converters, prefix, targets)
        if renamed not in targets and key in targets:
            renamed, pattern = core.rename_source_key(key, [], [], prefix, targets)
        if renamed not in targets:
            unexpected.append(key)
        elif pattern is None:
            plain.append(Fill((key,), (renamed,)))
        else:
            collected.setdefault(renamed, (by_pattern[pattern], []))[1].append((key, pattern))
    out = list(plain)
    for first, (converter, sources) in collected.items():
        made = tuple(first.replace(converter.target_patterns[0], t, 1) for t in converter.target_patterns)
        out.append(Fill(tuple(k for k, _ in sources), made, _converter_call(module, converter, first, sources)))
    return out, unexpected


def _converter_call(
    module: Any, converter: Any, first: str, sources: list[tuple[str, str]]
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def convert(tensors: dict[str, Any]) -> dict[str, Any]:
        conv = deepcopy(converter)  # a converter collects its inputs in itself: one per call
        for key, pattern in sources:
            conv.add_tensor(first, key, pattern, tensors[key])
        # loading_info=None: a failing operation raises (transformers would log it and skip the weight)
        made = conv.convert(first, model=module, config=module.config, hf_quantizer=None, loading_info=None)
        return {name: value[0] if isinstance(value, list) else value for name, value in made.items()}

    return convert
