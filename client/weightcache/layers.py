"""Layer groups (docs/architecture.md, decision 9): the order in which tensors are streamed and fetched.

A tensor belongs to ``layers.<n>`` when its name contains ``layers.<n>.`` (also
``h.<n>.``, ``blocks.<n>.``, ``layer.<n>.``, the common transformer spellings);
embeddings (names with ``embed`` or ``wte``/``wpe``) come first, numbered layers
in numeric order next, and everything else (final norm, lm_head) last as ``rest``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

__all__ = ["EMBED", "REST", "LayerFn", "default_layer_of", "order_layers"]

EMBED = "embed"
REST = "rest"
LayerFn = Callable[[str], str]

_NUMBERED = re.compile(r"(?:^|\.)(layers|h|blocks|layer)\.(\d+)\.")
_EMBED = re.compile(r"(?:^|\.)(embed_tokens|embed|embeddings|wte|wpe|tok_embeddings)(?:\.|$)")


def default_layer_of(name: str) -> str:
    m = _NUMBERED.search(name)
    if m:
        return f"layers.{int(m.group(2))}"
    if _EMBED.search(name):
        return EMBED
    return REST


def _sort_key(layer: str) -> tuple[int, int, str]:
    if layer == EMBED:
        return (0, 0, "")
    if layer.startswith("layers.") and layer[7:].isdigit():
        return (1, int(layer[7:]), "")
    if layer == REST:
        return (3, 0, "")
    return (2, 0, layer)


def order_layers(layers: Iterable[str]) -> list[str]:
    """Distinct layer names in stream order: embed, layers.0…N numerically, custom, rest."""
    return sorted(set(layers), key=_sort_key)
