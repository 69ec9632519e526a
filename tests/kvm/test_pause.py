"""Machine.pause()/resume(): vCPUs parked through immediate_exit, no guest access while paused."""
import time

from kvmfilter.machine import StopRecord
from kvmfilter.vmm import RunOptions, Vmm

# Loop forever: WRMSR 1, WRMSR 0 (each a transition), 0x4b564d08.
TOGGLE = bytes.fromhex(
    "66b9084d564b"  # mov ecx, 0x4b564d08
    "6631d2"        # xor edx, edx
    "66b801000000"  # 1: mov eax, 1
    "0f30"          # wrmsr
    "6631c0"        # xor eax, eax
    "0f30"          # wrmsr
    "ebf1")         # jmp 1b


def test_pause_parks_every_vcpu_and_nothing_happens_while_paused(kvm):
    assert TOGGLE[-1] == 0xF1 and len(TOGGLE) == 6 + 3 + 6 + 2 + 3 + 2 + 2
    with Vmm(None, RunOptions(vcpus=2, timeout=None), image=TOGGLE) as v:
        v.machine.kvm = kvm
        v.machine.start()
        time.sleep(0.2)
        assert v.control.accesses_total > 0
        assert v.machine.pause()
        frozen = v.control.accesses_total
        transitions = v.control.transitions_total
        time.sleep(0.3)
        assert v.control.accesses_total == frozen, "a guest access happened while paused"
        assert v.control.transitions_total == transitions
        v.machine.resume()
        time.sleep(0.2)
        assert v.control.accesses_total > frozen
        v.machine.stop(StopRecord("quit"))
        result = v.machine.wait()
        assert result.exit.reason == "quit"
    # each vCPU's writes chain: every transition's "from" is the previous "to"
    prev = 0
    for t in v.control.transitions():
        assert t.old == prev
        prev = t.new
