"""weightcached: the node-level model-weight cache daemon."""

from weightcache import __version__

__all__ = ["__version__"]
