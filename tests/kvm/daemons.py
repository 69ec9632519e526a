"""Helpers for tests that run `kvmfilter serve` as a real process."""
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from kvmfilter.daemon.client import QmpClient

ROOT = pathlib.Path(__file__).resolve().parents[2]


def kvmfilter_cmd() -> list:
    exe = os.path.join(os.path.dirname(sys.executable), "kvmfilter")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "kvmfilter"]


def kvmfilter(*args, timeout=60, **kw):
    return subprocess.run(kvmfilter_cmd() + list(args), capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture
def short_tmp():
    """A short directory: a Unix socket path holds at most 107 bytes, and
    pytest's own tmp_path (with the test's name in it) can come close."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="kvmf-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def poll(check, timeout=15.0, interval=0.05, what="condition"):
    """Wait until check() is true (generous: these hosts are slow and noisy)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(interval)


def raw(path, timeout=10):
    """A bare socket to the daemon and its greeting (no negotiation)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    f = s.makefile("rb")
    greeting = json.loads(f.readline())
    return s, f, greeting


def send(s, f, obj):
    """Send a request (bytes as they are) and return the next non-event message."""
    s.sendall(obj if isinstance(obj, bytes) else json.dumps(obj).encode())
    while True:
        msg = json.loads(f.readline())
        if "event" not in msg:
            return msg


class DaemonProcess:
    """`kvmfilter serve` with a socket, a journal and a metrics file in ``tmp``."""

    def __init__(self, tmp, *extra, env=None, journal=True, metrics=True, name="test-vm",
                 socket_path=None, wait=True, prefix=()):
        self.socket = socket_path or str(tmp / "vm.sock")
        self.journal = str(tmp / "journal.db") if journal else None
        self.metrics = str(tmp / "vm.prom") if metrics else None
        self.stderr = open(tmp / f"serve-{os.getpid()}-{time.monotonic_ns()}.log", "w+")
        cmd = list(prefix) + kvmfilter_cmd() + ["--log-level", "info", "serve", *extra,
                                                "--socket", self.socket]
        if name is not None:  # None: an incoming VM keeps the name it had
            cmd += ["--name", name]
        if self.journal:
            cmd += ["--journal", self.journal]
        if self.metrics:
            cmd += ["--metrics-file", self.metrics]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr,
                                     env={**os.environ, **(env or {})})
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout=15):
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"daemon did not start: {self.log()}")
            time.sleep(0.02)

    def _answers(self) -> bool:
        """The daemon is up when its socket greets (a stale file does not)."""
        try:
            s, f, _ = raw(self.socket)
        except (OSError, ValueError):
            return False
        s.close()
        return True

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def client(self, timeout=10.0) -> QmpClient:
        return QmpClient(self.socket, timeout=timeout)

    def query(self, command, arguments=None):
        with self.client() as c:
            return c.execute(command, arguments)

    def stop(self, sig=signal.SIGTERM, timeout=15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()
