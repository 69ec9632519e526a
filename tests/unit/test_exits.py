"""Decoding exits from run pages filled by hand, and writing replies back."""
import pytest

from kvmfilter.kvm import exits
from kvmfilter.kvm._kvm import ffi, lib
from kvmfilter.kvm.exits import (HLT, INTERRUPTED, SHUTDOWN, FailEntryExit, HypercallExit,
                             HypercallReply, InternalErrorExit, IoExit, IoInReply, MsrExit,
                             MsrReply, RunPageBuffer, UnsupportedExit, apply, decode)


@pytest.fixture
def page():
    return RunPageBuffer()


def test_wrmsr_exit(page):
    run = page.run
    run.exit_reason = lib.KVM_EXIT_X86_WRMSR
    run.msr.index = 0x4B564D08
    run.msr.data = 0x1_0000_0001
    run.msr.reason = lib.KVM_MSR_EXIT_REASON_FILTER
    assert decode(run) == MsrExit(True, 0x4B564D08, 0x1_0000_0001, 4)


def test_rdmsr_exit_and_reply(page):
    run = page.run
    run.exit_reason = lib.KVM_EXIT_X86_RDMSR
    run.msr.index = 0x4B564D08
    run.msr.data = 0xDEAD  # stale: an RDMSR exit carries no data
    assert decode(run) == MsrExit(False, 0x4B564D08, 0, 0)
    apply(run, MsrReply(False, 1))
    assert (run.msr.error, run.msr.data) == (0, 1)


def test_msr_gp_reply_sets_error(page):
    run = page.run
    run.exit_reason = lib.KVM_EXIT_X86_WRMSR
    apply(run, MsrReply(True))
    assert run.msr.error == 1
    apply(run, MsrReply(False))
    assert run.msr.error == 0


def _fill_io(page, direction, port, data, size=1):
    run = page.run
    run.exit_reason = lib.KVM_EXIT_IO
    run.io.direction = direction
    run.io.size = size
    run.io.port = port
    run.io.count = len(data) // size
    run.io.data_offset = page.IO_DATA_OFFSET
    ffi.memmove(ffi.cast("char *", run) + page.IO_DATA_OFFSET, data, len(data))
    return run


def test_io_out_exit_carries_the_bytes(page):
    run = _fill_io(page, lib.KVM_EXIT_IO_OUT, 0xE9, b"hi")
    ex = decode(run)
    assert ex == IoExit(lib.KVM_EXIT_IO_OUT, 1, 0xE9, 2, b"hi")
    assert ex.is_out


def test_io_in_reply_fills_all_ones_when_short(page):
    run = _fill_io(page, lib.KVM_EXIT_IO_IN, 0x80, b"\0\0\0\0", size=2)
    assert decode(run) == IoExit(lib.KVM_EXIT_IO_IN, 2, 0x80, 2, b"")
    apply(run, IoInReply(b"\x12"))
    data = ffi.buffer(ffi.cast("char *", run) + page.IO_DATA_OFFSET, 4)[:]
    assert data == b"\x12\xff\xff\xff"


def test_hypercall_exit_long_mode_flag(page):
    run = page.run
    run.exit_reason = lib.KVM_EXIT_HYPERCALL
    run.hypercall.nr = 12
    for i, v in enumerate((0x1000, 2, 0x10, 0, 0, 0)):
        run.hypercall.args[i] = v
    flags = ffi.cast("uint64_t *", ffi.cast("char *", run) + lib.KVMF_HYPERCALL_FLAGS_OFFSET)
    flags[0] = lib.KVM_EXIT_HYPERCALL_LONG_MODE
    ex = decode(run)
    assert ex == HypercallExit(12, (0x1000, 2, 0x10, 0, 0, 0), 1)
    assert ex.long_mode
    flags[0] = 0
    assert not decode(run).long_mode


def test_hypercall_reply_writes_negative_ret_as_u64(page):
    run = page.run
    run.exit_reason = lib.KVM_EXIT_HYPERCALL
    run.hypercall.ret = 0x5555  # stale, as kernels before 6.13 leave it
    apply(run, HypercallReply(-lib.KVM_ENOSYS))
    assert run.hypercall.ret == (1 << 64) - 1000


@pytest.mark.parametrize("reason, expected", [
    (lib.KVM_EXIT_HLT, HLT),
    (lib.KVM_EXIT_SHUTDOWN, SHUTDOWN),
    (lib.KVM_EXIT_INTR, INTERRUPTED),
])
def test_plain_exits(page, reason, expected):
    page.run.exit_reason = reason
    assert decode(page.run) is expected


def test_fail_entry(page):
    run = page.run
    run.exit_reason = lib.KVM_EXIT_FAIL_ENTRY
    run.fail_entry.hardware_entry_failure_reason = 0x80000021
    run.fail_entry.cpu = 1
    assert decode(run) == FailEntryExit(0x80000021, 1)


def test_internal_error_keeps_ndata_words(page):
    run = page.run
    run.exit_reason = lib.KVM_EXIT_INTERNAL_ERROR
    run.internal.suberror = 1
    run.internal.ndata = 2
    run.internal.data[0], run.internal.data[1], run.internal.data[2] = 7, 8, 9
    assert decode(run) == InternalErrorExit(1, (7, 8))


def test_internal_error_ndata_is_clamped(page):
    run = page.run
    run.exit_reason = lib.KVM_EXIT_INTERNAL_ERROR
    run.internal.ndata = 1000
    assert len(decode(run).data) == 16


def test_unknown_reason_is_unsupported(page):
    page.run.exit_reason = 999
    ex = decode(page.run)
    assert ex == UnsupportedExit(999)
    assert ex.name == "exit_999"
    page.run.exit_reason = lib.KVM_EXIT_MMIO
    assert decode(page.run).name == "mmio"


def test_apply_rejects_non_replies(page):
    with pytest.raises(TypeError):
        apply(page.run, "ok")
    apply(page.run, None)  # nothing to write is allowed


def test_exit_names_cover_the_report_keys():
    assert exits.exit_name(lib.KVM_EXIT_X86_WRMSR) == "x86_wrmsr"
    assert exits.exit_name(lib.KVM_EXIT_IO) == "io"
