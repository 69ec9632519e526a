"""L5: the daemon's systemd integration - sd_notify, socket activation, the watchdog.

All three follow sd_notify(3), sd_listen_fds(3) and sd_watchdog_enabled(3) with
the standard library only: no libsystemd is needed, and without systemd every
function is a no-op.
"""
from __future__ import annotations

import logging
import os
import socket
import stat
from typing import Optional

log = logging.getLogger("kvmfilter.daemon")

SD_LISTEN_FDS_START = 3


class Notifier:
    """sd_notify(3) to ``$NOTIFY_SOCKET``; quiet when there is none.

    A socket that cannot be reached is logged once (then at debug level), so a
    wrong ``NOTIFY_SOCKET`` does not flood the log every second.
    """

    def __init__(self, address: Optional[str] = None):
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, state: str) -> bool:
        """Send ``state`` (``READY=1``, ``STATUS=...``); False when not delivered."""
        address = self.address
        if not address:
            return False
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(state.encode(), address)
            return True
        except OSError as exc:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "sd_notify_failed", extra={"socket": self.address,
                                                      "error": exc.strerror or str(exc)})
            return False


def sd_notify(state: str) -> bool:
    """One-shot sd_notify (``Notifier`` keeps its warn-once state across calls)."""
    return Notifier().send(state)


def watchdog_interval() -> Optional[float]:
    """Seconds between ``WATCHDOG=1`` pings, or None when the watchdog is off.

    sd_watchdog_enabled(3): ``WATCHDOG_USEC`` is the timeout; it applies to us
    if ``WATCHDOG_PID`` is unset or our PID.  Ping at half the timeout.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        timeout = int(usec) / 1e6
    except ValueError:
        return None
    return timeout / 2 if timeout > 0 else None


def listen_fds() -> list[int]:
    """The fds systemd passed (socket activation), or [] (sd_listen_fds(3)).

    The variables are unset afterwards so a child never takes them for its own.
    """
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not count or pid != str(os.getpid()):
        return []
    try:
        n = int(count)
    except ValueError:
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n))
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


def activated_socket() -> Optional[socket.socket]:
    """The one listening Unix stream socket systemd passed, or None.

    Raises:
        ValueError: systemd passed something else (several fds, not a socket).
    """
    fds = listen_fds()
    if not fds:
        return None
    if len(fds) != 1:
        raise ValueError(f"systemd passed {len(fds)} sockets; kvmfilter serves one "
                         "(ListenStream= once in the .socket unit)")
    if not stat.S_ISSOCK(os.fstat(fds[0]).st_mode):
        raise ValueError("the fd systemd passed is not a socket")
    sock = socket.socket(fileno=fds[0])
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ValueError("the socket systemd passed is not a Unix stream socket")
    return sock
