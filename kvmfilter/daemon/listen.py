"""L5: the daemon's control-socket path - claimed safely, bound 0600.

A path another live process serves is refused; a stale socket (nobody listens)
is replaced; anything that is not a socket is left alone.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import stat

from ..base import BadInput

log = logging.getLogger("kvmfilter.daemon")

SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1


class SocketError(BadInput):
    """The socket path cannot be served: another live daemon serves it, it is
    not ours to replace, or it cannot be bound."""


def claim_socket_path(path: str) -> None:
    """Make ``path`` free to bind: refuse a live socket, replace a stale one."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise SocketError(f"{path}: a Unix socket path is at most {SUN_PATH_MAX} bytes")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SocketError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise SocketError(f"{path}: {exc.strerror}") from None
        log.warning("stale_socket_replaced", extra={"socket": path})
        os.unlink(path)
        return
    finally:
        probe.close()
    raise SocketError(f"{path} is served by another live kvmfilter (or other) process")


def bind_unix(path: str, backlog: int = 64) -> socket.socket:
    """A listening socket at ``path``, created mode 0600 (never wider, not even briefly)."""
    claim_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise SocketError(f"cannot serve {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    return sock


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
