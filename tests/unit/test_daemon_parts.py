"""Daemon pieces that need no KVM: metrics text, sd_notify, the socket path rule,
and the example systemd unit."""
import pathlib
import socket

import pytest

from kvmfilter import daemon
from kvmfilter.migration import WRMSR
from kvmfilter.vmm import RunOptions, Vmm

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_metrics_text_is_prometheus_exposition():
    with Vmm(None, RunOptions(name='we"ird\\vm'), image=b"\xf4") as v:
        v.control.access(0, WRMSR, 1)
        v.control.access(0, WRMSR, 2)
        v.page_map.update(0x1000, 0x3000, True)
        text = daemon.metrics_text(v, "running")
    assert 'vm="we\\"ird\\\\vm"' in text
    lines = [l for l in text.splitlines() if not l.startswith("#")]
    values = {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in lines}
    vm = 'vm="we\\"ird\\\\vm"'
    assert values[f"kvmfilter_migration_ready{{{vm}}}"] == 1
    assert values[f'kvmfilter_msr_accesses_total{{{vm},verdict="ok"}}'] == 1
    assert values[f'kvmfilter_msr_accesses_total{{{vm},verdict="gp"}}'] == 1
    assert values[f"kvmfilter_migration_transitions_total{{{vm}}}"] == 1
    assert values[f"kvmfilter_page_map_shared_bytes{{{vm}}}"] == 0x2000
    assert values[f"kvmfilter_vm_running{{{vm}}}"] == 1
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            assert line.split()[3] in ("gauge", "counter")


def test_write_atomically_leaves_no_temp(tmp_path):
    target = tmp_path / "m.prom"
    daemon.write_atomically(str(target), "a 1\n")
    daemon.write_atomically(str(target), "a 2\n")
    assert target.read_text() == "a 2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["m.prom"]


def test_sd_notify_sends_to_the_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert daemon.sd_notify("READY=1")
    assert sock.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not daemon.sd_notify("READY=1")


def test_socket_path_rules(tmp_path):
    daemon.claim_socket_path(str(tmp_path / "free.sock"))  # nothing there: fine
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(daemon.SocketError, match="not a socket"):
        daemon.claim_socket_path(str(regular))
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(tmp_path / "live.sock"))
    live.listen()
    with pytest.raises(daemon.SocketError, match="another live"):
        daemon.claim_socket_path(str(tmp_path / "live.sock"))
    live.close()  # the file remains: stale now
    daemon.claim_socket_path(str(tmp_path / "live.sock"))
    assert not (tmp_path / "live.sock").exists()


def test_example_unit_is_hardened_and_runs_serve():
    unit = (ROOT / "examples" / "kvmfilter@.service").read_text()
    assert "Type=notify" in unit and "kvmfilter --log-level info serve" in unit
    for setting in ("NoNewPrivileges=yes", "ProtectSystem=strict", "DeviceAllow=/dev/kvm rw",
                    "RestrictAddressFamilies=AF_UNIX", "CapabilityBoundingSet="):
        assert setting in unit


def test_socket_path_too_long(tmp_path):
    with pytest.raises(daemon.SocketError, match="at most 107 bytes"):
        daemon.claim_socket_path("/tmp/" + "x" * 200)
