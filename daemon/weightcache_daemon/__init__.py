"""weightcached: the node-level model-weight cache daemon."""

__version__ = "0.1.0"
