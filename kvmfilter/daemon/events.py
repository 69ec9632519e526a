"""L5: MIGRATION_READINESS_CHANGED, from vCPU threads to clients, throttled as QEMU
throttles guest-triggered events.

Whoever folds a transition into the record - a vCPU thread after the journal
committed it, or the loop taking the changes the C fast path applied (then
only the newest of each batch: this listener is ``latest_only``) - builds the
event under the policy's lock, so its blocked-reasons are that moment's, and
leaves it in a one-slot mailbox; the loop is woken only when the slot was
empty.  However fast a guest toggles, the loop does one wake-up per batch and
memory stays constant.

QEMU's rule (monitor/monitor.c, monitor_qapi_event_queue): the first event is
sent at once; later ones within ``INTERVAL`` replace a single stored one,
which is sent when the interval ends.  At most one per interval, and the
latest state is never lost.  The journal and query-migration-readiness keep
every transition; the event carries the running count.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable, Optional

from ..policy.readiness import rfc3339
from .loop import call_from_thread
from .qmp import event

INTERVAL = 1.0  # seconds, QEMU's rate for guest-triggered events


class ReadinessEvents:
    """One VM's readiness events: ``on_transition`` is its policy listener."""

    def __init__(self, loop: asyncio.AbstractEventLoop, vmm,
                 broadcast: Callable[[dict], None], changed: Callable[[], None]):
        self._loop = loop
        self._vmm = vmm
        self._broadcast = broadcast
        self._changed = changed  # the metrics and STATUS are stale
        self._latest: Optional[dict] = None
        self._lock = threading.Lock()
        self._due = 0.0  # monotonic time the next event may go
        self._timer: Optional[asyncio.TimerHandle] = None

    def on_transition(self, t) -> None:
        """A vCPU thread, under the policy's lock (see the module docstring)."""
        vmm = self._vmm
        msg = event("MIGRATION_READINESS_CHANGED", {
            "vcpu": t.vcpu, "from": t.old, "to": t.new, "ready": bool(t.new),
            "time": rfc3339(t.time), "transitions": vmm.control.transitions_total,
            "blocked-reasons": vmm.blocked_reasons()})
        with self._lock:
            wake = self._latest is None
            self._latest = msg
        if wake:
            call_from_thread(self._loop, self._arrived)

    def _arrived(self) -> None:
        self._changed()
        if self._timer is not None:
            return  # the timer sends the latest when the interval ends
        delay = self._due - time.monotonic()
        if delay > 0:
            self._timer = self._loop.call_later(delay, self.flush)
        else:
            self.flush()

    def flush(self) -> None:
        """Send the waiting event, if any, now (the timer, or shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with self._lock:
            msg, self._latest = self._latest, None
        if msg is not None:
            self._broadcast(msg)
            self._due = time.monotonic() + INTERVAL
