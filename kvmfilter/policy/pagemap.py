"""L3: the guest's shared (decrypted) memory, as sorted disjoint intervals.

Pure: standard library only, no fds.  An encrypted-memory VM starts all-private (commit text
of 0dbb11230437: all guest memory starts out encrypted); each
KVM_HC_MAP_GPA_RANGE marks a range shared or private.  Memory and time depend
on the number of ranges, never on the number of pages: a guest may declare
terabytes.  Every update is O(log n) plus a slice assignment over the k
boundaries it replaces.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right

from ..base import BadInput


class PageMap:
    """Half-open byte ranges [start, end) the guest declared shared.

    Kept as one sorted list of boundaries [s0, e0, s1, e1, ...]: an address is
    shared exactly when an odd number of boundaries are <= it.  An update is
    two bisections and one small slice assignment, and ranges that touch or
    overlap merge by construction (no empty range is ever stored).

    Threads: updates must be serialized by the caller (``MapGpaRange`` holds a
    lock; the structure itself stays lock-free because an uncontended lock
    costs a third of an update here).  Readers may run beside one writer: they
    copy the boundary list in one step, which the GIL makes atomic.

    Args:
        tracking: False for a VM without encrypted memory: nothing to track,
            and the report says so.
    """

    def __init__(self, tracking: bool = True):
        self.tracking = tracking
        self._bounds: list[int] = []
        self.updates = 0

    def update(self, start: int, end: int, shared: bool) -> None:
        """Mark [start, end) shared (decrypted) or private (encrypted)."""
        if end <= start:
            return
        bounds = self._bounds
        i = bisect_left(bounds, start)
        j = bisect_right(bounds, end, i)
        # Keep `start`/`end` as boundaries only where the state changes there:
        # an even index means "outside a shared range" at that point.
        edge = 0 if shared else 1
        if i & 1 == edge:
            bounds[i:j] = (start, end) if j & 1 == edge else (start,)
        elif j & 1 == edge:
            bounds[i:j] = (end,)
        else:
            del bounds[i:j]
        self.updates += 1

    def set_shared(self, start: int, end: int) -> None:
        self.update(start, end, True)

    def set_private(self, start: int, end: int) -> None:
        self.update(start, end, False)

    def is_shared(self, address: int) -> bool:
        return bisect_right(self._bounds, address) & 1 == 1

    @property
    def shared_bytes(self) -> int:
        b = self._bounds[:]
        return sum(b[1::2]) - sum(b[0::2])

    def __len__(self) -> int:
        return len(self._bounds) // 2

    def ranges(self) -> list[tuple[int, int]]:
        b = self._bounds[:]
        return list(zip(b[0::2], b[1::2]))

    def export_state(self) -> dict:
        """The map as plain JSON, for a snapshot or a migration stream."""
        return {"tracking": self.tracking, "ranges": [list(r) for r in self.ranges()],
                "updates": self.updates}

    @classmethod
    def from_state(cls, state: dict, limit: int) -> "PageMap":
        """The map ``export_state`` wrote; every range must lie below ``limit``.

        Raises:
            BadInput: malformed, unsorted, overlapping or out-of-range ranges.
        """
        try:
            pm = cls(tracking=bool(state["tracking"]))
            bounds = [int(x) for r in state["ranges"] for x in r]
            pm.updates = int(state["updates"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"page map state is malformed: {exc}") from None
        if len(bounds) % 2 or any(a >= b for a, b in zip(bounds, bounds[1:])) \
                or (bounds and (bounds[0] < 0 or bounds[-1] > limit)):
            raise BadInput("page map state: ranges must be sorted, disjoint, non-empty "
                           f"and inside guest memory ({limit:#x} bytes)")
        pm._bounds = bounds
        return pm

    def load_state(self, other: "PageMap") -> None:
        """Take ``other``'s ranges and counters (a restore into a wired VM)."""
        self.tracking = other.tracking
        self._bounds = list(other._bounds)
        self.updates = other.updates

    def snapshot(self) -> dict:
        """The run report's ``page_map`` section (docs/contracts.md)."""
        ranges = self.ranges()
        return {"tracking": self.tracking,
                "shared": [[s, e] for s, e in ranges],
                "shared_bytes": sum(e - s for s, e in ranges),
                "ranges": len(ranges),
                "updates": self.updates}
