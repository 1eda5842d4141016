"""A one-line progress bar for terminals (stderr), and human-readable sizes."""

from __future__ import annotations

import sys
import time


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Bar:
    def __init__(self, enabled: bool, width: int = 30) -> None:
        self.enabled = enabled
        self.width = width
        self._last = 0.0
        self._drawn = False

    def update(self, done: int, total: int, rate: float, note: str) -> None:
        if not self.enabled or time.monotonic() - self._last < 0.1:
            return
        self._last = time.monotonic()
        frac = done / total if total else 0.0
        filled = int(frac * self.width)
        eta = f" eta {int((total - done) / rate)}s" if rate > 0 and total > done else ""
        line = (
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] {frac * 100:5.1f}% "
            f"{human(done)}/{human(total)} {human(rate)}/s{eta} {note}"
        )
        sys.stderr.write(line[:200].ljust(100))
        sys.stderr.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
