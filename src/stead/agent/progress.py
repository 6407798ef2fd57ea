"""When each journal record was appended and how big it was: the lag and queue figures."""

from __future__ import annotations

import bisect

MAX_POINTS = 200_000


class AppendLog:
    """Points (last seq of an append, cumulative bytes, monotonic time), oldest first."""

    def __init__(self) -> None:
        self._seqs: list[int] = []
        self._bytes: list[int] = []
        self._times: list[float] = []
        self._total = 0

    def record(self, last_seq: int, nbytes: int, at: float) -> None:
        self._total += nbytes
        self._seqs.append(last_seq)
        self._bytes.append(self._total)
        self._times.append(at)
        if len(self._seqs) > MAX_POINTS:
            # Keep the figures bounded: merge the oldest half into coarser points.
            del self._seqs[: MAX_POINTS // 2 : 2]
            del self._bytes[: MAX_POINTS // 2 : 2]
            del self._times[: MAX_POINTS // 2 : 2]

    def forget_through(self, seq: int) -> None:
        cut = bisect.bisect_right(self._seqs, seq)
        if cut > 1:
            cut -= 1  # keep one point at or below seq as the byte baseline
            del self._seqs[:cut], self._bytes[:cut], self._times[:cut]

    def _index_after(self, seq: int) -> int:
        """Index of the first append that holds a record beyond ``seq``."""
        return bisect.bisect_right(self._seqs, seq)

    def bytes_after(self, seq: int, head: int) -> int:
        if seq >= head or not self._seqs:
            return 0
        index = self._index_after(seq)
        if index >= len(self._seqs):
            return 0
        before = self._bytes[index - 1] if index > 0 else 0
        return self._total - before

    def age_after(self, seq: int, now: float) -> float:
        """Seconds since the oldest change the node has not applied was journaled."""
        index = self._index_after(seq)
        if index >= len(self._seqs):
            return 0.0
        return max(0.0, now - self._times[index])
