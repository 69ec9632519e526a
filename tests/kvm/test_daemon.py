"""`kvmfilter serve` as a real process with a real guest, over its real socket."""
import json
import os
import pathlib
import shutil
import tempfile
import signal
import socket
import stat
import subprocess
import threading
import time

import pytest

from kvmfilter.daemon import QmpClient
from kvmfilter.journal import ReadinessJournal

# A guest that toggles readiness as fast as it can: WRMSR 1, WRMSR 0, forever.
TOGGLE = bytes.fromhex("66b9084d564b" "6631d2" "66b801000000" "0f30" "6631c0" "0f30" "ebf1")


from test_cli_kvm import kvmfilter_cmd


@pytest.fixture
def tmp_path():
    """A short directory: a Unix socket path holds at most 107 bytes, and
    pytest's own tmp_path (with the test's name in it) can come close."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="kvmf-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def poll(check, timeout=15.0, interval=0.05):
    """Wait until check() is true (generous: these hosts are slow and noisy)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(interval)


class DaemonProcess:
    def __init__(self, tmp_path, *extra, env=None):
        self.socket = str(tmp_path / "vm.sock")
        self.journal = str(tmp_path / "journal.db")
        self.metrics = str(tmp_path / "vm.prom")
        self.stderr = open(tmp_path / "serve.log", "w+")
        cmd = kvmfilter_cmd() + ["--log-level", "info", "serve", *extra,
                                 "--socket", self.socket, "--journal", self.journal,
                                 "--metrics-file", self.metrics, "--name", "test-vm"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 15
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

    def stop(self, sig=signal.SIGTERM, timeout=15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture
def daemon(kvm, tmp_path):
    d = DaemonProcess(tmp_path)
    yield d
    if d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait()


def raw(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    f = s.makefile("rb")
    greeting = json.loads(f.readline())
    return s, f, greeting


def send(s, f, obj):
    s.sendall(obj if isinstance(obj, bytes) else json.dumps(obj).encode() + b"\n")
    while True:
        msg = json.loads(f.readline())
        if "event" not in msg:
            return msg


def test_socket_is_0600_and_greets_like_qmp(daemon):
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
    s, f, greeting = raw(daemon.socket)
    assert greeting["QMP"]["version"]["package"] == "kvmfilter"
    s.close()


def test_status_readiness_page_map(daemon):
    with daemon.client() as c:
        status = c.execute("query-status")["return"]
        assert status["status"] == "running" and status["exit"] is None
        assert status["image"] == "<bundled:readiness_cycle>"
        ready = c.execute("query-migration-readiness")["return"]
        assert {"ready", "value", "blocked-reasons", "since", "transitions"} <= set(ready)
        assert c.execute("query-page-map")["return"]["tracking"] is True
        names = {x["name"] for x in c.execute("query-commands")["return"]}
        assert {"stop", "cont", "quit", "query-status"} <= names


def test_events_arrive_in_order_at_every_client(daemon):
    clients = [daemon.client() for _ in range(3)]
    seen = [[] for _ in clients]

    def collect(i, c):
        deadline = time.monotonic() + 15
        while len(seen[i]) < 6 and time.monotonic() < deadline:
            msg = c.read()
            if msg.get("event") == "MIGRATION_READINESS_CHANGED":
                seen[i].append((msg["data"]["from"], msg["data"]["to"], msg["data"]["time"]))

    threads = [threading.Thread(target=collect, args=(i, c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    assert all(len(s) >= 4 for s in seen), seen
    for s in seen:
        for (f1, t1, _), (f2, t2, _) in zip(s, s[1:]):
            assert t1 == f2, "each event's from is the previous event's to"
    # The clients overlap in time: the shared part is identical, in the same order.
    common = set(seen[0]) & set(seen[1]) & set(seen[2])
    orders = [[e for e in s if e in common] for s in seen]
    assert orders[0] == orders[1] == orders[2] and len(common) >= 2


def test_stop_parks_the_guest_and_cont_resumes(daemon):
    with daemon.client() as c:
        assert c.execute("stop") == {"return": {}}
        assert c.execute("query-status")["return"]["status"] == "paused"
        before = c.execute("query-migration-readiness")["return"]
        time.sleep(0.6)  # three readiness phases of this guest
        during = c.execute("query-migration-readiness")["return"]
        assert (during["accesses"], during["transitions"]) == (before["accesses"],
                                                               before["transitions"])
        assert c.execute("cont") == {"return": {}}
        poll(lambda: c.execute("query-migration-readiness")["return"]["transitions"]
             > before["transitions"])
        kinds = [e["event"] for e in c.events]
        assert "STOP" in kinds and "RESUME" in kinds
        assert kinds.index("STOP") < kinds.index("RESUME")


def test_metrics_file(daemon):
    poll(lambda: os.path.exists(daemon.metrics))
    with open(daemon.metrics) as f:
        text = f.read()
    for name in ("kvmfilter_migration_ready", "kvmfilter_migration_blocked",
                 "kvmfilter_msr_accesses_total", "kvmfilter_migration_transitions_total",
                 "kvmfilter_page_map_shared_bytes"):
        assert f"# TYPE {name} " in text
    assert 'kvmfilter_msr_accesses_total{vm="test-vm",verdict="ok"}' in text
    assert not [p for p in os.listdir(os.path.dirname(daemon.metrics)) if p.endswith(".tmp")]


def test_bad_input_is_answered_and_everyone_else_is_served(daemon):
    s, f, _ = raw(daemon.socket)
    before = send(s, f, {"execute": "query-status"})
    assert before["error"]["class"] == "CommandNotFound"  # before qmp_capabilities
    assert "qmp_capabilities" in before["error"]["desc"]
    assert send(s, f, {"execute": "qmp_capabilities", "id": 7}) == {"return": {}, "id": 7}
    assert send(s, f, {"execute": "qmp_capabilities"})["error"]["class"] == "CommandNotFound"
    assert "JSON parse error" in send(s, f, b"{not json\n")["error"]["desc"]
    assert send(s, f, b"[1, 2]\n")["error"]["class"] == "GenericError"
    assert send(s, f, {"execute": 42})["error"]["class"] == "GenericError"
    assert send(s, f, {"execute": "query-status", "arguments": [1]})["error"]["class"] == \
        "GenericError"
    assert "unexpected" in send(s, f, {"execute": "stop", "arguments": {"x": 1}})["error"]["desc"]
    assert send(s, f, {"execute": "no-such", "id": "a"}) == {
        "error": {"class": "CommandNotFound", "desc": "The command no-such has not been found"},
        "id": "a"}
    huge = b'{"execute": "' + b"x" * (1 << 20) + b'"}\n'
    assert "longer than" in send(s, f, huge)["error"]["desc"]
    assert send(s, f, {"execute": "query-status"})["return"]["status"] == "running"
    s.close()


def test_many_vanishing_clients_and_one_that_never_reads(daemon):
    hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hog.connect(daemon.socket)
    try:  # requests whose replies it never reads: the daemon may drop it mid-way
        hog.sendall(b'{"execute": "qmp_capabilities"}\n'
                    + b'{"execute": "query-commands"}\n' * 20000)
    except (BrokenPipeError, ConnectionResetError):
        pass
    for _ in range(50):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(daemon.socket)
        if _ % 2:
            s.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-st')
        s.close()
    started = time.monotonic()
    with daemon.client() as c:
        assert c.execute("query-status")["return"]["status"] == "running"
    assert time.monotonic() - started < 5.0
    hog.close()
    assert daemon.proc.poll() is None


def test_second_serve_on_the_same_socket_is_refused(daemon, tmp_path):
    p = subprocess.run(kvmfilter_cmd() + ["serve", "--socket", daemon.socket],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert "another live" in p.stderr
    with daemon.client() as c:  # the first one is untouched
        assert c.execute("query-status")["return"]["status"] == "running"


def test_stale_socket_is_replaced(kvm, tmp_path):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "vm.sock"))
    stale.close()  # the file stays, nobody listens
    d = DaemonProcess(tmp_path)
    try:
        with d.client() as c:
            assert c.execute("query-status")["return"]["status"] == "running"
        assert "stale_socket_replaced" in d.log()
    finally:
        assert d.stop() == 0


def test_powerdown_then_guest_stopped_then_quit(daemon):
    with daemon.client() as c:
        assert c.execute("system_powerdown") == {"return": {}}
        deadline = time.monotonic() + 5
        while c.execute("query-status")["return"]["status"] != "guest-stopped":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status = c.execute("query-status")["return"]
        assert status["exit"] == {"reason": "debug_exit", "code": 0, "detail": None}
        assert c.execute("query-migration-readiness")["return"]["value"] == 0  # revoked
        assert "GUEST_STOPPED" in [e["event"] for e in c.events]
        assert c.execute("cont")["error"]["desc"].startswith("the guest has stopped")
        assert c.execute("quit") == {"return": {}}
    assert daemon.proc.wait(15) == 0
    assert not os.path.exists(daemon.socket)


def test_query_and_watch_commands(daemon):
    out = subprocess.run(kvmfilter_cmd() + ["query", "--socket", daemon.socket,
                                            "query-migration-readiness"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "blocked-reasons" in json.loads(out.stdout)
    bad = subprocess.run(kvmfilter_cmd() + ["query", "--socket", daemon.socket, "nope"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "CommandNotFound" in bad.stderr
    badargs = subprocess.run(kvmfilter_cmd() + ["query", "--socket", daemon.socket, "stop",
                                                "--arguments", "{oops"],
                             capture_output=True, text=True, timeout=30)
    assert badargs.returncode == 2
    watch = subprocess.Popen(kvmfilter_cmd() + ["watch", "--socket", daemon.socket],
                             stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert daemon.stop() == 0
    lines = watch.communicate(timeout=15)[0].splitlines()
    assert watch.returncode == 0
    events = [json.loads(line)["event"] for line in lines]
    assert "MIGRATION_READINESS_CHANGED" in events and events[-1] == "SHUTDOWN"


def test_no_daemon_is_a_clear_error(tmp_path):
    p = subprocess.run(kvmfilter_cmd() + ["query", "--socket", str(tmp_path / "none.sock"),
                                          "query-status"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "no daemon socket" in p.stderr


def test_sigterm_mid_burst_loses_no_committed_transition(kvm, tmp_path):
    image = tmp_path / "toggle.bin"
    image.write_bytes(TOGGLE)
    d = DaemonProcess(tmp_path, str(image))
    seen = []
    with d.client(timeout=15) as c:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            msg = c.read()
            if msg.get("event") == "MIGRATION_READINESS_CHANGED":
                seen.append(msg["data"])
        assert d.stop(signal.SIGTERM) == 0
        try:
            while True:
                msg = c.read()
                if msg.get("event") == "MIGRATION_READINESS_CHANGED":
                    seen.append(msg["data"])
        except (EOFError, ConnectionError, OSError):
            pass
    assert not os.path.exists(d.socket)
    with ReadinessJournal(d.journal, create=False) as j:
        rows = j.rows("test-vm")
    assert len(seen) > 10
    # Every event the client heard (it connected mid-stream) is in the journal,
    # in the same order, with nothing missing in between ...
    journaled = [(r.old, r.new, r.to_json()["time"]) for r in rows]
    heard = [(e["from"], e["to"], e["time"]) for e in seen]
    first = journaled.index(heard[0])
    assert journaled[first:first + len(heard)] == heard
    # ... and the journal is one unbroken chain from the initial value.
    prev = 0
    for r in rows:
        assert r.old == prev and r.new != r.old
        prev = r.new


def test_sd_notify(kvm, tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    notify.bind(path)
    notify.settimeout(15)
    d = DaemonProcess(tmp_path, env={"NOTIFY_SOCKET": path})
    try:
        messages = [notify.recv(4096).decode()]
        assert "READY=1" in messages[0] and "STATUS=" in messages[0]
    finally:
        assert d.stop() == 0
        notify.settimeout(2)
        try:
            while True:
                messages.append(notify.recv(4096).decode())
        except socket.timeout:
            pass
        notify.close()
    assert any("STOPPING=1" in m for m in messages)


def test_concurrent_stop_and_cont_keep_a_true_state(daemon):
    errors = []

    def hammer(command):
        with daemon.client(timeout=30) as c:
            for _ in range(8):
                reply = c.execute(command)
                if "error" in reply:
                    errors.append(reply)

    threads = [threading.Thread(target=hammer, args=(cmd,)) for cmd in ("stop", "cont") * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with daemon.client() as c:
        status = c.execute("query-status")["return"]["status"]
        if status == "paused":  # then every vCPU really is parked
            before = c.execute("query-migration-readiness")["return"]["accesses"]
            time.sleep(0.5)
            assert c.execute("query-migration-readiness")["return"]["accesses"] == before
            c.execute("cont")
        assert c.execute("query-status")["return"]["status"] == "running"


def test_a_transition_flood_does_not_starve_clients_or_sigterm(kvm, tmp_path):
    image = tmp_path / "toggle.bin"
    image.write_bytes(TOGGLE)
    # No journal: thousands of transitions a second (the journal's fsync would pace them).
    sock = str(tmp_path / "flood.sock")
    p = subprocess.Popen(kvmfilter_cmd() + ["serve", str(image), "--vcpus", "2",
                                            "--socket", sock,
                                            "--metrics-file", str(tmp_path / "m.prom")],
                         stderr=subprocess.PIPE, text=True)
    try:
        poll(lambda: os.path.exists(sock))
        time.sleep(1.0)  # let the flood build up
        started = time.monotonic()
        with QmpClient(sock, timeout=10) as c:
            r = c.execute("query-migration-readiness")["return"]
        assert time.monotonic() - started < 5.0
        assert r["transitions"] > 100
        started = time.monotonic()
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0
        assert time.monotonic() - started < 5.0
        assert not os.path.exists(sock)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_unbindable_socket_path_is_a_clear_error(kvm, tmp_path):
    for path in (str(tmp_path / "no" / "such" / "dir.sock"), "/tmp/" + "x" * 120):
        p = subprocess.run(kvmfilter_cmd() + ["serve", "--socket", path],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr and "kvmfilter: error:" in p.stderr
