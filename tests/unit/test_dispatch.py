"""The machine's real dispatch path, driven by run pages filled by hand (no KVM).

This is how the KVM_HC_MAP_GPA_RANGE path is tested on hosts whose KVM never
delivers the hypercall exit (host-kvm.md).
"""
import pytest

from kvmfilter._kvm import ffi, lib
from kvmfilter.exits import RunPageBuffer
from kvmfilter.machine import CONTINUE, HALTED, STOPPED
from kvmfilter.vmm import RunOptions, Vmm

HELLO = b"\xf4"
U64 = (1 << 64) - 1


@pytest.fixture
def vmm():
    v = Vmm(None, RunOptions(), image=HELLO, label="<test>")
    yield v
    v.close()


def hypercall(page, nr, args, long_mode=True, stale_ret=0x5A5A):
    run = page.run
    run.exit_reason = lib.KVM_EXIT_HYPERCALL
    run.hypercall.nr = nr
    for i in range(6):
        run.hypercall.args[i] = args[i] if i < len(args) else 0
    run.hypercall.ret = stale_ret
    flags = ffi.cast("uint64_t *", ffi.cast("char *", run) + lib.KVMF_HYPERCALL_FLAGS_OFFSET)
    flags[0] = lib.KVM_EXIT_HYPERCALL_LONG_MODE if long_mode else 0
    return run


def ret(run) -> int:
    r = run.hypercall.ret
    return r - (1 << 64) if r >> 63 else r


MAP = lib.KVM_HC_MAP_GPA_RANGE
ENC = lib.KVM_MAP_GPA_RANGE_ENCRYPTED


def test_map_gpa_range_decrypt_then_encrypt(vmm):
    page = RunPageBuffer()
    run = hypercall(page, MAP, (0x10000, 4, 0))  # 4 pages shared (decrypted), 4K hint
    assert vmm.machine.dispatch(0, run) == CONTINUE
    assert ret(run) == 0
    assert vmm.page_map.ranges() == [(0x10000, 0x14000)]
    run = hypercall(page, MAP, (0x11000, 1, ENC | lib.KVM_MAP_GPA_RANGE_PAGE_SZ_2M))
    vmm.machine.dispatch(0, run)
    assert ret(run) == 0
    assert vmm.page_map.ranges() == [(0x10000, 0x11000), (0x12000, 0x14000)]
    assert vmm.page_map.snapshot()["shared_bytes"] == 3 * 4096


@pytest.mark.parametrize("args, why", [
    ((0x10000, 1, 1 << 5), "reserved attrs bit 5"),
    ((0x10000, 1, 1 << 63), "reserved attrs bit 63"),
    ((0x10000, 1, 3), "unknown page-size hint 3"),
    ((0x10000, 1, 0xF), "unknown page-size hint 15"),
    ((0x10800, 1, 0), "misaligned gpa"),
    ((0x10000, 0, 0), "zero pages"),
    (((1 << 20) - 4096, 2, 0), "runs past the end of guest memory"),
    ((1 << 40, 1, 0), "outside guest memory"),
])
def test_map_gpa_range_rejects_with_einval(vmm, args, why):
    page = RunPageBuffer()
    run = hypercall(page, MAP, args)
    assert vmm.machine.dispatch(0, run) == CONTINUE, why
    assert ret(run) == -lib.KVM_EINVAL, why
    assert vmm.page_map.ranges() == [], why


def test_unknown_hypercall_gets_enosys_and_ret_is_written(vmm):
    page = RunPageBuffer()
    run = hypercall(page, 99, (), stale_ret=0x1234)
    assert vmm.machine.dispatch(0, run) == CONTINUE
    assert ret(run) == -lib.KVM_ENOSYS


def test_32_bit_guest_arguments_are_truncated(vmm):
    page = RunPageBuffer()
    # High halves are garbage outside long mode (kvm-abi.md section 3).
    run = hypercall(page, MAP, (0xFFFF_FFFF_0002_0000, 0xABCD_0000_0000_0001, 0x7777_0000_0000_0000),
                    long_mode=False)
    vmm.machine.dispatch(0, run)
    assert ret(run) == 0
    assert vmm.page_map.ranges() == [(0x20000, 0x21000)]
    # The same values in long mode are out of range.
    run = hypercall(page, MAP, (0xFFFF_FFFF_0002_0000, 1, 0), long_mode=True)
    vmm.machine.dispatch(0, run)
    assert ret(run) == -lib.KVM_EINVAL


def test_without_map_gpa_range_the_hypercall_is_enosys():
    with Vmm(None, RunOptions(map_gpa_range=False), image=HELLO) as v:
        page = RunPageBuffer()
        run = hypercall(page, MAP, (0x10000, 1, 0))
        v.machine.dispatch(0, run)
        assert ret(run) == -lib.KVM_ENOSYS
        assert v.page_map.ranges() == []


def test_msr_exits_go_to_the_policy(vmm):
    page = RunPageBuffer()
    run = page.run
    run.exit_reason = lib.KVM_EXIT_X86_WRMSR
    run.msr.index = lib.MSR_KVM_MIGRATION_CONTROL
    run.msr.data = 1
    assert vmm.machine.dispatch(2, run) == CONTINUE
    assert run.msr.error == 0 and vmm.control.ready and vmm.control.last_changed_by == 2
    run.msr.data = 4
    vmm.machine.dispatch(2, run)
    assert run.msr.error == 1
    run.exit_reason = lib.KVM_EXIT_X86_RDMSR
    run.msr.data = 0
    vmm.machine.dispatch(0, run)
    assert (run.msr.error, run.msr.data) == (0, 1)


def test_msr_exit_without_handler_stops_loudly(vmm):
    page = RunPageBuffer()
    run = page.run
    run.exit_reason = lib.KVM_EXIT_X86_WRMSR
    run.msr.index = 0x10
    assert vmm.machine.dispatch(0, run) == STOPPED
    stop = vmm.machine._stop
    assert stop.reason == "unhandled" and "0x10" in stop.detail


def test_filter_is_derived_from_the_handlers(vmm):
    f = vmm.machine.msr_filter()
    assert [(r.base, r.nmsrs, r.flags) for r in f.ranges] == [
        (lib.MSR_KVM_MIGRATION_CONTROL, 1, lib.KVM_MSR_FILTER_READ | lib.KVM_MSR_FILTER_WRITE)]
    assert not f.default_deny
    for index in vmm.machine.msr_handlers:
        assert not f.allows(index, lib.KVM_MSR_FILTER_WRITE)


@pytest.mark.parametrize("reason, outcome, stop", [
    (lib.KVM_EXIT_HLT, HALTED, None),
    (lib.KVM_EXIT_SHUTDOWN, STOPPED, "shutdown"),
    (lib.KVM_EXIT_FAIL_ENTRY, STOPPED, "fail_entry"),
    (lib.KVM_EXIT_INTERNAL_ERROR, STOPPED, "internal_error"),
    (lib.KVM_EXIT_MMIO, STOPPED, "unhandled"),
])
def test_other_exits(vmm, reason, outcome, stop):
    page = RunPageBuffer()
    page.run.exit_reason = reason
    assert vmm.machine.dispatch(0, page.run) == outcome
    assert (vmm.machine._stop.reason if vmm.machine._stop else None) == stop


def test_debug_exit_port_stops_with_the_code(vmm):
    page = RunPageBuffer()
    run = page.run
    run.exit_reason = lib.KVM_EXIT_IO
    run.io.direction = lib.KVM_EXIT_IO_OUT
    run.io.size, run.io.port, run.io.count = 1, 0xF4, 1
    run.io.data_offset = page.IO_DATA_OFFSET
    ffi.cast("char *", run)[page.IO_DATA_OFFSET] = b"\x07"
    vmm.machine.dispatch(0, run)
    assert (vmm.machine._stop.reason, vmm.machine._stop.code) == ("debug_exit", 7)
