"""The client's error tree, under its public name (defined in ``weightcache.contract.errors``,
which the daemon shares)."""

from .contract.errors import *  # noqa: F403
from .contract.errors import __all__ as __all__
