"""Bin packing of conversations into rows of at most `capacity` tokens, in O(n log capacity).

Both packers keep the open rows in buckets by free space: `caps` is the sorted list of distinct free-space values
that some open row has, `buckets[c]` a min-heap of the row ids with `c` tokens free. Best fit for an item of
length L is then `bisect_left(caps, L)` (the tightest row that still fits) and the lowest row id in that bucket
(ties go to the earliest row, as the old linear scan did). `caps` never holds more than `capacity` values, so an
insertion into it costs O(capacity) memmove at worst and the whole pass O(n log n + n · capacity / 8 bytes).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence

import numpy as np


class _OpenRows:
    """Rows with free space, by free space; full rows leave the structure."""

    def __init__(self, capacity: int) -> None:
        assert capacity > 0
        self.capacity = capacity
        self.caps: list[int] = []
        self.buckets: dict[int, list[int]] = {}
        self.count = 0  # rows created so far

    def place(self, length: int) -> int:
        """Put an item of `length` into its best-fit row (a new one when none fits); return the row id."""
        assert 0 < length <= self.capacity, (length, self.capacity)
        i = bisect.bisect_left(self.caps, length)
        if i == len(self.caps):
            row, free = self.count, self.capacity - length
            self.count += 1
        else:
            cap = self.caps[i]
            bucket = self.buckets[cap]
            row = heapq.heappop(bucket)
            if not bucket:
                del self.buckets[cap]
                del self.caps[i]
            free = cap - length
        if free > 0:
            bucket = self.buckets.get(free)
            if bucket is None:
                self.buckets[free] = [row]
                bisect.insort(self.caps, free)
            else:
                heapq.heappush(bucket, row)
        return row


def best_fit(lengths: Sequence[int], capacity: int) -> np.ndarray:
    """Online best fit in the given order: the row id of every item (rows numbered in creation order)."""
    rows = _OpenRows(capacity)
    return np.fromiter((rows.place(int(n)) for n in lengths), dtype=np.int64, count=len(lengths))


def best_fit_decreasing_rows(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best fit decreasing over a length multiset: (rank → row id, rank → length).

    `rank` is an item's position when all items are sorted by length, longest first. Items of equal length are
    interchangeable, so the rows (their count and the lengths in each) depend only on the multiset of lengths:
    any assignment of conversations to ranks that keeps the lengths gives a valid packing with the same rows.
    This is what lets every epoch get its own packing (equal-length conversations permuted by (seed, epoch))
    without packing again, and makes the number of rows per epoch a constant.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    assert lengths.ndim == 1 and (lengths > 0).all() and (lengths <= capacity).all()
    sorted_lengths = -np.sort(-lengths, kind="stable")
    rows = _OpenRows(capacity)
    # Consecutive equal lengths are common (short conversations): place() stays O(log) either way.
    row_of_rank = np.fromiter((rows.place(int(n)) for n in sorted_lengths), dtype=np.int64, count=len(sorted_lengths))
    return row_of_rank, sorted_lengths


def fill_ratio(lengths: np.ndarray, row_count: int, capacity: int) -> float:
    """Tokens over row slots: 1.0 means no padding at all."""
    return float(np.asarray(lengths).sum()) / max(row_count * capacity, 1)
