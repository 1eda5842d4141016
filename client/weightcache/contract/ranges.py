"""Byte ranges as the Readiness events carry them: sorted, disjoint ``[start, end)`` pairs,
touching ones joined. The daemon keeps what is on disk in this form and the client what it was
told, so both sides use these two functions."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

__all__ = ["Ranges", "covered", "merge"]

Ranges = list[tuple[int, int]]


def merge(ranges: Ranges, start: int, end: int) -> Ranges:
    """[start, end) added to the ranges; returns the new list (an empty range changes nothing)."""
    if start >= end:
        return ranges
    out: Ranges = []
    for s, e in ranges:
        if e < start or s > end:
            out.append((s, e))
        else:
            start, end = min(s, start), max(e, end)
    out.append((start, end))
    out.sort()
    return out


def covered(ranges: Sequence[tuple[int, int]], start: int, end: int) -> bool:
    """Whether [start, end) lies inside one of the ranges."""
    if start >= end:
        return True
    i = bisect_right(ranges, (start, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= start and end <= ranges[i][1]
