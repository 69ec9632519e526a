"""L5: handing work from other threads (vCPUs, migration jobs, the guest
watcher) to the daemon's event loop.

A thread can finish after the loop has closed - a guest that stops while the
daemon shuts down, say.  Shutdown does that work itself, so a late call is
dropped, and the caller is told, instead of raising in a thread where nobody
would see it but stderr.
"""
from __future__ import annotations

import asyncio
from typing import Callable


def call_from_thread(loop: asyncio.AbstractEventLoop, fn: Callable, *args) -> bool:
    """Schedule ``fn(*args)`` on ``loop``; False when the loop has closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # "Event loop is closed"
        return False
    return True
