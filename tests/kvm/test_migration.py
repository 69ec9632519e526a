"""Live migration on real KVM, between two daemons, gated by READY.

The guests check themselves: memcheck/memcheck64 keep rewriting and verifying
their pages and registers and, on the power button, exit 0 through port 0xF4
(3 on a stale or lost page, a lost register, or an MSR that is not READY).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid

import pytest

from daemons import DaemonProcess, kvmfilter, kvmfilter_cmd, poll, short_tmp  # noqa: F401
from kvmfilter.migrate import stream
from kvmfilter.policy.journal import ReadinessJournal

OK = {"reason": "debug_exit", "code": 0, "detail": None}


def destination(tmp, uri, *shape, **kw):
    return DaemonProcess(tmp, "--incoming", uri, *shape, name=None, metrics=False,
                         socket_path=str(tmp / f"dst-{uuid.uuid4().hex[:6]}.sock"), **kw)


def final_check(d):
    assert d.query("system_powerdown") == {"return": {}}
    status = poll(lambda: (s := d.query("query-status")["return"])["status"] == "shutdown"
                  and s, what="the guest's final check")
    return status["exit"]


def wait_migration(d, timeout=60):
    return poll(lambda: (i := d.query("query-migrate")["return"]).get("status")
                in ("completed", "failed", "cancelled") and i, timeout=timeout,
                what="the migration's end")


def start_migration(src, uri, **params):
    if params:
        assert src.query("migrate-set-parameters", params) == {"return": {}}
    reply = src.query("migrate", {"uri": uri})
    assert reply == {"return": {}}, reply


@pytest.mark.parametrize("guest, extra, vcpus, scheme", [
    ("bundled:memcheck", [], 1, "unix"),
    ("bundled:memcheck", [], 2, "tcp"),
    ("bundled:memcheck64", ["--memory", "8M"], 2, "unix"),
    ("bundled:memcheck64", ["--memory", "8M"], 1, "tcp6"),
])
def test_a_running_guest_moves_and_finds_nothing_stale(kvm, short_tmp, guest, extra, vcpus,
                                                       scheme):
    port = 20000 + os.getpid() % 10000
    uri = {"unix": f"unix:{short_tmp / 'mig.sock'}", "tcp": f"tcp:127.0.0.1:{port}",
           "tcp6": f"tcp:[::1]:{port}"}[scheme]
    src = DaemonProcess(short_tmp, guest, "--vcpus", str(vcpus), "--plain-memory", *extra,
                        name="mover")
    dst = destination(short_tmp, uri)
    try:
        assert dst.query("query-status")["return"]["status"] == "inmigrate"
        time.sleep(1.0)  # generations of rewriting before the move
        with src.client() as watcher:
            p = kvmfilter("migrate", "--socket", src.socket, uri, "--json")
            assert p.returncode == 0, p.stderr + src.log()
            info = json.loads(p.stdout)
            assert info["status"] == "completed" and info["downtime"] >= 0
            assert info["x-downtime-to-started"] >= info["downtime"]
            assert info["ram"]["transferred"] > 0 and info["ram"]["dirty-sync-count"] >= 1
            stopped = src.query("query-migration-readiness")["return"]
            watcher.execute("query-status")
            statuses = [e["data"]["status"] for e in watcher.events
                        if e["event"] == "MIGRATION"]
            assert statuses[0] == "setup" and statuses[-1] == "completed"
            assert any(e["event"] == "MIGRATION_PASS" for e in watcher.events)
        assert src.query("query-status")["return"]["status"] == "postmigrate"
        refused = src.query("cont")
        assert "runs there now" in refused["error"]["desc"]  # two copies never run
        assert src.query("query-status")["return"]["status"] == "postmigrate"
        assert dst.query("query-status")["return"]["status"] == "running"
        moved = dst.query("query-migration-readiness")["return"]
        for key in ("ready", "value", "since", "transitions", "advertised", "accesses"):
            assert moved[key] == stopped[key], key
        assert dst.query("query-migrate")["return"]["status"] == "completed"
        time.sleep(1.0)  # the destination runs on
        assert final_check(dst) == OK, dst.log()
    finally:
        src.kill()
        dst.kill()


# A destination told the VM's shape builds it before the source connects, and
# opens its journal only once the stream names the parent run.
@pytest.mark.parametrize("shape", [[], ["--plain-memory"]], ids=["from-stream", "prepared"])
def test_the_readiness_record_and_journal_follow_the_guest(kvm, short_tmp, shape):
    src = DaemonProcess(short_tmp, "bundled:readiness_cycle", "--plain-memory", name="db")
    uri = f"unix:{short_tmp / 'mig.sock'}"
    other = short_tmp / "other"
    other.mkdir()
    dst = DaemonProcess(other, "--incoming", uri, *shape, name=None, metrics=False)
    try:
        poll(lambda: src.query("query-migration-readiness")["return"]["transitions"] >= 2)
        info = migrate_when_ready(src, uri)
        assert info["status"] == "completed"
        with ReadinessJournal(dst.journal, create=False) as j:
            runs = j.runs("db")
            rows = j.rows("db")
        with ReadinessJournal(src.journal, create=False) as j:
            parent = j.runs("db")[0].run
        assert [r.origin for r in runs] == ["incoming"] and runs[0].source == uri
        assert runs[0].parent == parent
        carried = [r for r in rows if r.carried]
        assert carried and carried[-1].new == 1  # READY at the stop
        later = [r for r in rows if not r.carried]
        if later:
            assert later[0].old == 1 and later[0].run == runs[0].run
    finally:
        src.kill()
        dst.kill()


def migrate_when_ready(src, uri, attempts=60):
    """readiness_cycle announces and revokes in turn: migrate while READY."""
    for _ in range(attempts):
        reply = src.query("migrate", {"uri": uri})
        if "error" in reply:
            assert "Migration is blocked" in reply["error"]["desc"], reply
            time.sleep(0.03)
            continue
        info = wait_migration(src)
        if info["status"] == "completed":
            return info
        assert "revoked" in info["error-desc"] or "not be moved" in info["error-desc"], info
        time.sleep(0.03)
    raise AssertionError("never migrated during a READY phase")


def test_migrations_while_the_guest_toggles_ready(kvm, short_tmp):
    """Every completed migration ended with READY at the stop; every one that met
    a revoke failed cleanly and the source ran on."""
    src = DaemonProcess(short_tmp, "bundled:readiness_cycle", "--plain-memory", metrics=False)
    completed = failed = refused = 0
    try:
        for attempt in range(8):
            uri = f"unix:{short_tmp / f'mig{attempt}.sock'}"
            dst = destination(short_tmp, uri, journal=False)
            try:
                for _ in range(40):
                    reply = src.query("migrate", {"uri": uri})
                    if "error" not in reply:
                        break
                    assert "Migration is blocked" in reply["error"]["desc"]
                    refused += 1
                    time.sleep(0.02)
                info = wait_migration(src)
                if info["status"] == "completed":
                    completed += 1
                    # Resolved from the carried record: READY when the source stopped.
                    moved = dst.query("query-migration-readiness")["return"]
                    at_stop = src.query("query-migration-readiness")["return"]
                    assert at_stop["value"] == 1 and at_stop["ready"]
                    assert moved["transitions"] >= at_stop["transitions"]
                    break  # the source is postmigrate now
                failed += 1
                assert src.query("query-status")["return"]["status"] == "running"
                assert dst.proc.wait(30) != 0  # the abandoned destination ran nothing
            finally:
                dst.kill()
        assert completed == 1, (completed, failed, refused)
    finally:
        src.kill()


def test_a_revoke_during_precopy_fails_the_migration_and_the_source_runs_on(kvm, short_tmp):
    src = DaemonProcess(short_tmp, "bundled:readiness_cycle", "--plain-memory", metrics=False)
    uri = f"unix:{short_tmp / 'mig.sock'}"
    dst = destination(short_tmp, uri, journal=False)
    try:
        # A slow link: the guest revokes (every ~0.2 s) long before pre-copy ends.
        assert src.query("migrate-set-parameters", {"max-bandwidth": 2048}) == {"return": {}}
        for _ in range(100):
            reply = src.query("migrate", {"uri": uri})
            if "error" not in reply:
                break
            time.sleep(0.02)
        info = wait_migration(src)
        assert info["status"] == "failed"
        assert "vCPU 0 revoked migration readiness" in info["error-desc"]
        assert src.query("query-status")["return"]["status"] == "running"
        before = src.query("query-migration-readiness")["return"]["transitions"]
        poll(lambda: src.query("query-migration-readiness")["return"]["transitions"] > before)
        code = dst.proc.wait(30)
        assert code != 0 and "abandoned" in dst.log()
    finally:
        src.kill()
        dst.kill()


def test_refused_while_blocked(kvm, short_tmp):
    src = DaemonProcess(short_tmp, metrics=False)  # encrypted memory: page map unknown here
    try:
        poll(lambda: src.query("query-migration-readiness")["return"]["ready"])
        p = kvmfilter("migrate", "--socket", src.socket, f"unix:{short_tmp / 'nobody.sock'}")
        assert p.returncode == 1
        assert "Migration is blocked" in p.stderr and "page encryption status" in p.stderr
        assert src.query("query-migrate")["return"] == {}  # nothing started
    finally:
        src.kill()


def test_destination_killed_mid_stream_then_a_second_migrate(kvm, short_tmp):
    src = DaemonProcess(short_tmp, "bundled:memcheck", "--vcpus", "2", "--plain-memory",
                        metrics=False)
    uri = f"unix:{short_tmp / 'mig.sock'}"
    dst = destination(short_tmp, uri, journal=False)
    try:
        time.sleep(0.5)
        start_migration(src, uri, **{"max-bandwidth": 20_000})
        poll(lambda: src.query("query-migrate")["return"].get("ram", {})
             .get("transferred", 0) > 30_000)
        dst.proc.send_signal(signal.SIGKILL)
        info = wait_migration(src)
        assert info["status"] == "failed" and "broke" in info["error-desc"], info
        assert src.query("query-status")["return"]["status"] == "running"
        # A second migrate after a failure, at full speed, completes.
        assert src.query("migrate-set-parameters", {"max-bandwidth": 0}) == {"return": {}}
        uri2 = f"unix:{short_tmp / 'mig2.sock'}"
        dst2 = destination(short_tmp, uri2, journal=False)
        try:
            start_migration(src, uri2)
            assert wait_migration(src)["status"] == "completed"
            assert final_check(dst2) == OK
        finally:
            dst2.kill()
    finally:
        src.kill()
        dst.kill()


class FakeDestination:
    """A listener that misbehaves: hangs up at once, refuses the stream at once
    (NAK! with a reason, then hangs up, while the source is still writing), or
    never reads."""

    def __init__(self, path, behaviour):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(1)
        self.conns = []
        self.thread = threading.Thread(target=self._serve, args=(behaviour,), daemon=True)
        self.thread.start()

    def _serve(self, behaviour):
        conn, _ = self.sock.accept()
        if behaviour == "hang up":
            conn.close()
        elif behaviour == "refuse":
            reason = json.dumps({"error": "no room for this VM here"}).encode()
            conn.sendall(stream.frame(stream.FAILED, reason))
            conn.close()
        else:
            self.conns.append(conn)  # accept, then read nothing

    def close(self):
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.mark.parametrize("behaviour, needles", [
    ("hang up", ("broke", "the destination")),  # in a write, or waiting for READY
    # The write fails (EPIPE), but the destination said why first: that is the error.
    ("refuse", ("the destination refused the stream: no room for this VM here",)),
    ("stall", ("stalled",))])
def test_a_misbehaving_destination_fails_the_migration_cleanly(kvm, short_tmp, behaviour,
                                                                needles):
    src = DaemonProcess(short_tmp, "bundled:memcheck64", "--memory", "8M", "--plain-memory",
                        metrics=False)
    fake = FakeDestination(str(short_tmp / "fake.sock"), behaviour)
    try:
        time.sleep(0.5)
        start_migration(src, f"unix:{short_tmp / 'fake.sock'}", **{"x-stall-timeout": 1000})
        info = wait_migration(src, timeout=30)
        assert info["status"] == "failed", info
        assert any(n in info["error-desc"] for n in needles), info
        assert src.query("query-status")["return"]["status"] == "running"
        assert final_check(src) == OK  # the source's guest never noticed
    finally:
        fake.close()
        src.kill()


def test_migrate_cancel_mid_way(kvm, short_tmp):
    src = DaemonProcess(short_tmp, "bundled:memcheck", "--plain-memory", metrics=False)
    uri = f"unix:{short_tmp / 'mig.sock'}"
    dst = destination(short_tmp, uri, journal=False)
    try:
        time.sleep(0.3)
        start_migration(src, uri, **{"max-bandwidth": 10_000})
        poll(lambda: src.query("query-migrate")["return"].get("status") == "active")
        assert src.query("stop")["error"]["desc"].startswith("stop is not possible while")
        assert src.query("migrate_cancel") == {"return": {}}
        info = wait_migration(src)
        assert info["status"] == "cancelled" and "migrate_cancel" in info["error-desc"]
        assert src.query("query-status")["return"]["status"] == "running"
        assert dst.proc.wait(30) != 0
        assert final_check(src) == OK
    finally:
        src.kill()
        dst.kill()


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.0\r\n\r\n",
                                     b"\x89KVMFLT\n\x01\x00\x00\x00RAM \xff\xff\xff\x7f"])
def test_a_malformed_stream_to_incoming_runs_nothing(kvm, short_tmp, garbage):
    uri_path = short_tmp / "mig.sock"
    dst = destination(short_tmp, f"unix:{uri_path}", journal=False)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(uri_path))
        s.sendall(garbage)
        s.shutdown(socket.SHUT_WR)
        code = dst.proc.wait(30)
        s.close()
        assert code == 1
        log = dst.log()
        assert "incoming_migration_failed" in log and "Traceback" not in log
        assert ("not a kvmfilter stream" in log or "the configuration must come first" in log
                or "truncated" in log or "exceeds the limit" in log), log
        assert not os.path.exists(dst.socket)
    finally:
        dst.kill()


def test_a_prepared_destination_refuses_another_vm_and_takes_its_own(kvm, short_tmp):
    src = DaemonProcess(short_tmp, "bundled:memcheck", "--vcpus", "2", "--plain-memory",
                        metrics=False, journal=False)
    uri = f"unix:{short_tmp / 'mig.sock'}"
    wrong = DaemonProcess(short_tmp, "--incoming", uri, "--memory", "2M", "--vcpus", "2",
                          "--plain-memory", name=None, metrics=False, journal=False,
                          socket_path=str(short_tmp / "wrong.sock"))
    try:
        watcher = src.client()
        start_migration(src, uri)
        info = wait_migration(src)
        watcher.execute("query-status")  # collects the events sent meanwhile
        assert "STOP" not in [e["event"] for e in watcher.events]  # refused before any stop
        watcher.close()
        assert info["status"] == "failed"
        assert "not the one this destination prepared" in info["error-desc"], info
        assert "memory 1048576 (prepared: 2097152)" in info["error-desc"], info
        assert "vcpus" not in info["error-desc"]  # only what differs is named
        assert src.query("query-status")["return"]["status"] == "running"
        assert wrong.proc.wait(10) == 1  # its incoming migration failed; nothing ran
        assert "not the one this destination prepared" in wrong.log()
        right = DaemonProcess(short_tmp, "--incoming", uri, "--vcpus", "2", "--plain-memory",
                              name=None, metrics=False, journal=False,
                              socket_path=str(short_tmp / "right.sock"))
        try:
            start_migration(src, uri)
            assert wait_migration(src)["status"] == "completed"
            assert final_check(right) == OK, right.log()  # memcheck: memory and registers
        finally:
            right.kill()
    finally:
        src.kill()
        wrong.kill()


def test_defer_then_migrate_incoming(kvm, short_tmp):
    src = DaemonProcess(short_tmp, "bundled:memcheck", "--plain-memory", metrics=False)
    dst = destination(short_tmp, "defer", "--plain-memory", journal=False)  # prepared later
    uri = f"unix:{short_tmp / 'late.sock'}"
    try:
        assert dst.query("query-status")["return"]["status"] == "inmigrate"
        assert "no VM yet" in dst.query("stop")["error"]["desc"]
        assert dst.query("migrate-incoming", {"uri": uri}) == {"return": {}}
        again = dst.query("migrate-incoming", {"uri": uri})
        assert "already been started" in again["error"]["desc"]
        start_migration(src, uri)
        assert wait_migration(src)["status"] == "completed"
        assert final_check(dst) == OK
    finally:
        src.kill()
        dst.kill()


def test_qemu_qmp_drives_a_migration(kvm, short_tmp):
    """QEMU's own client: migrate, MIGRATION events to completed, query-migrate; STOP
    on the source and RESUME on the destination, as QEMU sends them, with the
    times they happened (what the benchmark's guest-visible downtime is read from)."""
    import asyncio

    from qemu.qmp import QMPClient  # a test dependency: missing means a broken install

    src = DaemonProcess(short_tmp, "bundled:memcheck", "--plain-memory", metrics=False)
    uri = f"unix:{short_tmp / 'mig.sock'}"
    dst = destination(short_tmp, uri, journal=False)

    def when(ev):
        return ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6

    async def drive():
        qmp, other = QMPClient("test"), QMPClient("destination")
        await qmp.connect(src.socket)
        await other.connect(dst.socket)
        events = []
        with qmp.listener(("MIGRATION", "STOP")) as listener, \
                other.listener("RESUME") as resumed:
            await qmp.execute("migrate", {"uri": uri})
            async for ev in listener:
                events.append(ev)
                if ev["event"] == "MIGRATION" and ev["data"]["status"] in ("completed",
                                                                            "failed"):
                    break
            resume = await asyncio.wait_for(resumed.get(), 10)
        info = await qmp.execute("query-migrate")
        params = await qmp.execute("query-migrate-parameters")
        await qmp.disconnect()
        await other.disconnect()
        return events, resume, info, params

    try:
        time.sleep(0.3)
        events, resume, info, params = asyncio.run(asyncio.wait_for(drive(), 60))
        statuses = [ev["data"]["status"] for ev in events if ev["event"] == "MIGRATION"]
        assert statuses[-1] == "completed" and "active" in statuses
        assert info["status"] == "completed" and params["downtime-limit"] == 300
        stops = [ev for ev in events if ev["event"] == "STOP"]
        assert len(stops) == 1
        # The guest was stopped from STOP to RESUME, at least as long as the
        # downtime the source reports (it ends at COMMIT, before the destination
        # sends RESUME) but its pause phase (STOP goes out once the vCPUs parked;
        # the downtime is in whole ms).
        paused_ms = (when(resume) - when(stops[0])) * 1000
        pause_ms = info["x-downtime-phases"]["pause"]
        assert paused_ms >= info["downtime"] - pause_ms - 1, (paused_ms, info)
        assert final_check(dst) == OK
    finally:
        src.kill()
        dst.kill()


def _netns_available() -> bool:
    return shutil.which("ip") is not None and os.geteuid() == 0


@pytest.mark.skipif(not _netns_available(), reason="network namespaces need root and ip "
                    "(iproute2)")
def test_between_two_network_namespaces_over_a_veth_pair(kvm, short_tmp):
    tag = uuid.uuid4().hex[:6]
    a, b = f"kvmf-a-{tag}", f"kvmf-b-{tag}"
    cmds = [["ip", "netns", "add", a], ["ip", "netns", "add", b],
            ["ip", "link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}"],
            ["ip", "link", "set", f"va{tag}", "netns", a],
            ["ip", "link", "set", f"vb{tag}", "netns", b],
            ["ip", "-n", a, "addr", "add", "10.231.0.1/24", "dev", f"va{tag}"],
            ["ip", "-n", b, "addr", "add", "10.231.0.2/24", "dev", f"vb{tag}"],
            ["ip", "-n", a, "link", "set", f"va{tag}", "up"],
            ["ip", "-n", b, "link", "set", f"vb{tag}", "up"],
            ["ip", "-n", a, "link", "set", "lo", "up"], ["ip", "-n", b, "link", "set", "lo", "up"]]
    try:
        for cmd in cmds:
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                pytest.skip(f"cannot build the test network ({' '.join(cmd)}: "
                            f"{p.stderr.strip()})")
        uri = "tcp:10.231.0.2:4444"
        in_ns = ["ip", "netns", "exec"]
        src = DaemonProcess(short_tmp, "bundled:memcheck", "--vcpus", "2", "--plain-memory",
                            metrics=False, prefix=in_ns + [a])
        dst = DaemonProcess(short_tmp, "--incoming", uri, name=None, metrics=False,
                            journal=False, socket_path=str(short_tmp / "b.sock"),
                            prefix=in_ns + [b])
        try:
            time.sleep(0.5)
            p = kvmfilter("migrate", "--socket", src.socket, uri, "--json")
            assert p.returncode == 0, p.stderr
            assert json.loads(p.stdout)["status"] == "completed"
            assert final_check(dst) == OK
        finally:
            src.kill()
            dst.kill()
    finally:
        subprocess.run(["ip", "netns", "del", a], capture_output=True)
        subprocess.run(["ip", "netns", "del", b], capture_output=True)


@pytest.mark.parametrize("shape", [[], ["--plain-memory"]], ids=["from-stream", "prepared"])
def test_a_migrated_daemon_guest_has_no_time_limit(kvm, short_tmp, shape):
    # serve runs its guest until it is stopped; a VM that arrived by migration
    # used to take `run`'s default limit and stop after 10 s.
    src = DaemonProcess(short_tmp, "bundled:memcheck", "--plain-memory", metrics=False,
                        journal=False)
    uri = f"unix:{short_tmp / 'mig.sock'}"
    dst = destination(short_tmp, uri, *shape, journal=False)
    try:
        start_migration(src, uri)
        assert wait_migration(src)["status"] == "completed"
        time.sleep(10.5)
        assert dst.query("query-status")["return"]["status"] == "running", dst.log()
        assert final_check(dst) == OK
    finally:
        src.kill()
        dst.kill()


def test_the_threads_that_move_a_guest_run_raised_and_its_vcpus_do_not(kvm, short_tmp):
    # In one process, so each thread's nice value can be read as it works:
    # the source's job and the destination's receiver RAISE levels up (root
    # may raise a priority), every vCPU thread at the process's own.  The job
    # runs on a worker started ahead, as the daemon's does; that thread lives
    # on, so it must drop the raise when the job ends.
    from kvmfilter.migrate import priority
    from kvmfilter.migrate.destination import Incoming
    from kvmfilter.migrate.progress import Parameters
    from kvmfilter.migrate.source import MigrationJob
    from kvmfilter.migrate.transport import parse_uri
    from kvmfilter.migrate.worker import Worker
    from kvmfilter.vm.vmm import RunOptions, Vmm

    def nice(tid=None):
        return os.getpriority(os.PRIO_PROCESS, tid or threading.get_native_id())

    base = nice()
    raised = max(-20, base - priority.RAISE) if os.geteuid() == 0 else base
    seen = {}

    def record(who):
        def on_event(name, data):
            if name == "MIGRATION" and data["status"] == "active":  # both at work
                seen[who] = nice()
                seen[who + " thread"] = threading.get_ident()
        return on_event

    uri = parse_uri(f"unix:{short_tmp / 'mig.sock'}")
    src = Vmm(kvm, RunOptions(image="bundled:ready_wait", plain_memory=True, hlt_parks=True,
                              timeout=None))
    incoming = Incoming(kvm, uri, on_event=record("destination"), hlt_parks=True,
                        prepare={"memory": src.options.memory, "plain_memory": True})
    incoming.listen()
    arrived = {}
    receiver = threading.Thread(target=lambda: arrived.setdefault("vmm", incoming.run()))
    worker = Worker("migration")
    try:
        src.start()
        poll(lambda: src.control.ready, what="READY from the guest")
        receiver.start()
        job = MigrationJob(src, uri, Parameters(), on_event=record("source"))
        job.start(worker)
        assert job.done.wait(30) and job.stats.status == "completed", job.stats.error
        receiver.join(30)
        moved = arrived["vmm"]
        assert seen == {"source": raised, "destination": raised,
                        "source thread": worker.thread.ident,
                        "destination thread": receiver.ident}
        dropped = threading.Event()
        worker.submit(lambda: (seen.update(after=nice()), dropped.set()))
        assert dropped.wait(10) and seen["after"] == base
        vcpus = [t.thread.native_id for t in moved.machine.threads + src.machine.threads]
        assert [nice(tid) for tid in vcpus] == [base] * len(vcpus)
        assert nice() == base
        moved.stop()
        moved.wait()
        moved.close()
    finally:
        worker.close()
        incoming.close()
        src.stop()
        src.wait()
        src.close()


def kvm_fds(pid) -> list:
    """What a process has open of KVM: its VMs and vCPUs."""
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # a QMP connection closing meanwhile
            continue
        if target.startswith("anon_inode:kvm-"):
            fds.append(target)
    return sorted(fds)


TWO_VCPU_VM = ["anon_inode:kvm-vcpu:0", "anon_inode:kvm-vcpu:1", "anon_inode:kvm-vm"]


@pytest.mark.parametrize("mode", ["serve", "defer"])
def test_a_destination_given_the_shape_has_built_its_vm_when_it_answers(kvm, short_tmp, mode):
    # Registering 64 GiB with KVM takes tens of ms: a destination that answered
    # first (QMP, or migrate-incoming) and built afterwards is caught without
    # its VM here.
    uri = f"unix:{short_tmp / 'in.sock'}"
    dst = destination(short_tmp, uri if mode == "serve" else "defer", "--memory", "64G",
                      "--vcpus", "2", "--plain-memory", journal=False)
    try:
        if mode == "defer":
            assert kvm_fds(dst.proc.pid) == []
            assert dst.query("migrate-incoming", {"uri": uri}) == {"return": {}}
        assert kvm_fds(dst.proc.pid) == TWO_VCPU_VM
        assert dst.query("query-status")["return"]["status"] == "inmigrate"
    finally:
        dst.kill()
