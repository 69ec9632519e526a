"""L4: the port table and the built-in port devices (kvmtool's ioport.c, in small).

The guest-image contract (docs/contracts.md) gives three ports meaning:

- 0xE9 console (debugcon, as in QEMU and Bochs): each byte OUT is appended;
- 0xF4 debug exit (isa-debug-exit, as in QEMU): an OUT stops the VM with that code;
- 0xF5 power button (kvmfilter's): an IN reads 1 once a powerdown was requested.

Every other port reads all-ones and drops writes; each access is counted and
the first few ports are logged, never fatal.  A device is any callable
``device(vcpu, io_exit) -> bytes | None`` (the bytes an IN reads).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from ..kvm.exits import IoExit

log = logging.getLogger("kvmfilter.vm")

CONSOLE_PORT = 0xE9
DEBUG_EXIT_PORT = 0xF4
POWER_BUTTON_PORT = 0xF5
CONSOLE_LIMIT = 1 << 20  # console bytes kept; the rest is counted as dropped
PORTS_LOGGED = 8  # distinct unknown ports logged; every access is still counted


class PortTable:
    """Port number -> device, plus the accounting of ports nobody serves."""

    def __init__(self):
        self.devices: dict[int, Callable] = {}
        self._unhandled: dict[int, int] = {}
        self._lock = threading.Lock()

    def add(self, port: int, device: Callable) -> None:
        self.devices[port] = device

    def handle(self, vcpu: int, ex: IoExit) -> Optional[bytes]:
        """Serve one port access; the bytes an IN reads (None: all-ones)."""
        device = self.devices.get(ex.port)
        if device is not None:
            return device(vcpu, ex)
        with self._lock:
            n = self._unhandled.get(ex.port, 0)
            self._unhandled[ex.port] = n + 1
            first = n == 0 and len(self._unhandled) <= PORTS_LOGGED
        if first:
            log.warning("unhandled_port_access",
                        extra={"vcpu": vcpu, "port": ex.port,
                               "direction": "out" if ex.is_out else "in",
                               "more_not_logged": len(self._unhandled) == PORTS_LOGGED})
        return None

    def unhandled(self) -> dict[int, int]:
        """Accesses to ports no device serves, by port."""
        with self._lock:
            return dict(sorted(self._unhandled.items()))

    def console_port(self) -> Optional[int]:
        """The port whose OUTs may be collected in C: one served by a ``Console``."""
        for port, device in self.devices.items():
            if isinstance(device, Console):
                return port
        return None


class Console:
    """Port 0xE9: the guest's console, bounded (the rest is counted as dropped)."""

    def __init__(self, limit: int = CONSOLE_LIMIT):
        self.limit = limit
        self._data = bytearray()
        self.dropped = 0
        self._lock = threading.Lock()

    def __call__(self, vcpu: int, ex: IoExit) -> Optional[bytes]:
        if ex.is_out:
            self.append(ex.data)
        return None

    def append(self, data: bytes) -> None:
        with self._lock:
            room = max(self.limit - len(self._data), 0)
            self._data += data[:room]
            self.dropped += max(len(data) - room, 0)

    def text(self) -> str:
        with self._lock:
            return self._data.decode("utf-8", "replace")

    def export_state(self) -> dict:
        with self._lock:
            return {"bytes": self._data.hex(), "dropped": self.dropped}

    def import_state(self, state: dict) -> None:
        data = bytes.fromhex(state["bytes"])
        with self._lock:
            self._data = bytearray(data[:self.limit])
            self.dropped = int(state["dropped"]) + max(len(data) - self.limit, 0)


class DebugExit:
    """Port 0xF4: an OUT stops the VM with the value written as the exit code."""

    def __init__(self, stop: Callable[[int, int], None]):
        self._stop = stop  # stop(vcpu, code)

    def __call__(self, vcpu: int, ex: IoExit) -> Optional[bytes]:
        if ex.is_out:
            self._stop(vcpu, int.from_bytes(ex.data[:ex.size], "little"))
        return None


class PowerButton:
    """Port 0xF5: an IN reads 1 once ``press()`` was called, 0 before.

    The value fills the whole access, zero-extended: a 32-bit IN reads 0 or 1,
    not 0xFFFFFF00.  ``on_press`` runs once, on the first press (the VM wakes
    its halted vCPUs with it).
    """

    def __init__(self, on_press: Callable[[], None] = lambda: None):
        self.pressed = False
        self._on_press = on_press

    def press(self) -> None:
        first = not self.pressed
        self.pressed = True
        if first:
            self._on_press()

    def __call__(self, vcpu: int, ex: IoExit) -> Optional[bytes]:
        if ex.is_out:
            return None
        return int(self.pressed).to_bytes(ex.size, "little") * ex.count
