"""Snapshots on real KVM: save a running VM to a file (QMP migrate file:), restore
it in a new process, and let the guest itself check its memory and registers.

The memcheck guests rewrite and verify their pages and keep a generation in
registers and memory; on the power button they check once more and exit 0
through port 0xF4 (3 on any mismatch).  memcheck64 runs in long mode with
paging, a GDT and non-zero FS/GS bases.
"""
import io
import json
import os
import struct
import time

import pytest

from daemons import DaemonProcess, kvmfilter, poll, short_tmp  # noqa: F401
from kvmfilter.migrate import destination, stream
from kvmfilter.policy.journal import ReadinessJournal
from kvmfilter.vm import state as vm_state

GUESTS = {
    "real mode": ("bundled:memcheck", []),
    "long mode": ("bundled:memcheck64", ["--memory", "8M"]),
}


def save(d: DaemonProcess, path: str):
    p = kvmfilter("migrate", "--socket", d.socket, f"file:{path}", "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def snapshot_of(sock_dir, path: str, *args, settle: float = 0.5):
    """Boot a daemon with ``args``, let its guest run ``settle`` s, save it to
    ``path`` and stop it; ``migrate --json``'s answer."""
    src = DaemonProcess(sock_dir, *args, journal=False)
    try:
        time.sleep(settle)
        return save(src, path)
    finally:
        src.kill()


def power_off_and_check(d: DaemonProcess):
    """Press the power button; the guest's final check decides the exit code."""
    assert d.query("system_powerdown") == {"return": {}}
    status = poll(lambda: (s := d.query("query-status")["return"])["status"] == "shutdown"
                  and s, what="the guest's final check")
    return status["exit"]


@pytest.mark.parametrize("mode", GUESTS)
def test_save_and_restore_in_new_processes(kvm, short_tmp, mode):
    image, extra = GUESTS[mode]
    src = DaemonProcess(short_tmp, image, "--vcpus", "2", "--plain-memory", *extra,
                        journal=False, metrics=False, name="saved")
    path = str(short_tmp / "vm.kvmf")
    try:
        time.sleep(1.5)  # some generations of rewriting and checking
        before = src.query("query-migration-readiness")["return"]
        info = save(src, path)
        assert info["status"] == "completed" and info["ram"]["normal"] > 16
        assert src.query("query-status")["return"]["status"] == "postmigrate"
        at_save = src.query("query-migration-readiness")["return"]
        assert at_save["ready"] and at_save["since"] == before["since"]
        assert os.stat(path).st_mode & 0o777 == 0o600
        # A snapshot is not a move: the source may go on, and passes its own check.
        assert src.query("cont") == {"return": {}}
        assert power_off_and_check(src) == {"reason": "debug_exit", "code": 0, "detail": None}
    finally:
        src.kill()
    for attempt in range(2):  # restoring the same file twice works
        dst = DaemonProcess(short_tmp, "--incoming", f"file:{path}", journal=False,
                            metrics=False, socket_path=str(short_tmp / f"r{attempt}.sock"),
                            name=None)
        try:
            restored = dst.query("query-migration-readiness")["return"]
            # The MSR lives behind the filter: KVM_GET_MSRS knows nothing of it.
            for key in ("ready", "value", "since", "transitions", "advertised"):
                assert restored[key] == at_save[key], key
            status = dst.query("query-status")["return"]
            assert status["status"] == "running" and status["name"] == "saved"
            time.sleep(1.0)  # more generations after the restore
            assert power_off_and_check(dst) == {"reason": "debug_exit", "code": 0,
                                                "detail": None}, dst.log()
        finally:
            dst.kill()


def test_a_guest_that_wrote_ready_reads_ready_after_a_restore(kvm, short_tmp):
    """memcheck's final check includes RDMSR 0x4b564d08 == 1, written only at boot."""
    src = DaemonProcess(short_tmp, "bundled:memcheck", "--plain-memory", journal=False)
    path = str(short_tmp / "vm.kvmf")
    try:
        poll(lambda: src.query("query-migration-readiness")["return"]["ready"])
        save(src, path)
    finally:
        src.kill()
    p = kvmfilter("inspect", path, "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["readiness"]["value"] == 1 and info["readiness"]["ready"]
    assert [v["mode"] for v in info["vcpus"]] == ["real"]
    dst = DaemonProcess(short_tmp, "--incoming", f"file:{path}", journal=False,
                        socket_path=str(short_tmp / "r.sock"))
    try:
        assert power_off_and_check(dst)["code"] == 0
        r = dst.query("query-migration-readiness")["return"]
        assert r["transitions"] == 0 and r["accesses"] == 2  # the boot WRMSR + final RDMSR
    finally:
        dst.kill()


def test_run_incoming_prints_the_usual_report(kvm, short_tmp):
    path = str(short_tmp / "vm.kvmf")
    snapshot_of(short_tmp, path, "bundled:memcheck64", "--memory", "8M", "--plain-memory",
                settle=1.0)
    p = kvmfilter("run", "--incoming", f"file:{path}", "--timeout", "1.5", "--json")
    report = json.loads(p.stdout)
    # memcheck64 runs until its power button: a timeout, never a failed check.
    assert report["exit"]["reason"] == "timeout", report["exit"]
    assert "memcheck64: 1 vCPUs" in report["console"]  # the console came along
    assert report["migration"]["value"] == 1
    bad = kvmfilter("run", "--incoming", f"file:{path}", "--memory", "16M")
    assert bad.returncode == 2 and "from the stream" in bad.stderr
    # A snapshot restores the VM it holds: no shape to prepare; an image never.
    sock = str(short_tmp / "s.sock")
    for args in (["--incoming", f"file:{path}", "--memory", "16M"],
                 ["bundled:hello", "--incoming", f"unix:{short_tmp / 'in.sock'}"]):
        refused = kvmfilter("serve", *args, "--socket", sock)
        assert refused.returncode == 2 and "from the stream" in refused.stderr, refused.stderr


def test_the_gate_refuses_to_save_an_unready_guest(kvm, short_tmp):
    d = DaemonProcess(short_tmp, journal=False)  # encrypted memory: page map unknown here
    try:
        poll(lambda: d.query("query-migration-readiness")["return"]["ready"])
        reasons = d.query("query-migration-readiness")["return"]["blocked-reasons"]
        assert reasons
        p = kvmfilter("migrate", "--socket", d.socket, f"file:{short_tmp / 'no.kvmf'}")
        assert p.returncode == 1 and "Migration is blocked" in p.stderr
        assert reasons[0] in p.stderr
        assert not (short_tmp / "no.kvmf").exists()
        assert d.query("query-status")["return"]["status"] == "running"
    finally:
        d.kill()


def test_snapshot_file_safety(kvm, short_tmp):
    d = DaemonProcess(short_tmp, "--plain-memory", journal=False)
    try:
        poll(lambda: d.query("query-migration-readiness")["return"]["ready"])
        victim = short_tmp / "victim"
        victim.write_text("precious")
        (short_tmp / "link.kvmf").symlink_to(victim)
        for target in ("link.kvmf", "victim"):  # never through a symlink, never over a file
            p = kvmfilter("query", "--socket", d.socket, "migrate", "--arguments",
                          json.dumps({"uri": f"file:{short_tmp / target}"}))
            assert p.returncode == 0
            info = poll(lambda: (i := d.query("query-migrate")["return"])["status"]
                        in ("failed", "completed") and i)
            assert info["status"] == "failed" and "exists" in info["error-desc"]
            assert d.query("query-status")["return"]["status"] == "running"
        assert victim.read_text() == "precious"
        assert sorted(p.name for p in short_tmp.iterdir() if "kvmf" in p.name) == ["link.kvmf"]
    finally:
        d.kill()


def damaged(path, tmp, how):
    data = bytearray(open(path, "rb").read())
    if how == "tampered":
        data[len(data) // 2] ^= 0x40
    elif how == "truncated":
        data = data[:len(data) - 100]
    elif how == "wrong version":
        struct.pack_into("<H", data, 8, stream.VERSION + 1)
    elif how == "wrong magic":
        data[:8] = b"QEVM\x00\x00\x00\x03"
    out = tmp / f"{how.replace(' ', '-')}.kvmf"
    out.write_bytes(bytes(data))
    return str(out)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """One good snapshot of a 2-vCPU memcheck for the damage tests."""
    import tempfile
    tmp = tmp_path_factory.mktemp("snap")
    sock_dir = tempfile.mkdtemp(prefix="kvmf-")
    import pathlib
    snapshot_of(pathlib.Path(sock_dir), str(tmp / "good.kvmf"), "bundled:memcheck",
                "--vcpus", "2", "--plain-memory")
    return str(tmp / "good.kvmf"), tmp


@pytest.mark.parametrize("how, needle", [
    ("tampered", "checksum mismatch"), ("truncated", "truncated"),
    ("wrong version", "format version"), ("wrong magic", "not a kvmfilter stream")])
def test_damaged_files_are_refused_everywhere_with_exit_2(kvm, snapshot, short_tmp, how,
                                                          needle):
    good, tmp = snapshot
    bad = damaged(good, tmp, how)
    for args in (["inspect", bad], ["run", "--incoming", f"file:{bad}"],
                 ["serve", "--incoming", f"file:{bad}", "--socket", str(short_tmp / "s.sock")]):
        p = kvmfilter(*args, timeout=60)
        assert p.returncode == 2, (args, p.stderr)
        assert needle in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert not (short_tmp / "s.sock").exists()
    assert kvmfilter("inspect", good).returncode == 0


def test_a_64_gib_guest_that_touched_little_makes_a_small_file(kvm, short_tmp):
    """Untouched memory is neither read nor written: the file follows what the
    guest touched (MAP_NORESERVE memory is never faulted in by a scan)."""
    path = str(short_tmp / "big.kvmf")
    info = snapshot_of(short_tmp, path, "bundled:memcheck64", "--memory", "64G",
                       "--plain-memory", settle=1.0)
    assert info["ram"]["total"] == 64 << 30
    assert os.path.getsize(path) < 4 << 20
    dst = DaemonProcess(short_tmp, "--incoming", f"file:{path}", journal=False,
                        socket_path=str(short_tmp / "r.sock"))
    try:
        assert power_off_and_check(dst)["code"] == 0
    finally:
        dst.kill()


def save_when_ready(d: DaemonProcess, path: str, attempts: int = 40):
    """readiness_cycle announces and revokes in turn: save during a READY phase."""
    for _ in range(attempts):
        p = kvmfilter("migrate", "--socket", d.socket, f"file:{path}", "--json")
        if p.returncode == 0:
            return json.loads(p.stdout)
        assert "Migration is blocked" in p.stderr or "revoked" in p.stderr, p.stderr
        time.sleep(0.05)
    raise AssertionError("never saved during a READY phase")


def test_journal_continuity_across_a_restore(kvm, short_tmp):
    """One history for the VM: restored into the same journal nothing is written
    twice; into another journal the carried history is copied, marked."""
    src = DaemonProcess(short_tmp, "bundled:readiness_cycle", "--plain-memory", name="db-1",
                        metrics=False)
    journal = src.journal
    path = str(short_tmp / "vm.kvmf")
    try:
        poll(lambda: src.query("query-migration-readiness")["return"]["transitions"] >= 2)
        save_when_ready(src, path)
        saved = src.query("query-migration-readiness")["return"]
    finally:
        src.kill()
    with ReadinessJournal(journal, create=False) as j:
        before = [(r.old, r.new) for r in j.rows("db-1")]
    assert len(before) == saved["transitions"] >= 2
    other = str(short_tmp / "other.db")
    for target in (journal, other):
        p = kvmfilter("run", "--incoming", f"file:{path}", "--journal", target,
                      "--timeout", "0.3", "--json")
        assert json.loads(p.stdout)["exit"]["reason"] == "timeout", p.stderr
    with ReadinessJournal(journal, create=False) as j:
        runs = j.runs("db-1")
        rows = j.rows("db-1")
    assert [r.origin for r in runs] == ["boot", "restore"]
    assert runs[1].parent == runs[0].run and runs[1].source == f"file:{path}"
    assert [(r.old, r.new) for r in rows][:len(before)] == before  # no duplicate
    assert not any(r.carried for r in rows)
    if len(rows) > len(before):  # the restored guest went on: one unbroken chain
        assert rows[len(before)].old == before[-1][1] and rows[len(before)].run == runs[1].run
    with ReadinessJournal(other, create=False) as j:
        copied = [(r.old, r.new) for r in j.rows("db-1") if r.carried]
        assert j.runs()[0].parent == runs[0].run
    assert copied == before  # fewer than HISTORY_LIMIT transitions: all of them came
    p = kvmfilter("journal", journal)
    assert p.returncode == 0 and "restored from file:" in p.stdout


def test_a_deferred_destination_prepared_for_a_shape_restores_only_that_shape(kvm,
                                                                              short_tmp):
    # serve --incoming defer with a shape, then migrate-incoming file:: the
    # snapshot fills the prepared VM, or is refused for another shape.
    path = str(short_tmp / "vm.kvmf")
    snapshot_of(short_tmp, path, "bundled:memcheck", "--plain-memory")
    wrong = DaemonProcess(short_tmp, "--incoming", "defer", "--memory", "4M", "--plain-memory",
                          journal=False, name=None, socket_path=str(short_tmp / "w.sock"))
    try:
        assert wrong.query("migrate-incoming", {"uri": f"file:{path}"}) == {"return": {}}
        assert wrong.proc.wait(10) == 1
        assert "memory 1048576 (prepared: 4194304)" in wrong.log()
    finally:
        wrong.kill()
    right = DaemonProcess(short_tmp, "--incoming", "defer", "--plain-memory", journal=False,
                          name=None, socket_path=str(short_tmp / "r.sock"))
    try:
        assert right.query("migrate-incoming", {"uri": f"file:{path}"}) == {"return": {}}
        poll(lambda: right.query("query-status")["return"]["status"] == "running",
             what="the restore")
        assert power_off_and_check(right)["code"] == 0
    finally:
        right.kill()


def test_a_prepared_vm_keeps_its_cpuid_table_when_the_stream_carries_the_same(kvm,
                                                                              monkeypatch):
    vmm = vm_state.prepare(kvm, {"memory": 1 << 20, "plain_memory": True}, "incoming", "test")
    try:
        conf = json.loads(json.dumps(vm_state.config(vmm)))  # as it crosses the wire
        tables = []
        monkeypatch.setattr(vmm.machine, "set_cpuid", tables.append)
        vm_state.adopt(vmm, conf)
        assert tables == []  # the same table: not parsed and set again
        conf["cpuid"][0][3] ^= 1
        vm_state.adopt(vmm, conf)
        assert [list(e) for e in tables[0]] == conf["cpuid"]  # another one is set
    finally:
        vmm.close()


def test_a_stream_with_the_state_after_the_pages_restores(kvm, short_tmp):
    """0.2.0 sent the vCPU state, clock and kvmfilter state after the last pages;
    the state now comes first and is loaded while the pages arrive.  Both load."""
    path, old = str(short_tmp / "vm.kvmf"), str(short_tmp / "old.kvmf")
    snapshot_of(short_tmp, path, "bundled:memcheck64", "--memory", "8M", "--plain-memory",
                settle=1.0)
    with open(path, "rb") as f:
        sections = list(stream.Reader(f).sections())
    tags = [tag for tag, _ in sections]
    state = {stream.VCPU, stream.CLCK, stream.KVMF}
    last = {t: max(i for i, x in enumerate(tags) if x == t) for t in state | {stream.RAM}}
    assert max(last[t] for t in state) < last[stream.RAM]  # this version: state first
    with open(old, "wb") as f:
        f.write(written([s for s in sections if s[0] not in state]
                        + [s for s in sections if s[0] in state]))
    dst = DaemonProcess(short_tmp, "--incoming", f"file:{old}", journal=False,
                        socket_path=str(short_tmp / "r.sock"))
    try:
        time.sleep(0.5)  # more generations of rewriting and checking
        assert power_off_and_check(dst) == {"reason": "debug_exit", "code": 0,
                                            "detail": None}, dst.log()
    finally:
        dst.kill()


def written(sections) -> bytes:
    """A stream of ``sections`` ((tag, payload) pairs), header and END added."""
    out = io.BytesIO()
    w = stream.Writer(out)
    w.header()
    for tag, payload in sections:
        w.section(tag, payload)
    w.end()
    return out.getvalue()


def test_a_stream_without_its_state_or_with_it_twice_is_refused(kvm, short_tmp):
    path = str(short_tmp / "vm.kvmf")
    snapshot_of(short_tmp, path, "bundled:memcheck", "--plain-memory", settle=0.3)
    with open(path, "rb") as f:
        sections = list(stream.Reader(f).sections())
    clock = [s for s in sections if s[0] == stream.CLCK]
    for damaged, why in (([s for s in sections if s[0] != stream.KVMF],
                          "ended without kvmfilter state"),
                         (sections[:1] + clock + sections[1:], "CLCK.*repeated")):
        with pytest.raises(stream.StreamError, match=why):
            destination.receive(kvm, stream.Reader(io.BytesIO(written(damaged))), "restore",
                                "test")
