"""Hardening, tried as an attacker and a hostile guest would: root-owned files,
bounded memory, no hangs, no tracebacks, a `stop` that never kills the guest.

(The metrics temp file and the journal's file checks are in tests/unit.)
"""
import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time

import pytest

from conftest import TEST_GUESTS
from daemons import DaemonProcess, kvmfilter, kvmfilter_cmd, poll, short_tmp  # noqa: F401

TOGGLE = str(TEST_GUESTS / "toggle.bin")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- files --------------------------------------------------------------------------------

def test_a_planted_journal_symlink_is_refused_with_exit_2(kvm, short_tmp):
    target = short_tmp / "somewhere-else.db"
    (short_tmp / "j.db").symlink_to(target)
    p = kvmfilter("run", "--journal", str(short_tmp / "j.db"))
    assert p.returncode == 2 and "symbolic link" in p.stderr
    assert not target.exists()


@pytest.mark.parametrize("command", [["run"], ["serve", "--socket", "S"], ["journal"]])
def test_a_fifo_is_refused_at_once(kvm, short_tmp, command):
    fifo = short_tmp / "fifo"
    os.mkfifo(fifo)
    args = [a.replace("S", str(short_tmp / "s.sock")) for a in command] + [str(fifo)]
    started = time.monotonic()
    p = kvmfilter(*args, timeout=20)
    assert p.returncode == 2, p.stderr
    assert "not a regular file" in p.stderr
    assert time.monotonic() - started < 10


# -- bounded memory and time -----------------------------------------------------------------

def test_run_ends_within_a_second_of_its_timeout_with_a_bounded_report(kvm):
    started = time.monotonic()
    p = kvmfilter("run", TOGGLE, "--plain-memory", "--timeout", "4", "--json", timeout=60)
    elapsed = time.monotonic() - started
    report = json.loads(p.stdout)
    m = report["migration"]
    assert report["exit"]["reason"] == "timeout"
    assert m["transitions_total"] > 2000 and len(m["transitions"]) == 1024
    assert m["transitions_omitted"] == m["transitions_total"] - 1024
    assert len(p.stdout) < 1 << 20
    assert elapsed < 4 + 1 + 1.5, f"{elapsed:.1f} s for a 4 s timeout"  # + start-up


def test_the_daemons_memory_stays_flat_while_a_guest_toggles(kvm, short_tmp):
    d = DaemonProcess(short_tmp, TOGGLE, "--vcpus", "2", "--plain-memory", journal=False)
    try:
        with d.client() as watcher:  # a client that listens to the events, too
            time.sleep(2.0)
            first = rss_kib(d.proc.pid)
            for _ in range(8):
                time.sleep(1.0)
                watcher.execute("query-status")
            last = rss_kib(d.proc.pid)
            transitions = watcher.execute("query-migration-readiness")["return"]["transitions"]
        assert transitions > 10_000
        assert last - first < 8 * 1024, f"RSS grew {first} -> {last} KiB"
    finally:
        d.kill()


# -- shutdown ------------------------------------------------------------------------------

def test_shutdown_drains_stalled_clients_at_once(kvm, short_tmp):
    d = DaemonProcess(short_tmp, "bundled:readiness_cycle", journal=False)
    stalled = []
    try:
        for _ in range(40):  # clients that stopped reading, with replies piling up
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(d.socket)
            s.sendall(b'{"execute":"qmp_capabilities"}' + b'{"execute":"query-commands"}' * 50)
            stalled.append(s)
        time.sleep(1.0)
        started = time.monotonic()
        assert d.stop(signal.SIGTERM, timeout=30) == 0
        took = time.monotonic() - started
        assert took < 5.0, f"shutdown took {took:.1f} s"
        assert not os.path.exists(d.socket)
        assert "Traceback" not in d.log()
    finally:
        for s in stalled:
            s.close()
        d.kill()


def test_sigterm_right_after_the_socket_appears_removes_it(kvm, short_tmp):
    for _ in range(3):
        sock = short_tmp / "early.sock"
        p = subprocess.Popen(kvmfilter_cmd() + ["serve", "--socket", str(sock)],
                             stderr=subprocess.PIPE, text=True)
        poll(lambda: sock.exists(), interval=0.001)
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0
        assert "Traceback" not in p.stderr.read()
        assert not sock.exists()


@pytest.mark.parametrize("how", ["quit", "SIGTERM", "SIGINT"])
def test_no_traceback_when_stopping_with_clients_connected(kvm, short_tmp, how):
    d = DaemonProcess(short_tmp, "bundled:readiness_cycle", journal=False)
    try:
        clients = [d.client() for _ in range(3)]
        half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # > 64 KiB, then half-close
        half.connect(d.socket)
        half.sendall(b'{"execute":"qmp_capabilities"}{"x": "' + b"y" * 100_000)
        half.shutdown(socket.SHUT_WR)
        if how == "quit":
            clients[0].execute("quit")
        else:
            d.proc.send_signal(getattr(signal, how))
        assert d.proc.wait(15) == 0
        for c in clients:
            c.close()
        half.close()
        log = d.log()
        assert "Traceback" not in log and "CancelledError" not in log, log
    finally:
        d.kill()


# -- stop and the journal --------------------------------------------------------------------

def hold_journal_lock(path: str, seconds: float) -> threading.Thread:
    """Another process's write lock on the journal (as a second VM's commit would)."""
    ready = threading.Event()

    def hold():
        con = sqlite3.connect(path, isolation_level=None)
        con.execute("BEGIN IMMEDIATE")
        ready.set()
        time.sleep(seconds)
        con.execute("COMMIT")
        con.close()

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    ready.wait(5)
    return t


def test_stop_during_a_journal_lock_wait_never_kills_the_guest(kvm, short_tmp):
    """The kick that parks vCPUs used to cut SQLite's busy-wait short: the vCPU
    died with "database is locked" while stop replied success."""
    d = DaemonProcess(short_tmp, "bundled:readiness_cycle", metrics=False)
    try:
        poll(lambda: d.query("query-migration-readiness")["return"]["transitions"] >= 1)
        locker = hold_journal_lock(d.journal, 7.0)  # longer than stop waits (5 s)
        time.sleep(0.5)  # the next transition is now waiting for the lock
        with d.client(timeout=30) as c:
            reply = c.execute("stop")
            # The truth: either every vCPU parked, or stop says it could not.
            if "error" in reply:
                assert "did not park" in reply["error"]["desc"]
                assert c.execute("query-status")["return"]["status"] == "running"
            else:
                assert c.execute("query-status")["return"]["status"] == "paused"
                c.execute("cont")
            locker.join()
            before = c.execute("query-migration-readiness")["return"]["transitions"]
            poll(lambda: c.execute("query-migration-readiness")["return"]["transitions"]
                 > before, what="the guest going on after the lock")
            status = c.execute("query-status")["return"]
            assert status["status"] == "running" and status["exit"] is None
        locker = hold_journal_lock(d.journal, 2.0)  # shorter than stop waits
        time.sleep(0.5)
        assert d.query("stop") == {"return": {}}
        assert d.query("query-status")["return"]["status"] == "paused"
        locker.join()
    finally:
        d.kill()


def test_a_locked_journal_ends_the_run_with_a_report_not_a_traceback(kvm, short_tmp):
    """A journal another process keeps locked past the busy timeout (10 s): the
    vCPU stops with internal_error and the report says why - no traceback."""
    journal = str(short_tmp / "j.db")
    p = subprocess.Popen(kvmfilter_cmd() + ["run", TOGGLE, "--plain-memory", "--journal",
                                            journal, "--timeout", "40", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    poll(lambda: os.path.exists(journal))
    time.sleep(0.5)
    locker = hold_journal_lock(journal, 25.0)
    out, err = p.communicate(timeout=60)
    locker.join()
    report = json.loads(out)
    assert p.returncode == 1 and report["exit"]["reason"] == "internal_error"
    assert "database is locked" in report["exit"]["detail"]
    assert "Traceback" not in err and err.count("\n") < 5, err


# -- hostile peers of the CLI clients ---------------------------------------------------------

class FakeServer:
    """A Unix socket that speaks whatever ``script`` says to each client."""

    def __init__(self, path, script, backlog=8, accept=True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(backlog)
        self.stop = threading.Event()
        if accept:
            threading.Thread(target=self._serve, args=(script,), daemon=True).start()

    def _serve(self, script):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=script, args=(conn, self.stop), daemon=True).start()

    def close(self):
        self.stop.set()
        self.sock.close()


def endless_line(conn, stop):
    try:
        conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n{"return": "')
        chunk = b"x" * 65536
        while not stop.is_set():
            conn.sendall(chunk)
    except OSError:
        pass


def greeting(text):
    def script(conn, stop):
        try:
            conn.sendall(text)
            time.sleep(5)
        except OSError:
            pass
    return script


def negotiate_then_hang_up(conn, stop):
    conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
    conn.recv(4096)
    conn.sendall(b'{"return": {}}\n{"event": "STOP", "timestamp": {"seconds": 0, '
                 b'"microseconds": 0}}\n')
    time.sleep(0.2)
    conn.close()


@pytest.mark.parametrize("command", [["query", "query-status"], ["watch"]])
def test_an_endless_reply_is_bounded(short_tmp, command):
    path = str(short_tmp / "evil.sock")
    fake = FakeServer(path, endless_line)
    try:
        p = subprocess.Popen(kvmfilter_cmd() + [command[0], "--socket", path, *command[1:]],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak = 0
        deadline = time.monotonic() + 20
        while p.poll() is None and time.monotonic() < deadline:
            try:
                peak = max(peak, rss_kib(p.pid))
            except (FileNotFoundError, AssertionError, ProcessLookupError):
                break
            time.sleep(0.05)
        if p.poll() is None:
            p.kill()
        out, err = p.communicate()
        assert p.returncode == 1, err
        assert "Traceback" not in err and "longer than" in err
        assert peak < 200 * 1024, f"{peak} KiB"
    finally:
        fake.close()


@pytest.mark.parametrize("text", [b"1\n", b"[" * 100_000, b"not json at all\n"])
def test_a_fake_greeting_is_a_clear_error(short_tmp, text):
    path = str(short_tmp / "fake.sock")
    fake = FakeServer(path, greeting(text))
    try:
        for command in (["query", "query-status", "--timeout", "2"], ["watch"]):
            p = kvmfilter(command[0], "--socket", path, *command[1:], timeout=30)
            assert p.returncode == 1, p.stderr
            assert "not a kvmfilter daemon" in p.stderr and "Traceback" not in p.stderr
    finally:
        fake.close()


def test_query_waits_while_the_backlog_is_full(short_tmp):
    path = str(short_tmp / "busy.sock")
    fake = FakeServer(path, None, backlog=0, accept=False)
    fillers = []
    try:
        for _ in range(4):  # fill the backlog (connections nobody accepts)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            fillers.append(s)
        started = time.monotonic()
        p = kvmfilter("query", "--socket", path, "query-status", "--timeout", "2")
        took = time.monotonic() - started
        assert p.returncode == 1 and "backlog" in p.stderr, p.stderr
        assert took >= 1.8, f"gave up after {took:.2f} s, not its timeout"
    finally:
        for s in fillers:
            s.close()
        fake.close()


def test_watch_dropped_without_shutdown_exits_1(short_tmp):
    path = str(short_tmp / "drop.sock")
    fake = FakeServer(path, negotiate_then_hang_up)
    try:
        p = kvmfilter("watch", "--socket", path, timeout=30)
        assert p.returncode == 1 and "without SHUTDOWN" in p.stderr
        assert json.loads(p.stdout.splitlines()[0])["event"] == "STOP"  # it printed what came
    finally:
        fake.close()


@pytest.mark.parametrize("command", [["run", str(TEST_GUESTS / "spin.bin"), "--timeout", "30"],
                                     ["serve", "--socket", "SOCK"]])
def test_an_early_ctrl_c_is_one_line_not_a_traceback(kvm, short_tmp, command):
    args = [a.replace("SOCK", str(short_tmp / "s.sock")) for a in command]
    for delay in (0.03, 0.05, 0.08, 0.3):
        p = subprocess.Popen(kvmfilter_cmd() + args, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
        assert "Traceback" not in err, (delay, err)
        assert p.returncode in (0, 130), (delay, p.returncode, err)


def test_huge_memory_warns_about_host_kernel_memory(kvm):
    p = kvmfilter("--log-level", "warning", "run", "--memory", "512G", "--timeout", "2")
    assert "large_guest_memory" in p.stderr and p.returncode == 0, p.stderr
