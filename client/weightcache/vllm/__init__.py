"""weightcache for vLLM: a ``weightcache`` load format and a launcher for cold nodes.

- The load format (``--load-format weightcache``) is registered in every vLLM process (API
  server, engine core, workers) through the ``vllm.general_plugins`` entry point of this
  distribution, which calls ``register()``. Its weights come from the daemon, not from files
  in ``--model``: ``--model-loader-extra-config '{"model": "<name | URI | snapshot id>"}'``.
- ``prepare()`` / ``serve()`` / the ``weightcache-vllm`` command open a model (while it still
  downloads, if it does), hold its lease for the server's lifetime and start vLLM on it with
  that load format.

Nothing here imports vLLM until vLLM itself calls ``register()``: the launcher runs in any
Python, and starts vLLM with the interpreter it is given.
"""

from ._launcher import Prepared, prepare, serve
from ._options import LOAD_FORMAT, LoaderOptions

__all__ = ["LOAD_FORMAT", "LoaderOptions", "Prepared", "prepare", "register", "serve"]


def register() -> None:
    """The ``vllm.general_plugins`` entry point: make ``--load-format weightcache`` known.
    vLLM calls it once in each of its processes; registering twice is harmless.

    vLLM calls every installed plugin without catching its errors, so a vLLM without the
    loader interface this needs (``register_model_loader``, ``BaseModelLoader``) gets a
    warning, not a crash: vLLM keeps working, and ``--load-format weightcache`` is refused by
    vLLM as unknown."""
    try:
        from ._loader import register_loader
    except (ImportError, AttributeError) as exc:
        import logging

        logging.getLogger("vllm.weightcache").warning(
            "weightcache: load format %r not registered: this vLLM lacks the model loader interface it needs (%s)",
            LOAD_FORMAT,
            exc,
        )
        return
    register_loader()
