"""Migration control end to end on real KVM: the bundled conformance guest,
CPUID bit 17, the filter on 0x4b564d08, the policy, the record, the journal."""
import json
import re

import pytest

from kvmfilter.kvm._kvm import lib
from kvmfilter.policy.journal import ReadinessJournal
from kvmfilter.vm.vmm import RunOptions, Vmm

from conftest import test_guest


@pytest.fixture(autouse=True)
def _needs_msr_exits(require_cap):
    require_cap(lib.KVM_CAP_X86_USER_SPACE_MSR, "KVM_CAP_X86_USER_SPACE_MSR")
    require_cap(lib.KVM_CAP_X86_MSR_FILTER, "KVM_CAP_X86_MSR_FILTER")


def run_report(kvm, image=None, **options):
    with Vmm(None, RunOptions(**options), image=image) as v:
        v.run(kvm)
        return v.report()


def map_gpa_offered(kvm) -> bool:
    """CPUID bit 16 is advertised exactly when KVM offers the MAP_GPA_RANGE exit."""
    return bool(kvm.check_extension(lib.KVM_CAP_EXIT_HYPERCALL) >> lib.KVM_HC_MAP_GPA_RANGE & 1)


def tap(console: str):
    plan = re.search(r"^1\.\.(\d+)$", console, re.M)
    results = re.findall(r"^(ok|not ok) (\d+) - (.*)$", console, re.M)
    return int(plan.group(1)), results


def test_bundled_guest_walks_the_protocol(kvm):
    r = run_report(kvm)
    assert r["image"] == "<bundled:conformance>"
    assert (r["exit"]["reason"], r["exit"]["code"]) == ("debug_exit", 0), r["console"]
    planned, results = tap(r["console"])
    assert planned == len(results) == 9 + map_gpa_offered(kvm)
    assert all(status == "ok" for status, _, _ in results), r["console"]
    m = r["migration"]
    assert m["advertised"] and m["ready"] and m["value"] == 1
    assert [(t["from"], t["to"]) for t in m["transitions"]] == [(0, 1), (1, 0), (0, 1)]
    assert m["accesses"][0] == {"vcpu": 0, "op": "rdmsr", "data": 0, "verdict": "ok"}
    gp = [a for a in m["accesses"] if a["verdict"] == "gp"]
    assert [a["data"] for a in gp] == [2, 1 << 32 | 1]
    assert r["checks"] == [{"name": "guest #GP count equals the host's gp verdicts",
                            "guest": 2, "host": 2, "ok": True}]
    assert r["exits"]["x86_wrmsr"] + r["exits"]["x86_rdmsr"] == m["accesses_total"] == 10
    assert r["ok"]


def test_without_migration_control_every_access_faults(kvm):
    r = run_report(kvm, migration_control=False)
    assert (r["exit"]["reason"], r["exit"]["code"]) == ("debug_exit", 0), r["console"]
    m = r["migration"]
    assert not m["advertised"] and not m["ready"]
    assert m["accesses_total"] == 3 and all(a["verdict"] == "gp" for a in m["accesses"])
    assert m["transitions"] == []
    assert "bit 17" in m["blocked_reasons"][0]
    assert r["checks"][0]["ok"] and r["checks"][0]["guest"] == 3


def test_plain_memory_starts_at_one(kvm):
    r = run_report(kvm, plain_memory=True)
    assert r["ok"], r["console"]
    m = r["migration"]
    assert m["accesses"][0] == {"vcpu": 0, "op": "rdmsr", "data": 1, "verdict": "ok"}
    assert "# initial value 1" in r["console"]
    assert [(t["from"], t["to"]) for t in m["transitions"]] == [(1, 0), (0, 1)]
    assert r["page_map"]["tracking"] is False




@pytest.mark.parametrize("migration_control", [True, False])
@pytest.mark.parametrize("map_gpa_range", [True, False])
def test_guest_sees_the_cpuid_bits_it_was_given(kvm, migration_control, map_gpa_range):
    r = run_report(kvm, image=test_guest("cpuid_probe"), migration_control=migration_control,
                   map_gpa_range=map_gpa_range)
    bits = ord(r["console"])
    assert bool(bits & 2) == migration_control  # bit 17: KVM_FEATURE_MIGRATION_CONTROL
    hypercall_exit = kvm.check_extension(lib.KVM_CAP_EXIT_HYPERCALL) >> 12 & 1
    # bit 16 only when the hypercall exit was enabled first
    assert bool(bits & 1) == (map_gpa_range and bool(hypercall_exit))


def test_four_vcpus_all_write_and_transitions_chain(kvm, tmp_path):
    journal = str(tmp_path / "journal.db")
    r = run_report(kvm, vcpus=4, journal=journal, name="four")
    assert r["ok"], r["console"]
    planned, results = tap(r["console"])
    assert planned == len(results) == 10 + map_gpa_offered(kvm)
    m = r["migration"]
    assert set(m["per_vcpu"]) == {"0", "1", "2", "3"}
    for v in "123":
        assert m["per_vcpu"][v] == {"rdmsr": 2, "wrmsr": 2}
    assert {t["vcpu"] for t in m["transitions"]} == {0, 1, 2, 3}
    prev = 0
    for t in m["transitions"]:
        assert t["from"] == prev and t["to"] != t["from"]
        prev = t["to"]
    assert m["ready"] and prev == 1
    with ReadinessJournal(journal, create=False) as j:
        rows = j.rows("four")
    assert [(row.vcpu, row.old, row.new) for row in rows] == [
        (t["vcpu"], t["from"], t["to"]) for t in m["transitions"]]


def test_journal_keeps_transitions_only_under_a_flood(kvm, tmp_path):
    # 100k WRMSR READY from the guest: one transition, bounded memory, one journal row.
    image = test_guest("wrmsr_flood")
    journal = str(tmp_path / "flood.db")
    r = run_report(kvm, image=image, journal=journal, timeout=60)
    assert r["exit"]["reason"] == "debug_exit"
    m = r["migration"]
    assert m["accesses_total"] == 100_000
    assert len(m["accesses"]) == 1024
    assert len(m["transitions"]) == 1
    with ReadinessJournal(journal, create=False) as j:
        assert len(j.rows()) == 1
    json.dumps(r)  # the report stays serialisable


def test_map_gpa_range_end_to_end_or_the_hosts_truthful_fallback(kvm):
    """Where the hypercall exit works, the guest's MAP_GPA_RANGE lands in the page
    map.  Where it does not (our kvm_pvm hosts: #UD), the guest reports a TAP SKIP,
    the host saw no hypercall exit, and the gate says why migration is blocked."""
    from kvmfilter.vm.probe import probe
    r = run_report(kvm)
    assert r["ok"], r["console"]
    working = probe(kvm)["features"]["exit_hypercall"]
    line = [l for l in r["console"].splitlines() if "KVM_HC_MAP_GPA_RANGE" in l]
    if not map_gpa_offered(kvm):
        assert line == [] and r["page_map"]["hypercall_exit"] != "enabled"
    elif working["working"]:
        assert "# SKIP" not in line[0]
        assert r["page_map"]["shared"] == [[0x10000, 0x11000]]
        assert r["exits"]["hypercall"] == 1
        assert r["migration"]["blocked_reasons"] == []
    else:
        assert "# SKIP the host raised #UD" in line[0], working["detail"]
        assert "hypercall" not in r["exits"]
        assert r["page_map"] == {**r["page_map"], "tracking": True, "shared": [],
                                 "shared_bytes": 0, "hypercall_exit": "enabled"}
        assert r["migration"]["ready"]
        assert len(r["migration"]["blocked_reasons"]) == 1
        assert "page encryption status" in r["migration"]["blocked_reasons"][0]


def test_plain_memory_vm_is_not_blocked_once_ready(kvm):
    r = run_report(kvm, plain_memory=True)
    assert r["migration"]["ready"] and r["migration"]["blocked_reasons"] == []


def test_no_map_gpa_range_blocks_an_encrypted_guest(kvm):
    r = run_report(kvm, map_gpa_range=False)
    assert r["ok"]
    assert any("did not enable the KVM_HC_MAP_GPA_RANGE exit" in b
               for b in r["migration"]["blocked_reasons"])




@pytest.mark.parametrize("fast_path", [True, False])
def test_record_is_exact_with_and_without_the_fast_path(kvm, tmp_path, fast_path):
    journal = str(tmp_path / "j.db")
    r = run_report(kvm, image=test_guest("msr_flood_per_vcpu"), vcpus=4, journal=journal, timeout=120,
                   fast_path=fast_path)
    assert r["exit"]["reason"] == "hlt", r["exit"]
    m = r["migration"]
    per = 30_000
    assert m["accesses_total"] == 4 * (2 * per + 2)
    for v in "0123":
        assert m["per_vcpu"][v] == {"wrmsr": per + 2, "rdmsr": per}
    assert m["verdicts"] == {"ok": 4 * (2 * per + 2), "gp": 0}
    assert r["exits"]["x86_wrmsr"] == 4 * (per + 2) and r["exits"]["x86_rdmsr"] == 4 * per
    prev = 0
    for t in m["transitions"]:
        assert t["from"] == prev and t["to"] != prev
        prev = t["to"]
    assert prev == 1 and m["ready"]
    with ReadinessJournal(journal, create=False) as j:
        assert len(j.rows()) == len(m["transitions"])
