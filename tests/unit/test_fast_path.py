"""The C fast path replays only verdicts the policy published, and agrees with it.

kvmf_fast_decide (cstubs/kvm_source.c) is called directly: no KVM needed.
"""
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmfilter._kvm import ffi, lib
from kvmfilter.machine import MsrFastPath
from kvmfilter.migration import RDMSR, WRMSR, MigrationControl

u64 = st.integers(0, (1 << 64) - 1)
data_st = st.one_of(st.sampled_from([0, 1, 2, 3, 1 << 32, 1 << 32 | 1, (1 << 64) - 1]), u64)


def c_decide(fast: MsrFastPath, op: str, data: int):
    out = ffi.new("uint64_t *")
    verdict = lib.kvmf_fast_decide(fast.struct, op == WRMSR, data, out)
    return verdict, out[0]


def test_disabled_fast_path_decides_nothing():
    fast = MsrFastPath(0x4B564D08)
    assert not fast.enabled
    for op in (RDMSR, WRMSR):
        assert c_decide(fast, op, 0)[0] == -1


@settings(max_examples=500)
@given(advertised=st.booleans(), encrypted=st.booleans(),
       history=st.lists(st.tuples(st.sampled_from([RDMSR, WRMSR]), data_st), max_size=8),
       op=st.sampled_from([RDMSR, WRMSR]), data=data_st)
def test_c_verdicts_equal_the_policy_and_never_cover_a_transition(
        advertised, encrypted, history, op, data):
    mc = MigrationControl(advertised=advertised, encrypted_memory=encrypted)
    fast = MsrFastPath(0x4B564D08)
    mc.add_listener(lambda t: fast.set_value(t.new))
    with mc.lock:
        fast.publish(**mc.fast_rules())
    for h_op, h_data in history:  # the value moves; the listener keeps C current
        mc.access(0, h_op, h_data)
    verdict, value = c_decide(fast, op, data)
    expected = mc.decide(op, data, mc.value)
    if verdict == -1:
        return  # Python decides: always allowed
    assert verdict == int(expected.gp)
    if op == RDMSR and not expected.gp:
        assert value == expected.value == mc.value
    if op == WRMSR:
        assert expected.value == mc.value, "C serviced a write that changes the value"


def test_record_bulk_counts_like_access():
    mc = MigrationControl()
    mc.record_bulk(2, WRMSR, "ok", 5)
    mc.record_bulk(2, RDMSR, "gp", 3)
    mc.record_bulk(2, RDMSR, "ok", 0)
    assert mc.accesses_total == 8
    assert mc.verdicts == {"ok": 5, "gp": 3}
    assert mc.per_vcpu == {2: {RDMSR: 3, WRMSR: 5}}
    assert mc.accesses == []  # the in-order log holds only what access() saw


def test_enabled_fast_path_services_what_changes_nothing():
    mc = MigrationControl(advertised=True, encrypted_memory=False)  # value 1
    fast = MsrFastPath(0x4B564D08)
    with mc.lock:
        fast.publish(**mc.fast_rules())
    assert c_decide(fast, RDMSR, 0) == (0, 1)       # a read: the value
    assert c_decide(fast, WRMSR, 1)[0] == 0         # a write of the current value
    assert c_decide(fast, WRMSR, 2)[0] == 1         # a reserved bit: #GP
    assert c_decide(fast, WRMSR, 1 << 40)[0] == 1
    assert c_decide(fast, WRMSR, 0)[0] == -1        # a change: Python decides
    mc_off = MigrationControl(advertised=False)
    fast_off = MsrFastPath(0x4B564D08)
    with mc_off.lock:
        fast_off.publish(**mc_off.fast_rules())
    assert [c_decide(fast_off, op, d)[0] for op, d in ((RDMSR, 0), (WRMSR, 0), (WRMSR, 1))] \
        == [1, 1, 1]


def test_console_collection_in_c():
    from kvmfilter.exits import RunPageBuffer
    page = RunPageBuffer()
    run = page.run
    buf = ffi.new("char[]", 8)
    con = ffi.new("struct kvmf_console *", {"port": 0xE9, "capacity": 8, "buffer": buf})

    def out(port, data, direction=lib.KVM_EXIT_IO_OUT):
        run.exit_reason = lib.KVM_EXIT_IO
        run.io.direction, run.io.size, run.io.port = direction, 1, port
        run.io.count, run.io.data_offset = len(data), page.IO_DATA_OFFSET
        ffi.memmove(ffi.cast("char *", run) + page.IO_DATA_OFFSET, data, len(data))
        return lib.kvmf_console_out(run, con)

    assert out(0xE9, b"hello") == 1
    assert out(0x80, b"x") == 0                              # another port: Python's
    assert out(0xE9, b"x", lib.KVM_EXIT_IO_IN) == 0          # an IN: Python's
    assert out(0xE9, b"world") == 0                          # does not fit: Python's
    assert out(0xE9, b"!!!") == 1
    assert ffi.buffer(buf, con.length)[:] == b"hello!!!" and con.exits == 2
