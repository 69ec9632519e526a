"""`kvmfilter serve` as a real process with a real guest, over its real socket."""
import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time

import pytest

from conftest import TEST_GUESTS
from daemons import DaemonProcess, kvmfilter, kvmfilter_cmd, poll, raw, send, short_tmp  # noqa: F401
from kvmfilter.daemon.client import QmpClient
from kvmfilter.policy.journal import ReadinessJournal

TOGGLE = str(TEST_GUESTS / "toggle.bin")
CYCLE = "bundled:readiness_cycle"


@pytest.fixture
def daemon(kvm, short_tmp):
    d = DaemonProcess(short_tmp)
    yield d
    d.kill()


@pytest.fixture
def cycling(kvm, short_tmp):
    d = DaemonProcess(short_tmp, CYCLE)
    yield d
    d.kill()


def test_socket_is_0600_and_greets_like_qemu(daemon):
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
    s, f, greeting = raw(daemon.socket)
    version = greeting["QMP"]["version"]
    assert set(version["qemu"]) == {"major", "minor", "micro"}  # qmp-shell reads these
    assert version["package"].startswith("kvmfilter ")
    assert greeting["QMP"]["capabilities"] == []
    s.close()


def test_status_readiness_page_map(daemon):
    with daemon.client() as c:
        status = c.execute("query-status")["return"]
        assert status["status"] == "running" and status["running"] and status["exit"] is None
        assert status["image"] == "<bundled:ready_wait>"
        ready = poll(lambda: c.execute("query-migration-readiness")["return"]["ready"] and
                     c.execute("query-migration-readiness")["return"])
        assert ready["value"] == 1 and ready["transitions"] == 1 and ready["accesses"] == 1
        page_map = c.execute("query-page-map")["return"]
        assert page_map["tracking"] is True and page_map["shared-bytes"] == 0
        assert "shared_bytes" not in page_map  # kebab-case throughout
        names = {x["name"] for x in c.execute("query-commands")["return"]}
        assert {"stop", "cont", "quit", "query-status", "qmp_capabilities"} <= names


def test_the_default_guest_costs_no_cpu(daemon):
    """It announces READY, then waits in HLT: the daemon should be idle."""
    poll(lambda: daemon.query("query-migration-readiness")["return"]["ready"])

    def cpu_seconds():
        with open(f"/proc/{daemon.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu_seconds()
    time.sleep(2.0)
    used = cpu_seconds() - before
    assert used < 0.2, f"an idle daemon used {used:.2f} s of CPU in 2 s"


def test_readiness_events_are_throttled_and_the_same_at_every_client(cycling):
    clients = [cycling.client() for _ in range(3)]
    seen = [[] for _ in clients]

    def collect(i, c):
        deadline = time.monotonic() + 20
        while len(seen[i]) < 4 and time.monotonic() < deadline:
            msg = c.read()
            if msg.get("event") == "MIGRATION_READINESS_CHANGED":
                seen[i].append((msg["data"]["transitions"], msg["data"]["to"],
                                time.monotonic()))

    threads = [threading.Thread(target=collect, args=(i, c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    assert all(len(s) >= 3 for s in seen), seen
    for s in seen:
        counts = [n for n, _, _ in s]
        assert counts == sorted(set(counts)), "each event carries a larger transition count"
        arrivals = [t for _, _, t in s]
        # at most one per second (QEMU's throttle for guest-triggered events)
        assert all(b - a > 0.8 for a, b in zip(arrivals, arrivals[1:])), arrivals
    events = [[(n, to) for n, to, _ in s] for s in seen]
    common = set(events[0]) & set(events[1]) & set(events[2])
    orders = [[e for e in s if e in common] for s in events]
    assert orders[0] == orders[1] == orders[2] and len(common) >= 2


def test_stop_parks_the_guest_and_cont_resumes(cycling):
    with cycling.client() as c:
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
    text = open(daemon.metrics).read()
    for name in ("kvmfilter_migration_ready", "kvmfilter_migration_blocked",
                 "kvmfilter_msr_accesses_total", "kvmfilter_migration_transitions_total",
                 "kvmfilter_page_map_shared_bytes", "kvmfilter_vm_state",
                 "kvmfilter_build_info"):
        assert f"# TYPE {name} " in text
    assert 'kvmfilter_vm_state{vm="test-vm",state="running"} 1' in text
    assert stat.S_IMODE(os.stat(daemon.metrics).st_mode) == 0o644
    assert not [p for p in os.listdir(os.path.dirname(daemon.metrics)) if p.endswith(".tmp")]


def test_second_serve_on_the_same_socket_is_refused(daemon):
    p = kvmfilter("serve", "--socket", daemon.socket, timeout=30)
    assert p.returncode == 2
    assert "another live" in p.stderr
    assert daemon.query("query-status")["return"]["status"] == "running"


def test_stale_socket_is_replaced(kvm, short_tmp):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(short_tmp / "vm.sock"))
    stale.close()  # the file stays, nobody listens
    d = DaemonProcess(short_tmp)
    try:
        assert d.query("query-status")["return"]["status"] == "running"
        assert "stale_socket_replaced" in d.log()
    finally:
        assert d.stop() == 0
        d.kill()


def test_powerdown_wakes_the_halted_guest_then_shutdown_then_quit(daemon):
    with daemon.client() as c:
        poll(lambda: c.execute("query-migration-readiness")["return"]["ready"])
        assert c.execute("system_powerdown") == {"return": {}}
        poll(lambda: c.execute("query-status")["return"]["status"] == "shutdown")
        status = c.execute("query-status")["return"]
        assert status["exit"] == {"reason": "debug_exit", "code": 0, "detail": None}
        assert not status["running"]
        assert c.execute("query-migration-readiness")["return"]["value"] == 0  # revoked
        poll(lambda: "GUEST_STOPPED" in [e["event"] for e in c.events] or
             c.execute("query-status") and "GUEST_STOPPED" in [e["event"] for e in c.events])
        assert c.execute("cont")["error"]["desc"].startswith("the guest has stopped")
        assert c.execute("quit") == {"return": {}}
    assert daemon.proc.wait(15) == 0
    assert not os.path.exists(daemon.socket)


def test_query_and_watch_commands(daemon):
    out = kvmfilter("query", "--socket", daemon.socket, "query-migration-readiness")
    assert out.returncode == 0 and "blocked-reasons" in json.loads(out.stdout)
    env = {**os.environ, "KVMFILTER_SOCKET": daemon.socket}
    out = kvmfilter("query", "query-status", "--json", env=env)
    assert out.returncode == 0 and json.loads(out.stdout)["return"]["status"] == "running"
    bad = kvmfilter("query", "--socket", daemon.socket, "nope")
    assert bad.returncode == 1 and "CommandNotFound" in bad.stderr
    badargs = kvmfilter("query", "--socket", daemon.socket, "stop", "--arguments", "{oops")
    assert badargs.returncode == 2
    watch = subprocess.Popen(kvmfilter_cmd() + ["watch", "--json"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(1.0)
    assert daemon.query("stop") == {"return": {}}
    assert daemon.stop() == 0
    out, err = watch.communicate(timeout=15)
    assert watch.returncode == 0, err
    events = [json.loads(line)["event"] for line in out.splitlines()]
    assert "STOP" in events and events[-1] == "SHUTDOWN"


def test_no_daemon_is_a_clear_error(short_tmp):
    p = kvmfilter("query", "--socket", str(short_tmp / "none.sock"), "query-status")
    assert p.returncode == 2 and "no daemon socket" in p.stderr


def test_sigterm_mid_burst_loses_no_committed_transition(kvm, short_tmp):
    d = DaemonProcess(short_tmp, TOGGLE)
    try:
        seen = []
        with d.client(timeout=15) as c:
            deadline = time.monotonic() + 2.5
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
            except (EOFError, OSError, Exception):
                pass
        assert not os.path.exists(d.socket)
        with ReadinessJournal(d.journal, create=False) as j:
            rows = j.rows("test-vm")
        assert len(seen) >= 2 and len(rows) > 10
        # Every event the client heard is a journaled transition, in the journal's
        # order; the last event announced the journal's last row.
        journaled = [(r.old, r.new, r.to_json()["time"]) for r in rows]
        heard = [(e["from"], e["to"], e["time"]) for e in seen]
        positions = [journaled.index(h) for h in heard]
        assert positions == sorted(positions)
        assert heard[-1] == journaled[-1]
        assert seen[-1]["transitions"] == len(rows)
        # ... and the journal is one unbroken chain from the initial value.
        prev = 0
        for r in rows:
            assert r.old == prev and r.new != r.old
            prev = r.new
    finally:
        d.kill()


def test_sd_notify(kvm, short_tmp):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(short_tmp / "notify.sock")
    notify.bind(path)
    notify.settimeout(15)
    d = DaemonProcess(short_tmp, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    try:
        messages = [notify.recv(4096).decode()]
        assert "READY=1" in messages[0] and "STATUS=" in messages[0]
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            messages.append(notify.recv(4096).decode())
        assert any(m == "WATCHDOG=1" for m in messages)
    finally:
        assert d.stop() == 0
        notify.settimeout(2)
        try:
            while True:
                messages.append(notify.recv(4096).decode())
        except socket.timeout:
            pass
        notify.close()
        d.kill()
    assert any("STOPPING=1" in m for m in messages)


def test_concurrent_stop_and_cont_keep_a_true_state(cycling):
    errors = []

    def hammer(command):
        with cycling.client(timeout=30) as c:
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
    with cycling.client() as c:
        status = c.execute("query-status")["return"]["status"]
        if status == "paused":  # then every vCPU really is parked
            before = c.execute("query-migration-readiness")["return"]["accesses"]
            time.sleep(0.5)
            assert c.execute("query-migration-readiness")["return"]["accesses"] == before
            c.execute("cont")
        assert c.execute("query-status")["return"]["status"] == "running"


def test_a_transition_flood_does_not_starve_clients_or_sigterm(kvm, short_tmp):
    # No journal: thousands of transitions a second (the journal's fsync would pace them).
    d = DaemonProcess(short_tmp, TOGGLE, "--vcpus", "2", journal=False)
    try:
        time.sleep(1.0)  # let the flood build up
        started = time.monotonic()
        with QmpClient(d.socket, timeout=10) as c:
            r = c.execute("query-migration-readiness")["return"]
        assert time.monotonic() - started < 5.0
        assert r["transitions"] > 100
        started = time.monotonic()
        assert d.stop() == 0
        assert time.monotonic() - started < 5.0
        assert not os.path.exists(d.socket)
    finally:
        d.kill()


def test_unbindable_socket_path_is_a_clear_error(kvm, short_tmp):
    for path in (str(short_tmp / "no" / "such" / "dir.sock"), "/tmp/" + "x" * 120):
        p = kvmfilter("serve", "--socket", path, timeout=30)
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr and "kvmfilter: error:" in p.stderr
