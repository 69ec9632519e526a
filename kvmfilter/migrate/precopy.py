"""Pure pre-copy arithmetic: dirty bitmaps to page runs, and when to stop copying.

A bitmap is KVM's layout (bit i of little-endian 64-bit words = page i);
``runs`` and ``count`` (from ``kvm.bitmap``) cost what is set, not the
guest's memory size.
"""
from __future__ import annotations

from collections import namedtuple
from typing import Iterator

from ..base import StrEnum
from ..kvm.bitmap import count, runs  # noqa: F401 - the pre-copy vocabulary

DEFAULT_DOWNTIME_LIMIT_MS = 300  # QEMU's and Cloud Hypervisor's default
MAX_ROUNDS = 30  # after this many passes, stop and copy whatever is left


def chunked(page_runs, max_pages: int) -> Iterator[tuple[int, int]]:
    """The same pages, in runs of at most ``max_pages``."""
    for first, n in page_runs:
        while n > 0:
            take = min(n, max_pages)
            yield first, take
            first += take
            n -= take


class Decision(StrEnum):
    ANOTHER_ROUND = "another-round"
    STOP_AND_COPY = "stop-and-copy"   # what is left fits the downtime limit
    GIVE_UP = "give-up"               # too many rounds: stop and copy anyway


Estimate = namedtuple("Estimate", "decision expected_downtime_ms")


def next_step(dirty_bytes: int, bandwidth_bytes_per_s: float, downtime_limit_ms: int,
              rounds_done: int, max_rounds: int = MAX_ROUNDS) -> Estimate:
    """After a round: copy again, or stop the guest and copy the rest?

    The rest fits when sending ``dirty_bytes`` at the measured bandwidth takes
    no longer than the downtime limit (QEMU's rule).  A bandwidth of 0 (nothing
    measured yet) counts as infinitely slow, unless nothing is dirty.
    """
    if bandwidth_bytes_per_s > 0:
        expected = dirty_bytes / bandwidth_bytes_per_s * 1000.0
    else:
        expected = 0.0 if dirty_bytes == 0 else float("inf")
    if expected <= downtime_limit_ms:
        return Estimate(Decision.STOP_AND_COPY, expected)
    if rounds_done >= max_rounds:
        return Estimate(Decision.GIVE_UP, expected)
    return Estimate(Decision.ANOTHER_ROUND, expected)
