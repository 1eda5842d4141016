"""The one progress bar (``open(progress=True)`` and ``cachectl prefetch``/``verify``) and
human-readable sizes, shared by the client and the daemon's command-line tools."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ._records import Progress

__all__ = ["Bar", "human"]


def human(n: float) -> str:
    """Bytes as B, KiB, MiB, GiB or TiB (1024-based)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Bar:
    """A one-line bar redrawn in place on ``stream`` (stderr), at most every ``interval``
    seconds so a fast stream of events does not flood the terminal; the final state is always
    drawn by ``close()``. Disabled, it draws nothing (not a terminal, or --json).

    Call it with a ``Progress`` record (a ``progress=`` callback), or ``update(...)`` with the
    numbers directly.
    """

    def __init__(
        self, enabled: bool = True, width: int = 30, interval: float = 0.1, stream: TextIO | None = None
    ) -> None:
        self.enabled = enabled
        self.width = width
        self.interval = interval
        self.stream = stream if stream is not None else sys.stderr
        self._last = float("-inf")
        self._pending: str | None = None
        self._drawn = False

    def __call__(self, p: Progress) -> None:
        note = f"{p.files_done}/{p.files_total} files {p.phase}".rstrip()
        self.update(p.bytes_done, p.bytes_total, p.bytes_per_second, note)

    def line(self, done: int, total: int, rate: float, note: str) -> str:
        """The text of one frame (without the leading carriage return)."""
        frac = done / total if total else 0.0
        filled = int(frac * self.width)
        rate_text = f" {human(rate)}/s" if rate > 0 else ""
        eta = f" eta {int((total - done) / rate)}s" if rate > 0 and total > done else ""
        return (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {frac * 100:5.1f}% "
            f"{human(done)}/{human(total)}{rate_text}{eta} {note}"
        ).rstrip()

    def update(self, done: int, total: int, rate: float = 0.0, note: str = "") -> None:
        if not self.enabled:
            return
        self._pending = self.line(done, total, rate, note)
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._draw()

    def _draw(self) -> None:
        if self._pending is None:
            return
        self.stream.write("\r" + self._pending[:200].ljust(100))
        self.stream.flush()
        self._pending = None
        self._drawn = True

    def close(self) -> None:
        self._draw()  # the last state, even if it came sooner than ``interval``
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
