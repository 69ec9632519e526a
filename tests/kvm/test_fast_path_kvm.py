"""The C fast path on real KVM: what the guest reads, who owns the console
port, and counters that are live while a vCPU still runs."""
import time

import pytest

from conftest import test_guest
from kvmfilter.kvm._kvm import lib
from kvmfilter.vm.devices import CONSOLE_PORT
from kvmfilter.vm.image import bundled_guest
from kvmfilter.vm.machine import Machine
from kvmfilter.vm.vmm import RunOptions, Vmm


@pytest.fixture(autouse=True)
def _needs_msr_exits(require_cap):
    require_cap(lib.KVM_CAP_X86_USER_SPACE_MSR, "KVM_CAP_X86_USER_SPACE_MSR")
    require_cap(lib.KVM_CAP_X86_MSR_FILTER, "KVM_CAP_X86_MSR_FILTER")


@pytest.mark.parametrize("fast_path", [True, False])
def test_the_guest_reads_back_what_it_wrote_long_after_the_log_is_full(kvm, fast_path):
    """6,003 accesses: most reads are served in C.  The guest checks every value
    itself and exits 3 on the first wrong one (a dropped RDMSR write-back)."""
    with Vmm(None, RunOptions(timeout=60, fast_path=fast_path),
             image=test_guest("rdmsr_check")) as v:
        result = v.run(kvm)
        report = v.report()
    assert (result.exit.reason, result.exit.code) == ("debug_exit", 0), result.exit
    m = report["migration"]
    assert m["accesses_total"] == 3 * 2001
    assert report["exits"]["x86_rdmsr"] == 6000 and report["exits"]["x86_wrmsr"] == 3
    assert m["transitions_total"] == 3


class Recorder:
    """A port device that takes the console port away from the built-in console."""

    def __init__(self):
        self.data = bytearray()

    def __call__(self, vcpu, ex):
        if ex.is_out:
            self.data += ex.data
        return None


@pytest.mark.parametrize("fast_path", [True, False])
def test_the_port_table_decides_who_gets_the_console_port(kvm, fast_path):
    with Machine(kvm, fast_path=fast_path) as m:
        mine = Recorder()
        m.ports.add(CONSOLE_PORT, mine)
        r = m.run(bundled_guest("hello"))
    assert bytes(mine.data) == b"hello from kvmfilter\n"
    assert r.console == ""
    assert r.exits["io"] == len(b"hello from kvmfilter\n") + 1


def test_counts_are_live_while_the_vcpu_runs(kvm):
    """2,000 RDMSRs, then the vCPU spins: the total must not wait for it to stop."""
    with Vmm(None, RunOptions(timeout=None), image=test_guest("rdmsr_then_spin")) as v:
        v.start(kvm)
        deadline = time.monotonic() + 20
        while v.control.accesses_total != 2001:
            assert time.monotonic() < deadline, f"stuck at {v.control.accesses_total}"
            time.sleep(0.02)
        assert v.stop_record is None  # still running
        assert v.control.per_vcpu == {0: {"rdmsr": 2000, "wrmsr": 1}}
        v.stop("quit")
        v.wait()
