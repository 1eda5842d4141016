"""What a listing must look like to be a model (docs/sources.md, "What a model directory holds").

A model holds safetensors weights at its root (``model.safetensors``,
``model-00001-of-00004.safetensors``), or an index at its root that names weights in
sub-directories (``*.safetensors.index.json``, or a diffusers ``model_index.json`` naming its
component folders). Anything else is refused before a byte is fetched, with the rule and what
was found instead: a directory of only ``config.json`` and a tokenizer would publish a model
with no tensors, and the parent of a model directory would publish every file under ``sub/``
as a model that no framework can load from its root.

The opt-in is naming the files: a request with its own ``include`` globs (``cachectl prefetch
URI --include '*'``, ``include=["tokenizer.json"]``) gets exactly what it named, weights or
not; the rule guards the default selection, which is where a wrong directory goes unnoticed.
"""

from __future__ import annotations

from collections.abc import Sequence

from weightcache.contract.errors import InvalidInputError
from weightcache_daemon.sources import RemoteObject

__all__ = ["check_layout"]

# Besides *.safetensors.index.json: a diffusers pipeline's index, its components in folders.
ROOT_INDEXES = ("model_index.json",)
RULE = (
    "a model must hold safetensors weights at its root (model.safetensors, model-00001-of-0000N.safetensors), "
    "or an index there naming them (model.safetensors.index.json)"
)


def _show(paths: Sequence[str], limit: int = 6) -> str:
    more = f", … (+{len(paths) - limit} more)" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def check_layout(uri: str, objects: Sequence[RemoteObject], *, chosen: bool, filtered: bool) -> None:
    """Refuse a selection that is not a model. `chosen`: the caller named the files with its own
    include globs (the opt-in); `filtered`: exclude globs narrowed the listing."""
    if chosen:
        return
    rels = [o.relpath for o in objects]
    top = [r for r in rels if "/" not in r]
    if any(r.endswith(".safetensors") for r in top):
        return
    nested = sorted(r for r in rels if r.endswith(".safetensors"))
    if nested and any(r in ROOT_INDEXES or r.endswith(".safetensors.index.json") for r in top):
        return
    narrowed = " (after exclude: it may have left the weights out)" if filtered else ""
    opt_in = "; to cache these files anyway, name them: --include '*' (include=['*'] for a client)"
    if not nested:
        raise InvalidInputError(
            f"source {uri}: no safetensors weights in {len(rels)} file(s){narrowed}: {_show(rels)}; {RULE}. "
            f"Point at the directory that holds the weights{opt_in}"
        )
    dirs = sorted({r.rsplit("/", 1)[0] for r in nested})
    base = uri if uri.endswith("/") else uri + "/"
    raise InvalidInputError(
        f"source {uri}: no safetensors weights at its root{narrowed}, only under {_show([d + '/' for d in dirs])}; "
        f"{RULE}. Is this the parent of a model directory? Prefetch the model's own directory, e.g. {base}{dirs[0]}/"
        f"{opt_in}"
    )
