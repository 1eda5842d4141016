"""include/exclude globs, compiled once and kept in a cache of bounded size.

``fnmatch`` keeps every pattern it ever compiled (up to 32768 of them, of any length) in a
module-wide cache; patterns here come from clients, so they are compiled here instead, into an
LRU of ``limits.glob_cache_size`` entries, each at most ``limits.glob_length_max`` characters
(checked where the request enters, edges/handlers.py). The matching rules are fnmatch's
(``fnmatchcase``: case-sensitive; ``*`` also matches ``/``).
"""

from __future__ import annotations

import fnmatch
import re
import threading
from collections import OrderedDict

__all__ = ["GlobCache"]


class GlobCache:
    """Compiled patterns, least recently used dropped first; shared by download threads."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._compiled: OrderedDict[str, re.Pattern[str]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._compiled)

    def compiled(self, pattern: str) -> re.Pattern[str]:
        with self._lock:
            rx = self._compiled.get(pattern)
            if rx is not None:
                self._compiled.move_to_end(pattern)
                return rx
        rx = re.compile(fnmatch.translate(pattern))
        with self._lock:
            self._compiled[pattern] = rx
            while len(self._compiled) > self.size:
                self._compiled.popitem(last=False)
        return rx

    def match(self, name: str, pattern: str) -> bool:
        return self.compiled(pattern).match(name) is not None
