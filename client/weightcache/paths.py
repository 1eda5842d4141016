"""Socket names and resolution, under their public name (defined in
``weightcache.contract.paths``, which the daemon and cachectl share)."""

from .contract.paths import *  # noqa: F403
from .contract.paths import __all__ as __all__
