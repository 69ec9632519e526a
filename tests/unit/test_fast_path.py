"""The C fast path replays only verdicts the policy published, agrees with it,
and writes the same replies into the run page that exits.apply would.

The C functions (cstubs/kvm_source.c) are called directly on run pages filled
by hand: no KVM needed.
"""
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmfilter.kvm._kvm import ffi, lib
from kvmfilter.kvm.exits import MsrReply, RunPageBuffer, apply
from kvmfilter.kvm.fastpath import MsrRules, VcpuFastPath
from kvmfilter.policy.readiness import Op, MigrationControl

MSR = 0x4B564D08
u64 = st.integers(0, (1 << 64) - 1)
data_st = st.one_of(st.sampled_from([0, 1, 2, 3, 1 << 32, 1 << 32 | 1, (1 << 64) - 1]), u64)


def published(mc: MigrationControl) -> MsrRules:
    rules = MsrRules(MSR)
    mc.add_listener(lambda t: rules.set_value(t.new))
    with mc.lock:
        rules.publish(**mc.fast_rules())
    return rules


def test_disabled_rules_decide_nothing():
    rules = MsrRules(MSR)
    assert not rules.enabled
    for write in (False, True):
        assert rules.decide(write, 0)[0] == -1


@settings(max_examples=500)
@given(advertised=st.booleans(), encrypted=st.booleans(),
       history=st.lists(st.tuples(st.sampled_from([Op.RDMSR, Op.WRMSR]), data_st), max_size=8),
       op=st.sampled_from([Op.RDMSR, Op.WRMSR]), data=data_st)
def test_c_verdicts_equal_the_policy_and_never_cover_a_transition(
        advertised, encrypted, history, op, data):
    mc = MigrationControl(advertised=advertised, encrypted_memory=encrypted)
    rules = published(mc)
    for h_op, h_data in history:  # the value moves; the listener keeps C current
        mc.access(0, h_op, h_data)
    verdict, value = rules.decide(op == Op.WRMSR, data)
    expected = mc.decide(op, data, mc.value)
    if verdict == -1:
        return  # Python decides: always allowed
    assert verdict == int(expected.gp)
    if op == Op.RDMSR and not expected.gp:
        assert value == expected.value == mc.value
    if op == Op.WRMSR:
        assert expected.value == mc.value, "C serviced a write that changes the value"


def msr_page(write: bool, data: int, index: int = MSR):
    page = RunPageBuffer()
    run = page.run
    run.exit_reason = lib.KVM_EXIT_X86_WRMSR if write else lib.KVM_EXIT_X86_RDMSR
    run.msr.index = index
    run.msr.data = data
    run.msr.error = 0x5A  # stale: the service must overwrite it
    return page


@settings(max_examples=300)
@given(advertised=st.booleans(), value=st.sampled_from([0, 1]), write=st.booleans(),
       data=data_st)
def test_c_service_writes_what_apply_writes(advertised, value, write, data):
    """The per-access service function on a hand-filled run page: the reply it
    leaves (error, and for RDMSR the value read) is the one exits.apply would
    leave for the policy's verdict.  Dropping C's RDMSR write-back fails here."""
    mc = MigrationControl(advertised=advertised, encrypted_memory=not value)
    fast = VcpuFastPath(published(mc), None)
    page = msr_page(write, data)
    if not fast.service(page.run):
        verdict = mc.decide(Op.WRMSR if write else Op.RDMSR, data, mc.value)
        assert write and not verdict.gp and verdict.value != mc.value, \
            "C declined an access that changes nothing"
        return
    expected = msr_page(write, data)
    verdict = mc.decide(Op.WRMSR if write else Op.RDMSR, data, mc.value)
    apply(expected.run, MsrReply(verdict.gp, verdict.value))
    assert (page.run.msr.error, page.run.msr.data) == \
        (expected.run.msr.error, expected.run.msr.data)


def test_rdmsr_reply_is_the_value():
    mc = MigrationControl(encrypted_memory=False)  # value 1
    fast = VcpuFastPath(published(mc), None)
    page = msr_page(False, 0)
    assert fast.service(page.run)
    assert (page.run.msr.error, page.run.msr.data) == (0, 1)
    assert fast.read_counts() == (1, 0, 0, 0)


def test_other_msrs_and_exits_go_to_python():
    mc = MigrationControl()
    fast = VcpuFastPath(published(mc), None)
    assert not fast.service(msr_page(False, 0, index=0x10).run)
    page = RunPageBuffer()
    page.run.exit_reason = lib.KVM_EXIT_HLT
    assert not fast.service(page.run)
    assert fast.read_counts() == (0, 0, 0, 0)


def test_counts_are_cumulative_and_live():
    mc = MigrationControl(encrypted_memory=False)
    fast = VcpuFastPath(published(mc), None)
    for write, data in ((False, 0), (True, 1), (True, 2), (False, 0)):
        assert fast.service(msr_page(write, data).run)
    assert fast.read_counts() == (2, 0, 1, 1)
    assert fast.read_counts() == (2, 0, 1, 1)  # reading does not reset


def test_enabled_rules_service_what_changes_nothing():
    rules = published(MigrationControl(advertised=True, encrypted_memory=False))  # value 1
    assert rules.decide(False, 0) == (0, 1)       # a read: the value
    assert rules.decide(True, 1)[0] == 0          # a write of the current value
    assert rules.decide(True, 2)[0] == 1          # a reserved bit: #GP
    assert rules.decide(True, 1 << 40)[0] == 1
    assert rules.decide(True, 0)[0] == -1         # a change: Python decides
    off = published(MigrationControl(advertised=False))
    assert [off.decide(w, d)[0] for w, d in ((False, 0), (True, 0), (True, 1))] == [1, 1, 1]


def console_out(fast, page, port, data, direction=lib.KVM_EXIT_IO_OUT):
    run = page.run
    run.exit_reason = lib.KVM_EXIT_IO
    run.io.direction, run.io.size, run.io.port = direction, 1, port
    run.io.count, run.io.data_offset = len(data), page.IO_DATA_OFFSET
    ffi.memmove(ffi.cast("char *", run) + page.IO_DATA_OFFSET, data, len(data))
    return fast.service(run)


def test_console_collection_in_c():
    fast = VcpuFastPath(None, 0xE9)
    page = RunPageBuffer()
    assert console_out(fast, page, 0xE9, b"hello")
    assert not console_out(fast, page, 0x80, b"x")                       # another port
    assert not console_out(fast, page, 0xE9, b"x", lib.KVM_EXIT_IO_IN)   # an IN
    assert console_out(fast, page, 0xE9, b"!!!")
    assert fast.drain_console() == (b"hello!!!", 2)
    assert fast.drain_console() == (b"", 0)


def test_no_console_port_collects_nothing():
    """The port table gave 0xE9 to another device: C must leave it to Python."""
    fast = VcpuFastPath(None, None)
    assert not console_out(fast, RunPageBuffer(), 0xE9, b"hello")
    assert fast.drain_console() == (b"", 0)


def test_console_buffer_full_goes_to_python():
    fast = VcpuFastPath(None, 0xE9)
    page = RunPageBuffer()
    assert console_out(fast, page, 0xE9, b"x" * 4000)
    assert not console_out(fast, page, 0xE9, b"y" * 200)  # does not fit in 4096
    assert fast.drain_console() == (b"x" * 4000, 1)
