"""The installed `kvmfilter` command on real KVM, as a user runs it."""
import json
import os
import subprocess
import sys

import pytest

from conftest import TEST_GUESTS


from daemons import kvmfilter


@pytest.fixture(autouse=True)
def _kvm(kvm):
    """Every test here needs /dev/kvm (skips with the reason, or fails under CI)."""


def test_run_bundled_guest_json():
    p = kvmfilter("run", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["exit"] == {"reason": "debug_exit", "code": 0, "detail": None}
    assert r["migration"]["ready"] is True
    assert [(t["from"], t["to"]) for t in r["migration"]["transitions"]] == [(0, 1), (1, 0), (0, 1)]
    assert "not ok" not in r["console"]
    for key in ("image", "vcpus", "exit", "console", "migration", "page_map", "exits"):
        assert key in r
    for key in ("advertised", "value", "ready", "accesses", "accesses_total", "transitions",
                "blocked_reasons"):
        assert key in r["migration"]
    for key in ("tracking", "shared", "shared_bytes"):
        assert key in r["page_map"]


def test_run_human_output():
    p = kvmfilter("run")
    assert p.returncode == 0, p.stderr
    assert "ok 9 - " in p.stdout and "result: ok" in p.stdout


def test_failing_guest_exits_1():
    p = kvmfilter("run", str(TEST_GUESTS / "triple_fault.bin"), "--json")
    assert p.returncode == 1
    assert json.loads(p.stdout)["exit"]["reason"] == "shutdown"


def test_timeout_exits_1_and_says_so():
    p = kvmfilter("run", str(TEST_GUESTS / "vmcall.bin"), "--timeout", "0.5", "--json")
    r = json.loads(p.stdout)
    assert p.returncode == 1 and r["exit"]["reason"] == "timeout"


def test_journal_round_trip(tmp_path):
    journal = str(tmp_path / "j.db")
    p = kvmfilter("run", "--vcpus", "4", "--journal", journal, "--name", "ci-vm", "--json")
    assert p.returncode == 0, p.stderr
    transitions = json.loads(p.stdout)["migration"]["transitions"]
    p = kvmfilter("journal", journal, "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["transitions"]
    assert [(r["vm"], r["vcpu"], r["from"], r["to"]) for r in rows] == [
        ("ci-vm", t["vcpu"], t["from"], t["to"]) for t in transitions]


def test_logs_are_json_lines_on_stderr_when_not_a_tty():
    p = kvmfilter("--log-level", "info", "run", "--json")
    assert p.returncode == 0
    events = [json.loads(line) for line in p.stderr.splitlines() if line.strip()]
    names = [e["event"] for e in events]
    assert "vm_created" in names
    changed = [e for e in events if e["event"] == "migration_readiness_changed"]
    assert [(e["from"], e["to"]) for e in changed] == [(0, 1), (1, 0), (0, 1)]
    json.loads(p.stdout)  # stdout stays one JSON document


def test_random_image_ends_in_a_report(tmp_path):
    image = tmp_path / "random.bin"
    image.write_bytes(os.urandom(2048))
    p = kvmfilter("run", str(image), "--timeout", "1", "--json")
    assert p.returncode in (0, 1), p.stderr
    assert "Traceback" not in p.stderr
    json.loads(p.stdout)
