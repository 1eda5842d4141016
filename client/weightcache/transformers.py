"""One call for Hugging Face transformers: a model built from a cached snapshot, weights read once.

    from weightcache.transformers import from_pretrained

    with from_pretrained("llama-8b") as lm:            # a name, snapshot id or source URI
        ids = lm.tokenizer("Hello", return_tensors="pt")
        out = lm.model.generate(**ids)

The config, generation config and tokenizer come from the snapshot (through ``Model.path``,
so this works in a container that mounts only the socket directory); the model is built with
accelerate's ``init_empty_weights`` (parameters on meta, buffers real) and its parameters are
then the snapshot's zero-copy tensors on CPU (nothing read twice, pages shared with every
process on the node), or, on CUDA, streamed there just in time (each layer's weights copied
right before it first runs) or all at once (``just_in_time=False``).

On a cold node (the model still downloading) a just-in-time load returns as soon as the config
and the embeddings are on disk: the config, tokenizer and generation config are read from a
private copy of those small files (the daemon fetches them first), the layers then compute as
their bytes arrive, and the last one waits for the verified snapshot.

Needs the ``transformers`` extra (``pip install 'weightcache[transformers]'``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from ._client import Client, connect
from ._dtypes import torch_module
from ._model import Model
from .contract.errors import InvalidInputError
from .nn import JustInTime, load_into, materialize_just_in_time

__all__ = ["Pretrained", "from_pretrained"]

# Files whose presence means the snapshot carries a tokenizer (transformers' own names).
_TOKENIZER_FILES = frozenset(
    {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model"}
)


@dataclass
class Pretrained:
    """What ``from_pretrained`` built. ``close()`` (or the ``with`` block) gives the lease back
    and removes ``handle.path``; CPU weights keep working after it (their mappings live with the
    tensors), a just-in-time model must have run (or ``just_in_time.finish()``) before it."""

    model: Any
    tokenizer: Any | None
    config: Any
    handle: Model
    just_in_time: JustInTime | None = None
    unexpected: list[str] = field(default_factory=list)
    _owned: list[Any] = field(default_factory=list, repr=False)

    def close(self) -> None:
        for thing in self._owned:
            thing.close()
        self._owned = []

    def __enter__(self) -> Pretrained:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Non-weight files larger than this are not copied for an early start (see _EarlyFiles).
EARLY_FILE_LIMIT = 64 << 20


class _EarlyFiles:
    """The non-weight files of a model still downloading (config, generation config, tokenizer,
    index), copied into a private temporary directory as soon as each is on disk.

    transformers reads them by path, and ``Model.path`` waits for the committed snapshot,
    because a path-based loader reads the weights too. The daemon fetches these small files
    first, so this directory exists within moments of ``open()``; the weights are then read
    just in time, and the last layer group still waits for the verified snapshot (see
    ``weightcache.nn``), so nothing finishes on bytes that fail verification. ``close()``
    removes the directory."""

    def __init__(self, handle: Model) -> None:
        self.path = tempfile.mkdtemp(prefix="weightcache-early-")
        try:
            for f in handle.files:
                if f.path.endswith(".safetensors") or f.size > EARLY_FILE_LIMIT:
                    continue
                parts = f.path.split("/")
                if any(p in ("", ".", "..") for p in parts):
                    raise InvalidInputError(f"model {handle.name or handle.snapshot_id}: file path {f.path!r} is not a "
                                            "plain relative path")  # fmt: skip
                buf = bytearray(f.size)
                if f.size:
                    handle.backing.read_into(f.path, 0, memoryview(buf))  # waits until the file is on disk
                dest = os.path.join(self.path, *parts)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with open(dest, "xb") as out:
                    out.write(buf)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _libraries() -> tuple[Any, Any]:
    try:
        import accelerate
        import transformers
    except ImportError as exc:
        raise ImportError(
            f"weightcache.transformers needs transformers and accelerate ({exc.name} is missing): "
            "pip install 'weightcache[transformers]'"
        ) from None
    return transformers, accelerate


def _resolve_dtype(dtype: Any, config: Any, handle: Model) -> Any:
    """'auto' (transformers' own default since 5.0): the config's dtype, else the checkpoint's
    first floating dtype, else float32. A string names a torch dtype."""
    torch = torch_module()
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if dtype is None:
            from ._dtypes import torch_dtype

            floats = (torch_dtype(handle.meta(n).dtype) for n in handle.keys())
            dtype = next((d for d in floats if d.is_floating_point), torch.float32)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise InvalidInputError(f"dtype {dtype!r} is not a torch dtype")
        dtype = getattr(torch, dtype)
    return dtype


def _model_class(transformers: Any, config: Any, model_class: Any) -> Any:
    """The class that saved the checkpoint (config.architectures[0]), so the module's names are
    the checkpoint's; a model_class (concrete or Auto*) overrides it."""
    if model_class is not None:
        return model_class
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _no_init_weights(transformers: Any) -> AbstractContextManager[Any]:
    """transformers' own switch for skipping weight init (moved between 4.x and 5.x)."""
    import importlib

    for where in ("initialization", "modeling_utils"):
        try:
            module = importlib.import_module(f"{transformers.__name__}.{where}")
        except ImportError:
            continue
        if hasattr(module, "no_init_weights"):
            return module.no_init_weights()  # type: ignore[no-any-return]
    return nullcontext()


def _missing_error(hf: Any, handle: Model, missing: list[str], unexpected: list[str]) -> InvalidInputError:
    """Why weights have no tensor, blaming the model class only when that is the cause: a model
    with a head built over a checkpoint of its base model (every missing weight outside it)."""
    label = handle.name or handle.snapshot_id
    cls = type(hf).__name__
    head = f"model {label} has no tensors for {len(missing)} weight(s) of {cls}: {', '.join(missing[:10])}; "
    prefix = getattr(hf, "base_model_prefix", "")
    base = getattr(hf, prefix, None) if prefix else None
    if base is not None and base is not hf and not any(n.startswith(prefix + ".") for n in missing):
        saved = getattr(hf.config, "architectures", None) or ["?"]
        return InvalidInputError(
            head + f"the checkpoint holds the base model ({type(base).__name__}) without them, and weightcache "
            f"does not initialise weights at random: pass the model_class the checkpoint was saved with "
            f"(its config says {', '.join(saved)}), or a checkpoint that has the head"
        )
    if unexpected:
        return InvalidInputError(
            head + f"and {len(unexpected)} of its tensors fill no weight of {cls} even after transformers' "
            f"conversion mapping for model type {getattr(hf.config, 'model_type', '?')!r}: "
            f"{', '.join(unexpected[:10])}; the checkpoint's layout is not one this transformers loads"
        )
    return InvalidInputError(head + "the checkpoint lacks them, and weightcache does not initialise weights at random")


def from_pretrained(
    model: str | Model,
    *,
    client: Client | None = None,
    socket_dir: str | os.PathLike[str] | None = None,
    device: Any = "cpu",
    dtype: Any = "auto",
    model_class: Any = None,
    tokenizer: bool = True,
    just_in_time: bool | None = None,
    prefetch: int = 2,
    progress: Any = None,
    **config_kwargs: Any,
) -> Pretrained:
    """Build a transformers model from a cached model (name, snapshot id, URI, or an open handle).

    device="cpu": the parameters are zero-copy views of the shared pages (a dtype different
    from the checkpoint's casts, i.e. copies). device="cuda[:n]": streamed there just in time
    (default) or eagerly (``just_in_time=False``). ``model_class``: e.g.
    ``AutoModelForSequenceClassification``; by default the class in ``config.architectures``.
    Weights the checkpoint lacks are an InvalidInputError naming them (transformers would
    initialise them at random); tensors the module lacks are listed in ``unexpected``.
    ``config_kwargs`` go to ``AutoConfig.from_pretrained``.
    """
    transformers, accelerate = _libraries()
    torch = torch_module()
    owned: list[Any] = []
    try:
        if isinstance(model, Model):
            handle = model
        else:
            if client is None:
                client = connect(socket_dir)
                owned.append(client)
            handle = client.open(model, progress=progress)
            owned.insert(0, handle)  # closed before its client
        target = torch.device(device)
        jit_on = target.type != "cpu" if just_in_time is None else just_in_time
        if jit_on and not handle.complete():
            # A cold model: build it from its small files while the weights still arrive.
            early = _EarlyFiles(handle)
            owned.insert(0, early)
            path = early.path
        else:
            path = handle.path
        config = transformers.AutoConfig.from_pretrained(path, **config_kwargs)
        dtype = _resolve_dtype(dtype, config, handle)
        cls = _model_class(transformers, config, model_class)
        build = cls._from_config if hasattr(cls, "_from_config") else cls.from_config
        # Parameters on meta, buffers (inv_freq, position ids) real; no random init of the
        # parameters we are about to replace (on meta it is ~60 ms of wasted work per 0.7 GiB).
        with accelerate.init_empty_weights(), _no_init_weights(transformers):
            hf = build(config, dtype=dtype)
        # The checkpoint's names go through transformers' own conversion mapping, and what the
        # model declares tied is tied (see weightcache.nn / _keymap).
        jit: JustInTime | None = None
        if jit_on:
            jit = materialize_just_in_time(hf, handle, target, prefetch, strict=False)
            missing, unexpected = jit.missing, jit.unexpected
            layers = handle.layers()
            if layers:
                # The embeddings first: ``model.device``/``dtype`` (which generate() reads
                # before any hook fires) follow the first parameter, which would still be meta.
                jit.wait_for(layers[0].name)
        else:
            missing, unexpected = load_into(hf, handle, strict=False, device=None if target.type == "cpu" else target)
            if target.type != "cpu":
                hf.to(target)  # buffers the checkpoint does not carry
        if missing:
            raise _missing_error(hf, handle, missing, unexpected)
        hf.eval()
        if hf.can_generate() and any(f.path == "generation_config.json" for f in handle.files):
            hf.generation_config = transformers.GenerationConfig.from_pretrained(path)
        tok = None
        if tokenizer and any(f.path.rsplit("/", 1)[-1] in _TOKENIZER_FILES for f in handle.files):
            tok = transformers.AutoTokenizer.from_pretrained(path)
        return Pretrained(hf, tok, config, handle, jit, unexpected, owned)
    except BaseException:
        for thing in owned:
            thing.close()
        raise
