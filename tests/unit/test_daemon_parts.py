"""Daemon pieces that need no KVM: the metrics textfile, sd_notify, socket
activation, the watchdog, the socket path rule, the migration jobs' thread."""
import os
import socket
import stat
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvmfilter.daemon import metrics, notify
from kvmfilter.migrate import transport as listen
from kvmfilter.policy.readiness import Op
from kvmfilter.vm.vmm import RunOptions, Vmm


def parse(text: str) -> dict:
    """{(name, frozenset(labels)): value}, through Prometheus' own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_metrics_text_parses_as_prometheus_exposition():
    with Vmm(None, RunOptions(name='we"ird\\vm'), image=b"\xf4") as v:
        v.control.access(0, Op.WRMSR, 1)
        v.control.access(0, Op.WRMSR, 2)
        v.page_map.update(0x1000, 0x3000, True)
        text = metrics.metrics_text(v, "1.2.3")
    values = parse(text)
    vm = ("vm", 'we"ird\\vm')

    def get(name, *labels):
        return values[(name, frozenset((vm,) + labels))]

    assert values[("kvmfilter_build_info", frozenset({("version", "1.2.3")}))] == 1
    assert get("kvmfilter_migration_ready") == 1
    assert get("kvmfilter_msr_accesses_total", ("verdict", "ok")) == 1
    assert get("kvmfilter_msr_accesses_total", ("verdict", "gp")) == 1
    assert get("kvmfilter_migration_transitions_total") == 1
    assert get("kvmfilter_page_map_shared_bytes") == 0x2000
    assert get("kvmfilter_migration_last_transition_timestamp_seconds") > 1.7e9
    states = {dict(labels)["state"]: value for (name, labels), value in values.items()
              if name == "kvmfilter_vm_state"}
    assert states["prelaunch"] == 1 and sum(states.values()) == 1
    assert {"running", "paused", "shutdown", "postmigrate", "inmigrate"} <= set(states)


def test_write_atomically_leaves_no_temp_and_is_world_readable(tmp_path):
    target = tmp_path / "m.prom"
    old = os.umask(0o077)  # the shipped unit's UMask
    try:
        metrics.write_atomically(str(target), "a 1\n")
        metrics.write_atomically(str(target), "a 2\n")
    finally:
        os.umask(old)
    assert target.read_text() == "a 2\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["m.prom"]


def test_write_atomically_never_follows_a_planted_symlink(tmp_path):
    """The old temp name was PATH.<pid>.tmp: predictable, and open() followed it."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    target = tmp_path / "m.prom"
    for pid in range(os.getpid(), os.getpid() + 5):  # the attacker's guesses
        os.symlink(victim, f"{target}.{pid}.tmp")
        os.symlink(victim, tmp_path / f".m.prom.{pid}.tmp")
    metrics.write_atomically(str(target), "kvmfilter_migration_ready 0\n")
    assert victim.read_text() == "precious\n"
    assert target.read_text() == "kvmfilter_migration_ready 0\n"
    assert not target.is_symlink()


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    target = tmp_path / "m.prom"
    os.symlink(victim, target)
    metrics.write_atomically(str(target), "x 1\n")
    assert victim.read_text() == "precious\n" and not target.is_symlink()


def test_failed_write_removes_its_temp_file(tmp_path):
    target = tmp_path / "dir-in-the-way"
    target.mkdir()  # rename over a directory fails
    with pytest.raises(OSError):
        metrics.write_atomically(str(target), "x 1\n")
    assert [p.name for p in tmp_path.iterdir()] == ["dir-in-the-way"]


def test_metrics_directory_rules(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(metrics.MetricsPathError, match="writable by other users"):
        metrics.check_metrics_path(str(open_dir / "m.prom"))
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp: others cannot replace root's file
    metrics.check_metrics_path(str(sticky / "m.prom"))
    private = tmp_path / "private"
    private.mkdir()
    private.chmod(0o755)
    metrics.check_metrics_path(str(private / "m.prom"))
    os.mkfifo(private / "fifo")
    with pytest.raises(metrics.MetricsPathError, match="not a regular file"):
        metrics.check_metrics_path(str(private / "fifo"))
    with pytest.raises(metrics.MetricsPathError):
        metrics.check_metrics_path(str(tmp_path / "missing" / "m.prom"))


def test_notifier_sends_and_warns_once(tmp_path, caplog):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    assert notify.Notifier(path).send("READY=1")
    assert sock.recv(100) == b"READY=1"
    assert not notify.Notifier("").send("READY=1")
    missing = notify.Notifier(str(tmp_path / "nobody-listens"))
    with caplog.at_level("DEBUG", logger="kvmfilter"):
        for _ in range(5):
            assert not missing.send("STATUS=x")
    levels = [r.levelname for r in caplog.records if r.getMessage() == "sd_notify_failed"]
    assert levels == ["WARNING"] + ["DEBUG"] * 4


def test_watchdog_interval(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert notify.watchdog_interval() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert notify.watchdog_interval() is None  # meant for another process
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 2.0


def test_socket_activation_takes_the_passed_socket(tmp_path):
    """A child with LISTEN_FDS=1 and fd 3 a listening Unix socket (as systemd does)."""
    path = str(tmp_path / "act.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    code = ("import os; os.dup2(int(os.environ['FD']), 3);"
            "os.environ['LISTEN_PID'] = str(os.getpid());"
            "from kvmfilter.daemon.notify import activated_socket;"
            "s = activated_socket(); print(s.getsockname(), os.environ.get('LISTEN_FDS'))")
    p = subprocess.run([sys.executable, "-c", code], pass_fds=(listener.fileno(),),
                       capture_output=True, text=True,
                       env={**os.environ, "LISTEN_FDS": "1", "FD": str(listener.fileno())})
    listener.close()
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [path, "None"]


def test_socket_path_rules(tmp_path):
    listen.claim_socket_path(str(tmp_path / "free.sock"))  # nothing there: fine
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(listen.SocketError, match="not a socket"):
        listen.claim_socket_path(str(regular))
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(tmp_path / "live.sock"))
    live.listen()
    with pytest.raises(listen.SocketError, match="another live"):
        listen.claim_socket_path(str(tmp_path / "live.sock"))
    live.close()  # the file remains: stale now
    listen.claim_socket_path(str(tmp_path / "live.sock"))
    assert not (tmp_path / "live.sock").exists()


def test_bound_socket_is_0600_even_with_a_wide_umask(tmp_path):
    old = os.umask(0)
    try:
        sock = listen.bind_unix(str(tmp_path / "s.sock"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "s.sock").st_mode) == 0o600
    sock.close()


def test_socket_path_too_long():
    with pytest.raises(listen.SocketError, match="at most 107 bytes"):
        listen.claim_socket_path("/tmp/" + "x" * 200)


def test_a_thread_that_finishes_after_the_loop_closed_is_told_not_raised_at():
    """A guest that stops while the daemon shuts down: its watcher thread posts
    to a closed loop.  That raised 'Event loop is closed' in the thread, a
    traceback on stderr; now the call says False and shutdown has done the work."""
    import asyncio
    import threading

    from kvmfilter.daemon.loop import call_from_thread

    loop = asyncio.new_event_loop()
    ran = []
    assert call_from_thread(loop, ran.append, 1)
    loop.run_until_complete(asyncio.sleep(0))
    assert ran == [1]
    loop.close()
    results = []
    t = threading.Thread(target=lambda: results.append(call_from_thread(loop, ran.append, 2)))
    t.start()
    t.join()
    assert results == [False] and ran == [1]


def test_migrate_incoming_that_cannot_build_its_vm_answers_an_error_and_waits_on():
    """The VM is built before migrate-incoming answers; when it cannot be, the
    reply says why, the listener is gone, and a later migrate-incoming may try
    again (the daemon does not end)."""
    import asyncio

    from kvmfilter.daemon.commands import COMMANDS
    from kvmfilter.daemon.qmp import QmpError
    from kvmfilter.migrate.destination import IncomingError

    class Unbuildable:
        closed = False

        def listen(self):
            pass

        def set_up(self):
            raise IncomingError("cannot prepare the VM: no room")

        def close(self):
            self.closed = True

    class Server:
        vmm = incoming = None
        started = False

        def make_incoming(self, uri):
            self.made = Unbuildable()
            return self.made

        def start_incoming(self, incoming):
            self.started = True

    server = Server()
    handler = COMMANDS.get("migrate-incoming").handler
    with pytest.raises(QmpError) as exc:
        asyncio.run(handler(server, {"uri": "unix:/nonexistent/in.sock"}))
    assert exc.value.desc == "cannot prepare the VM: no room"
    assert server.made.closed and server.incoming is None and not server.started


def test_the_daemon_starts_every_migration_on_the_thread_it_started_ahead(monkeypatch):
    # The wiring only (a real job runs on it in the KVM tests): each job the
    # daemon starts is handed the worker whose thread has waited since the
    # daemon's Migrations was made - not left to start a thread of its own.
    import asyncio
    import threading
    from types import SimpleNamespace

    from kvmfilter.daemon import migration

    started = []

    class Job:
        def __init__(self, vmm, uri, params, on_event):
            self.active = self.moved = False

        def start(self, worker=None):
            started.append(worker)

    monkeypatch.setattr(migration, "MigrationJob", Job)
    loop = asyncio.new_event_loop()
    try:
        migrations = migration.Migrations(loop, lambda *args: None)
        waiting = set(threading.enumerate())
        guest = SimpleNamespace(stop_record=None, blocked_reasons=lambda: [])
        migrations.start(guest, "unix:/nonexistent/a.sock")
        migrations.start(guest, "unix:/nonexistent/b.sock")
        [first, second] = started
        assert first is not None and first is second
        assert first.thread in waiting and first.thread.is_alive()
        migrations.close()
        assert not first.thread.is_alive()
    finally:
        loop.close()
