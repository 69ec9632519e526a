"""Machine.pause()/resume(): vCPUs parked through immediate_exit, no guest access while paused."""
import time

from kvmfilter.vm.vmm import RunOptions, Vmm

from conftest import test_guest



def test_pause_parks_every_vcpu_and_nothing_happens_while_paused(kvm):
    with Vmm(None, RunOptions(vcpus=2, timeout=None), image=test_guest("toggle")) as v:
        v.start(kvm)
        time.sleep(0.2)
        assert v.control.accesses_total > 0
        assert v.pause()
        assert v.status == "paused"
        frozen = v.control.accesses_total
        transitions = v.control.transitions_total
        time.sleep(0.3)
        assert v.control.accesses_total == frozen, "a guest access happened while paused"
        assert v.control.transitions_total == transitions
        v.resume()
        assert v.status == "running"
        time.sleep(0.2)
        assert v.control.accesses_total > frozen
        v.stop("quit")
        result = v.wait()
        assert result.exit.reason == "quit"
        assert v.status == "shutdown"
    # each vCPU's writes chain: every transition's "from" is the previous "to"
    kept = v.control.transitions()
    assert kept and all(b.old == a.new for a, b in zip(kept, kept[1:]))
    assert kept[-1].new == v.control.value
