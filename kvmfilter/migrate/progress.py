"""What a migration reports and what tunes it: ``migrate-set-parameters``
(``Parameters``), ``query-migrate`` (``Stats``, in QEMU's names), and the
sink that counts the bytes sent and keeps to ``max-bandwidth`` (``Counting``).
"""
from __future__ import annotations

import time
from typing import Optional

from . import precopy, stream

PAGE = stream.PAGE
ENDED = ("completed", "failed", "cancelled")  # query-migrate's final statuses (QEMU's)


class Parameters:
    """migrate-set-parameters (QEMU's names; x- for kvmfilter's own)."""

    def __init__(self):
        self.downtime_limit = precopy.DEFAULT_DOWNTIME_LIMIT_MS  # ms
        self.max_bandwidth = 0                                     # bytes/s, 0: no limit
        self.max_rounds = precopy.MAX_ROUNDS                       # x-max-rounds
        self.stall_timeout = 10_000                                # x-stall-timeout, ms

    def to_json(self) -> dict:
        return {"downtime-limit": self.downtime_limit, "max-bandwidth": self.max_bandwidth,
                "x-max-rounds": self.max_rounds, "x-stall-timeout": self.stall_timeout}

    def update(self, args: dict) -> None:
        values = {"downtime-limit": ("downtime_limit", 0, 2_000_000),
                  "max-bandwidth": ("max_bandwidth", 0, 1 << 50),
                  "x-max-rounds": ("max_rounds", 1, 1000),
                  "x-stall-timeout": ("stall_timeout", 100, 3_600_000)}
        for key, value in args.items():
            attr, low, high = values[key]
            if not low <= value <= high:
                raise ValueError(f"Parameter '{key}' expects an integer in the range of "
                                 f"{low} to {high}")
        for key, value in args.items():
            setattr(self, values[key][0], value)


class Stats:
    """query-migrate's numbers (QEMU's MigrationInfo and MigrationStats names)."""

    def __init__(self, total: int):
        self.status = "setup"
        self.started = time.monotonic()
        self.setup_time: Optional[float] = None
        self.total_time: Optional[float] = None
        self.downtime: Optional[float] = None            # stop -> COMMIT sent
        self.downtime_to_started: Optional[float] = None  # stop -> destination running
        self.expected_downtime: Optional[float] = None
        self.stop_at: Optional[float] = None
        self.stop_phases: dict = {}  # where the downtime went: phase -> seconds
        self.transferred = 0
        self.remaining = 0
        self.total = total
        self.duplicate = 0   # zero pages, sent as a flag
        self.normal = 0      # pages sent with their data
        self.dirty_sync_count = 0
        self.mbps = 0.0
        self.rounds = 0
        self.precopy = None  # how pre-copy ended: converged / gave-up
        self.error: Optional[str] = None

    def to_json(self) -> dict:
        info: dict = {"status": self.status}
        if self.status in ("none", "setup"):
            return info
        now = time.monotonic()
        info["setup-time"] = round((self.setup_time or 0) * 1000)
        info["total-time"] = round((self.total_time if self.total_time is not None
                                    else now - self.started) * 1000)
        if self.downtime is not None:
            info["downtime"] = round(self.downtime * 1000)
            if self.downtime_to_started is not None:
                info["x-downtime-to-started"] = round(self.downtime_to_started * 1000)
        elif self.expected_downtime is not None and self.status == "active":
            info["expected-downtime"] = round(self.expected_downtime)
        info["ram"] = {"transferred": self.transferred, "remaining": self.remaining,
                       "total": self.total, "duplicate": self.duplicate,
                       "normal": self.normal, "normal-bytes": self.normal * PAGE,
                       "dirty-sync-count": self.dirty_sync_count, "mbps": round(self.mbps, 3),
                       "page-size": PAGE}
        info["x-rounds"] = self.rounds
        if self.precopy:
            info["x-precopy"] = self.precopy
        phases = dict(self.stop_phases)  # one step: the job's thread may add a phase meanwhile
        if phases:
            info["x-downtime-phases"] = {k: round(v * 1000, 3) for k, v in phases.items()}
        if self.error:
            info["error-desc"] = self.error
        return info


class Counting:
    """A writer's sink that counts bytes (ram.transferred, mbps) and keeps to
    ``max-bandwidth`` by sleeping when ahead of it."""

    def __init__(self, out, stats: Stats, max_bandwidth: int = 0):
        self.out, self.stats, self.max_bandwidth = out, stats, max_bandwidth
        self.started = time.monotonic()

    def write(self, data) -> None:
        self.out.write(data)
        self.stats.transferred += len(data)
        if self.max_bandwidth:
            ahead = self.stats.transferred / self.max_bandwidth - (
                time.monotonic() - self.started)
            if ahead > 0:
                self.out.flush()
                time.sleep(ahead)

    def flush(self) -> None:
        self.out.flush()
