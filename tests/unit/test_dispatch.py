"""handle_exit, the free function that services one exit, on run pages filled by
hand (no KVM).

This is how the KVM_HC_MAP_GPA_RANGE path is tested on hosts whose KVM never
delivers the hypercall exit (docs/host-kvm.md).
"""
import pytest

from kvmfilter.kvm._kvm import ffi, lib
from kvmfilter.kvm.exits import RunPageBuffer
from kvmfilter.policy.pagemap import PageMap
from kvmfilter.policy.readiness import MigrationControl
from kvmfilter.vm.devices import CONSOLE_PORT, DEBUG_EXIT_PORT, Console, DebugExit, PortTable
from kvmfilter.vm.dispatch import ExitHandlers, Outcome, StopReason, StopRecord, handle_exit
from kvmfilter.vm.handlers import MapGpaRange, MigrationControlMsr

MEMORY = 1 << 20
MAP = lib.KVM_HC_MAP_GPA_RANGE
ENC = lib.KVM_MAP_GPA_RANGE_ENCRYPTED


class Tables:
    """Real handlers around a policy and a page map; stops are recorded."""

    def __init__(self, map_gpa_range=True):
        self.control = MigrationControl()
        self.page_map = PageMap()
        self.console = Console()
        self.stops: list[StopRecord] = []
        ports = PortTable()
        ports.add(CONSOLE_PORT, self.console)
        ports.add(DEBUG_EXIT_PORT, DebugExit(
            lambda vcpu, code: self.stops.append(StopRecord(StopReason.DEBUG_EXIT, code,
                                                            None, vcpu))))
        hypercalls = {MAP: MapGpaRange(self.page_map, MEMORY)} if map_gpa_range else {}
        self.handlers = ExitHandlers(
            {lib.MSR_KVM_MIGRATION_CONTROL: MigrationControlMsr(self.control)}, ports,
            hypercalls, self.stops.append)

    def handle(self, run, vcpu=0):
        return handle_exit(self.handlers, vcpu, run)


@pytest.fixture
def t():
    return Tables()


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


def test_map_gpa_range_decrypt_then_encrypt(t):
    page = RunPageBuffer()
    run = hypercall(page, MAP, (0x10000, 4, 0))  # 4 pages shared (decrypted), 4K hint
    assert t.handle(run) is Outcome.HANDLED
    assert ret(run) == 0
    assert t.page_map.ranges() == [(0x10000, 0x14000)]
    run = hypercall(page, MAP, (0x11000, 1, ENC | lib.KVM_MAP_GPA_RANGE_PAGE_SZ_2M))
    t.handle(run)
    assert ret(run) == 0
    assert t.page_map.ranges() == [(0x10000, 0x11000), (0x12000, 0x14000)]
    assert t.page_map.snapshot()["shared_bytes"] == 3 * 4096


@pytest.mark.parametrize("args, why", [
    ((0x10000, 1, 1 << 5), "reserved attrs bit 5"),
    ((0x10000, 1, 1 << 63), "reserved attrs bit 63"),
    ((0x10000, 1, 3), "unknown page-size hint 3"),
    ((0x10000, 1, 0xF), "unknown page-size hint 15"),
    ((0x10800, 1, 0), "misaligned gpa"),
    ((0x10000, 0, 0), "zero pages"),
    ((MEMORY - 4096, 2, 0), "runs past the end of guest memory"),
    ((1 << 40, 1, 0), "outside guest memory"),
])
def test_map_gpa_range_rejects_with_einval(t, args, why):
    page = RunPageBuffer()
    run = hypercall(page, MAP, args)
    assert t.handle(run) is Outcome.HANDLED, why
    assert ret(run) == -lib.KVM_EINVAL, why
    assert t.page_map.ranges() == [], why


def test_unknown_hypercall_gets_enosys_and_ret_is_written(t):
    page = RunPageBuffer()
    run = hypercall(page, 99, (), stale_ret=0x1234)
    assert t.handle(run) is Outcome.HANDLED
    assert ret(run) == -lib.KVM_ENOSYS


def test_32_bit_guest_arguments_are_truncated(t):
    page = RunPageBuffer()
    # High halves are garbage outside long mode (docs/kvm-abi.md).
    run = hypercall(page, MAP, (0xFFFF_FFFF_0002_0000, 0xABCD_0000_0000_0001,
                                0x7777_0000_0000_0000), long_mode=False)
    t.handle(run)
    assert ret(run) == 0
    assert t.page_map.ranges() == [(0x20000, 0x21000)]
    # The same values in long mode are out of range.
    run = hypercall(page, MAP, (0xFFFF_FFFF_0002_0000, 1, 0), long_mode=True)
    t.handle(run)
    assert ret(run) == -lib.KVM_EINVAL


def test_without_map_gpa_range_the_hypercall_is_enosys():
    t = Tables(map_gpa_range=False)
    run = hypercall(RunPageBuffer(), MAP, (0x10000, 1, 0))
    t.handle(run)
    assert ret(run) == -lib.KVM_ENOSYS
    assert t.page_map.ranges() == []


def msr_exit(page, write, index, data):
    run = page.run
    run.exit_reason = lib.KVM_EXIT_X86_WRMSR if write else lib.KVM_EXIT_X86_RDMSR
    run.msr.index = index
    run.msr.data = data
    run.msr.error = 0
    return run


def test_msr_exits_go_to_the_policy(t):
    page = RunPageBuffer()
    run = msr_exit(page, True, lib.MSR_KVM_MIGRATION_CONTROL, 1)
    assert t.handle(run, vcpu=2) is Outcome.HANDLED
    assert run.msr.error == 0 and t.control.ready and t.control.last_changed_by == 2
    run = msr_exit(page, True, lib.MSR_KVM_MIGRATION_CONTROL, 4)
    t.handle(run, vcpu=2)
    assert run.msr.error == 1
    run = msr_exit(page, False, lib.MSR_KVM_MIGRATION_CONTROL, 0)
    t.handle(run)
    assert (run.msr.error, run.msr.data) == (0, 1)


def test_msr_exit_without_handler_stops_loudly(t):
    run = msr_exit(RunPageBuffer(), True, 0x10, 0)
    assert t.handle(run) is Outcome.STOPPED
    assert [s.reason for s in t.stops] == [StopReason.UNHANDLED]
    assert "0x10" in t.stops[0].detail and "WRMSR" in t.stops[0].detail


@pytest.mark.parametrize("reason, outcome, stop", [
    (lib.KVM_EXIT_HLT, Outcome.HALTED, None),
    (lib.KVM_EXIT_INTR, Outcome.INTERRUPTED, None),
    (lib.KVM_EXIT_SHUTDOWN, Outcome.STOPPED, StopReason.SHUTDOWN),
    (lib.KVM_EXIT_FAIL_ENTRY, Outcome.STOPPED, StopReason.FAIL_ENTRY),
    (lib.KVM_EXIT_INTERNAL_ERROR, Outcome.STOPPED, StopReason.INTERNAL_ERROR),
    (lib.KVM_EXIT_MMIO, Outcome.STOPPED, StopReason.UNHANDLED),
])
def test_other_exits(t, reason, outcome, stop):
    page = RunPageBuffer()
    page.run.exit_reason = reason
    assert t.handle(page.run) is outcome
    assert [s.reason for s in t.stops] == ([stop] if stop else [])


def io_exit(page, port, data=b"", direction=None, size=1):
    run = page.run
    run.exit_reason = lib.KVM_EXIT_IO
    run.io.direction = lib.KVM_EXIT_IO_OUT if direction is None else direction
    run.io.size, run.io.port, run.io.count = size, port, max(len(data) // size, 1)
    run.io.data_offset = page.IO_DATA_OFFSET
    if data:
        ffi.memmove(ffi.cast("char *", run) + page.IO_DATA_OFFSET, data, len(data))
    return run


def test_debug_exit_port_stops_with_the_code(t):
    run = io_exit(RunPageBuffer(), DEBUG_EXIT_PORT, b"\x07")
    t.handle(run, vcpu=1)
    assert [(s.reason, s.code, s.vcpu) for s in t.stops] == [(StopReason.DEBUG_EXIT, 7, 1)]


def test_console_and_unknown_ports(t):
    page = RunPageBuffer()
    t.handle(io_exit(page, CONSOLE_PORT, b"hi"))
    assert t.console.text() == "hi"
    run = io_exit(page, 0x80, direction=lib.KVM_EXIT_IO_IN, size=4)
    assert t.handle(run) is Outcome.HANDLED
    assert ffi.buffer(ffi.cast("char *", run) + page.IO_DATA_OFFSET, 4)[:] == b"\xff" * 4
    t.handle(io_exit(page, 0x80, b"x"))
    assert t.handlers.ports.unhandled() == {0x80: 2}
