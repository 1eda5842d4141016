"""Asking the kernel to read a file range into the page cache ahead of use.

One ``POSIX_FADV_WILLNEED`` call reads at most one readahead window of its range (Linux caps
it at the device's ``read_ahead_kb``), so a range is asked for one window per call. Each call
only queues its reads; it blocks only while the device queue is full. The client uses it for
the groups a reader will want next, the daemon for ingest bytes its hash will read back.
"""

from __future__ import annotations

import mmap
import os

__all__ = ["willneed", "window"]

DEFAULT_WINDOW = 128 << 10  # the kernel's own default, when the device does not say

_windows: dict[int, int] = {}


def window(fd: int) -> int:
    """Bytes one WILLNEED call reads on fd's device (its block queue's read_ahead_kb)."""
    dev = os.fstat(fd).st_dev
    size = _windows.get(dev)
    if size is None:
        size = DEFAULT_WINDOW
        base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
        for q in (f"{base}/queue/read_ahead_kb", f"{base}/../queue/read_ahead_kb"):  # a disk, a partition
            try:
                with open(q) as f:
                    size = max(int(f.read()) << 10, mmap.PAGESIZE)
                break
            except (OSError, ValueError):
                continue
        _windows[dev] = size
    return size


def willneed(fd: int, offset: int, length: int) -> None:
    """Queue reads of [offset, offset + length) of fd into the page cache."""
    end, step = offset + length, window(fd)
    for o in range(offset, end, step):
        os.posix_fadvise(fd, o, min(step, end - o), os.POSIX_FADV_WILLNEED)
