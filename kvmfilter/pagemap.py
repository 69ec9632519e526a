"""L3: the guest's shared (decrypted) memory, as sorted disjoint intervals.

Pure: no cffi, no fds.  An encrypted-memory VM starts all-private (commit text
of 0dbb11230437: all guest memory starts out encrypted); each
KVM_HC_MAP_GPA_RANGE marks a range shared or private.  Memory and time depend
on the number of ranges, never on the number of pages: a guest may declare
terabytes.  Every update is O(log n + k) list work (k = ranges it touches).
"""
from __future__ import annotations

import threading
from bisect import bisect_left, bisect_right


class PageMap:
    """Half-open byte ranges [start, end) the guest declared shared.

    Args:
        tracking: False for a VM without encrypted memory: nothing to track,
            and the report says so.
    """

    def __init__(self, tracking: bool = True):
        self.tracking = tracking
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._shared_bytes = 0
        self.updates = 0
        self._lock = threading.Lock()

    def set_shared(self, start: int, end: int) -> None:
        """Mark [start, end) shared, merging with touching or overlapping ranges."""
        if end <= start:
            return
        with self._lock:
            starts, ends = self._starts, self._ends
            i = bisect_left(ends, start)  # first range ending at or after start
            j = bisect_right(starts, end)  # ranges starting at or before end
            if i < j:
                start = min(start, starts[i])
                end = max(end, ends[j - 1])
                removed = sum(e - s for s, e in zip(starts[i:j], ends[i:j]))
            else:
                removed = 0
            starts[i:j] = [start]
            ends[i:j] = [end]
            self._shared_bytes += (end - start) - removed
            self.updates += 1

    def set_private(self, start: int, end: int) -> None:
        """Mark [start, end) private (encrypted), splitting ranges it cuts."""
        if end <= start:
            return
        with self._lock:
            starts, ends = self._starts, self._ends
            i = bisect_right(ends, start)  # first range ending after start
            j = bisect_left(starts, end)  # ranges starting before end
            self.updates += 1
            if i >= j:
                return
            removed = sum(e - s for s, e in zip(starts[i:j], ends[i:j]))
            new_starts, new_ends = [], []
            if starts[i] < start:
                new_starts.append(starts[i])
                new_ends.append(start)
            if ends[j - 1] > end:
                new_starts.append(end)
                new_ends.append(ends[j - 1])
            starts[i:j] = new_starts
            ends[i:j] = new_ends
            self._shared_bytes -= removed - sum(e - s for s, e in zip(new_starts, new_ends))

    def update(self, start: int, end: int, shared: bool) -> None:
        (self.set_shared if shared else self.set_private)(start, end)

    def is_shared(self, address: int) -> bool:
        with self._lock:
            i = bisect_right(self._starts, address) - 1
            return i >= 0 and address < self._ends[i]

    @property
    def shared_bytes(self) -> int:
        return self._shared_bytes

    def __len__(self) -> int:
        return len(self._starts)

    def ranges(self) -> list[tuple[int, int]]:
        with self._lock:
            return list(zip(self._starts, self._ends))

    def snapshot(self) -> dict:
        """The run report's ``page_map`` section (design.md)."""
        return {"tracking": self.tracking,
                "shared": [[s, e] for s, e in self.ranges()],
                "shared_bytes": self._shared_bytes,
                "ranges": len(self),
                "updates": self.updates}
