"""Human-readable sizes for the daemon's messages and logs.

The implementation (and the progress bar cachectl draws) lives in ``weightcache.progress``,
shared with the client; this name stays so the daemon's modules import it from their own
package.
"""

from __future__ import annotations

from weightcache.progress import human

__all__ = ["human"]
