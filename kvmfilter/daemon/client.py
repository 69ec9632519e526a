"""L5: a small blocking QMP client (``kvmfilter query``, ``watch``, ``migrate``).

It reads the socket as a JSON stream with the server's limits, so a hostile
or broken server cannot make it allocate without bound or raise a traceback:
every failure is a ``QmpClientError`` with a one-line reason.
"""
from __future__ import annotations

import errno
import json
import socket
import time
from typing import Optional

from ..base import KvmfilterError
from .qmp import MAX_REQUEST, JsonStream, ParseError

MAX_REPLY = 16 << 20  # replies can be long (a page map); a stream that never ends is not


class QmpClientError(KvmfilterError):
    """The peer is unreachable, not a QMP server, or broke the protocol."""


class NoServerError(QmpClientError):
    """Nothing serves the socket path."""


class QmpTimeout(QmpClientError):
    """No complete message within the client's timeout."""


def connect_unix(path: str, timeout: Optional[float]) -> socket.socket:
    """Connect to ``path``, waiting up to ``timeout`` while its backlog is full.

    A non-blocking connect to a Unix socket whose listen backlog is full fails
    at once with EAGAIN; a client with a timeout should wait instead.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except (BlockingIOError, InterruptedError) as exc:
            sock.close()
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                raise
            if deadline is not None and time.monotonic() >= deadline:
                raise QmpClientError(f"{path}: the daemon's backlog stayed full for "
                                     f"{timeout:g} s") from None
            time.sleep(0.01)
            continue
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None if deadline is None else max(0.001, deadline - time.monotonic()))
        return sock


class QmpClient:
    """Connect, check the greeting, negotiate; then ``execute()`` and ``read()``.

    Args:
        path: the daemon's Unix socket.
        timeout: seconds for connecting and for each read (None: wait forever).
    """

    def __init__(self, path: str, timeout: Optional[float] = 10.0):
        self.path = path
        self.timeout = timeout
        self.sock = connect_unix(path, timeout)
        self.sock.settimeout(timeout)
        self._stream = JsonStream(max_request=MAX_REPLY)
        self._ready: list = []
        self.events: list[dict] = []  # events that arrived while waiting for a reply
        try:
            self.greeting = self.read()
            if not isinstance(self.greeting.get("QMP"), dict):
                raise QmpClientError(f"{path} did not greet like QMP: {self.greeting!r:.200}")
            reply = self.execute("qmp_capabilities")
            if "error" in reply:
                raise QmpClientError(f"capabilities negotiation failed: {reply['error']}")
        except BaseException:
            self.close()
            raise

    def read(self) -> dict:
        """The next message (a reply or an event), within ``timeout`` overall:
        a peer that sends bytes forever without completing a message times out
        as surely as a silent one."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while not self._ready:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QmpTimeout(f"{self.path}: no complete message within "
                                     f"{self.timeout:g} s")
                self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise QmpTimeout(f"{self.path}: no message within {self.timeout:g} s") \
                    from None
            except OSError as exc:
                raise QmpClientError(f"{self.path}: {exc.strerror or exc}") from None
            if not data:
                raise EOFError("the daemon closed the connection")
            self._ready += self._stream.feed(data)
        msg = self._ready.pop(0)
        if isinstance(msg, ParseError):
            raise QmpClientError(f"{self.path}: not a QMP message ({msg.desc})")
        if not isinstance(msg, dict):
            raise QmpClientError(f"{self.path}: not a QMP message: {msg!r:.200}")
        return msg

    def execute(self, command: str, arguments: Optional[dict] = None) -> dict:
        """The reply (``{"return": ...}`` or ``{"error": ...}``); events are kept."""
        msg: dict = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode()
        if len(data) > MAX_REQUEST:
            raise QmpClientError(f"the request is {len(data)} bytes; the daemon takes "
                                 f"at most {MAX_REQUEST}")
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise QmpClientError(f"{self.path}: {exc.strerror or exc}") from None
        while True:
            reply = self.read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "return" not in reply and "error" not in reply:
                raise QmpClientError(f"{self.path}: not a QMP reply: {reply!r:.200}")
            return reply

    def wait_event(self, name: str, match=None, timeout: float = 0.1) -> Optional[dict]:
        """The first event ``name`` whose data ``match(data)`` accepts (any,
        without ``match``) among those kept, else the next to arrive within
        ``timeout`` seconds; None if none did.  Every event read is kept in
        ``events``; a reply nobody asked for is a protocol error."""
        def wanted(ev):
            return ev.get("event") == name and (match is None or match(ev.get("data") or {}))
        found = next((ev for ev in self.events if wanted(ev)), None)
        deadline = time.monotonic() + timeout
        saved = self.timeout
        try:
            while found is None and (left := deadline - time.monotonic()) > 0:
                self.timeout = left
                try:
                    msg = self.read()
                except QmpTimeout:
                    return None
                if "event" not in msg:
                    raise QmpClientError(f"{self.path}: a reply nobody asked for: "
                                         f"{msg!r:.200}")
                self.events.append(msg)
                if wanted(msg):
                    found = msg
        finally:
            self.timeout = saved
            self.sock.settimeout(saved)
        return found

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
