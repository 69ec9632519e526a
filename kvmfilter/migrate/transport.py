"""Endpoints: ``file:PATH``, ``unix:PATH``, ``tcp:HOST:PORT`` (QEMU's URIs), and the
Unix sockets kvmfilter listens on (the daemon's control socket too).

The stream is not encrypted or authenticated: between hosts, carry it over a
tunnel you trust (SSH, WireGuard, stunnel), as QEMU's documentation says of
plain TCP migration.  ``tcp:`` binds exactly the address the operator gives.

Snapshot files are written to an unpredictable temporary name created
exclusively (mode 0600, never following a symlink) in the target directory,
flushed to disk, then linked to the final name - which must not exist yet -
so a failed or interrupted save never leaves a partial file under that name
and never replaces anything.  Reading refuses symlinks and non-regular files.
"""
from __future__ import annotations

import errno
import io
import logging
import os
import socket
import stat
import tempfile
from collections import namedtuple
from typing import Optional

from ..base import BadInput

log = logging.getLogger("kvmfilter.migrate")

BUFFER = 1 << 20
# How much a unix: migration socket may hold in flight (see _widen_send_buffer).
UNIX_SEND_BUFFER = 4 << 20
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # Linux, asm-generic/socket.h


class UriError(BadInput):
    """A migration URI kvmfilter does not understand."""


class Uri(namedtuple("Uri", "scheme path host port")):
    """``file``/``unix`` use ``path``; ``tcp`` uses ``host`` and ``port``."""
    __slots__ = ()

    def __str__(self) -> str:
        if self.scheme == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        return f"{self.scheme}:{self.path}"


def parse_uri(text: str, schemes=("file", "unix", "tcp")) -> Uri:
    """``file:PATH``, ``unix:PATH``, ``tcp:HOST:PORT`` or ``tcp:[V6ADDR]:PORT``."""
    scheme, sep, rest = text.partition(":")
    if not sep or scheme not in schemes:
        raise UriError(f"{text!r}: a migration URI is one of "
                       f"{', '.join(s + ':...' for s in schemes)}")
    if scheme in ("file", "unix"):
        if not rest:
            raise UriError(f"{text!r}: {scheme}: needs a path")
        return Uri(scheme, rest, None, None)
    if rest.startswith("["):
        host, close, port = rest[1:].partition("]")
        if not close or not port.startswith(":"):
            raise UriError(f"{text!r}: write an IPv6 address as tcp:[ADDR]:PORT")
        port = port[1:]
    else:
        host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UriError(f"{text!r}: tcp: needs HOST:PORT with a port 1..65535")
    return Uri("tcp", None, host, int(port))


# -- files ------------------------------------------------------------------------------

class SnapshotFile:
    """A snapshot being written: ``write()``, then ``commit()`` or ``abort()``."""

    def __init__(self, path: str):
        self.path = path
        directory = os.path.dirname(os.path.abspath(path)) or "."
        if os.path.lexists(path):
            raise BadInput(f"{path} exists; a snapshot is never written over a file")
        try:
            fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.",
                                            suffix=".partial", dir=directory)
        except OSError as exc:
            raise BadInput(f"{path}: cannot create a file in {directory}: "
                           f"{exc.strerror or exc}") from None
        self.file = io.BufferedWriter(io.FileIO(fd, "wb"), BUFFER)

    def write(self, data) -> None:
        self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def commit(self) -> None:
        """Flush to disk and give the file its name; EEXIST if one appeared."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        try:
            os.link(self.tmp, self.path)  # fails, rather than replaces, if the name exists
        except OSError as exc:
            self.abort()
            if exc.errno == errno.EEXIST:
                raise BadInput(f"{self.path} appeared while saving; left alone") from None
            raise
        os.unlink(self.tmp)
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_snapshot(path: str):
    """A snapshot file for reading: a regular file, not reached through a symlink.

    Raises:
        BadInput: missing, unreadable, a symlink, or not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadInput(f"{path} is a symbolic link; refusing to follow it") from None
        raise BadInput(f"{path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadInput(f"{path}: not a regular file")
    os.set_blocking(fd, True)
    return io.BufferedReader(io.FileIO(fd, "rb"), BUFFER)


# -- sockets ----------------------------------------------------------------------------

def _tcp_addresses(uri: Uri, passive: bool):
    try:
        return socket.getaddrinfo(uri.host, uri.port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_PASSIVE if passive else 0)
    except socket.gaierror as exc:
        raise BadInput(f"{uri}: cannot resolve {uri.host}: {exc.strerror}") from None


def connect(uri: Uri, timeout: Optional[float]) -> socket.socket:
    """A connected stream socket to a ``unix:`` or ``tcp:`` destination.

    Raises:
        OSError: the destination is unreachable (the message names it).
    """
    if uri.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            _widen_send_buffer(sock)
            sock.connect(uri.path)
        except OSError:
            sock.close()
            raise
        return sock
    last: Optional[OSError] = None
    for family, kind, proto, _, address in _tcp_addresses(uri, passive=False):
        sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise last or OSError(errno.EHOSTUNREACH, f"no address for {uri.host}")


def _widen_send_buffer(sock: socket.socket) -> None:
    """Let a unix: socket hold a whole stop-and-copy in flight.

    A unix socket's send buffer is net.core.wmem_default (208 KiB on most
    hosts): less than the 512 KiB a small guest re-dirties, so with it the
    source waited for the destination to drain every 200 KiB - while the guest
    was stopped (stop phase "pages" 1.4 ms here, 0.7 with 4 MiB).  Privileged
    (CAP_NET_ADMIN, as a KVM daemon usually is) the size is set outright, else
    as far as net.core.wmem_max allows.  TCP is left alone: it sizes its own
    buffers, and setting SO_SNDBUF would turn that off.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, UNIX_SEND_BUFFER)
    except OSError:  # EPERM: not privileged
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER)
        except OSError as exc:  # the default buffer works, only slower
            log.debug("send_buffer_not_widened", extra={"error": str(exc)})


def listen(uri: Uri) -> socket.socket:
    """A listening socket for one incoming migration (unix: created 0600).

    Raises:
        BadInput: the address cannot be bound (in use, no such interface ...).
    """
    if uri.scheme == "unix":
        return bind_unix(uri.path, backlog=1)
    for family, kind, proto, _, address in _tcp_addresses(uri, passive=True):
        sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise BadInput(f"{uri}: cannot listen: {exc.strerror or exc}") from None
        sock.listen(1)
        return sock
    raise BadInput(f"{uri}: no address to listen on")


# -- Unix sockets, claimed safely and bound 0600 -----------------------------------------
# A path another live process serves is refused; a stale socket (nobody
# listens) is replaced; anything that is not a socket is left alone.

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
