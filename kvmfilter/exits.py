"""L2: typed exit records decoded from ``struct kvm_run``, and replies written back.

``decode(run)`` works on any run page: the one KVM maps for a vCPU, or a buffer a
test fills by hand (``new_run_page()``).  ``apply(run, reply)`` is the only code
that writes results back into ``kvm_run`` before the next KVM_RUN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ._kvm import ffi, lib

RDMSR = "rdmsr"
WRMSR = "wrmsr"

# Exit reason numbers -> report names (run report "exits" keys).
EXIT_NAMES = {
    lib.KVM_EXIT_UNKNOWN: "unknown",
    lib.KVM_EXIT_EXCEPTION: "exception",
    lib.KVM_EXIT_IO: "io",
    lib.KVM_EXIT_HYPERCALL: "hypercall",
    lib.KVM_EXIT_DEBUG: "debug",
    lib.KVM_EXIT_HLT: "hlt",
    lib.KVM_EXIT_MMIO: "mmio",
    lib.KVM_EXIT_SHUTDOWN: "shutdown",
    lib.KVM_EXIT_FAIL_ENTRY: "fail_entry",
    lib.KVM_EXIT_INTR: "intr",
    lib.KVM_EXIT_INTERNAL_ERROR: "internal_error",
    lib.KVM_EXIT_SYSTEM_EVENT: "system_event",
    lib.KVM_EXIT_X86_RDMSR: "x86_rdmsr",
    lib.KVM_EXIT_X86_WRMSR: "x86_wrmsr",
}


def exit_name(reason: int) -> str:
    return EXIT_NAMES.get(reason, f"exit_{reason}")


class RunPageBuffer:
    """A zeroed, kernel-shaped run page owned by Python, for tests and tools.

    ``.run`` is the ``struct kvm_run *``; IO data lives at ``IO_DATA_OFFSET``
    inside the same page, as KVM places it.
    """

    IO_DATA_OFFSET = 4096  # KVM puts PIO data on the page after struct kvm_run

    def __init__(self, size: int = 3 * 4096):
        # LIFETIME: .run points into .buffer; both live as long as this object.
        self.buffer = ffi.new("char[]", max(size, 2 * 4096))
        self.run = ffi.cast("struct kvm_run *", self.buffer)


# ---- exit records ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class IoExit:
    direction: int  # KVM_EXIT_IO_IN / KVM_EXIT_IO_OUT
    size: int
    port: int
    count: int
    data: bytes  # OUT: what the guest wrote; IN: b""

    @property
    def is_out(self) -> bool:
        return self.direction == lib.KVM_EXIT_IO_OUT


@dataclass(frozen=True, slots=True)
class MsrExit:
    op: str  # RDMSR or WRMSR
    index: int
    data: int  # WRMSR: EDX:EAX; RDMSR: 0
    reason: int  # KVM_MSR_EXIT_REASON_*


@dataclass(frozen=True, slots=True)
class HypercallExit:
    nr: int
    args: tuple
    flags: int

    @property
    def long_mode(self) -> bool:
        return bool(self.flags & lib.KVM_EXIT_HYPERCALL_LONG_MODE)


@dataclass(frozen=True, slots=True)
class HltExit:
    pass


@dataclass(frozen=True, slots=True)
class ShutdownExit:
    """Triple fault (or another reason the CPU shut down)."""


@dataclass(frozen=True, slots=True)
class InterruptedExit:
    """KVM_RUN returned EINTR: a kick signal or immediate_exit."""


@dataclass(frozen=True, slots=True)
class FailEntryExit:
    hardware_entry_failure_reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class InternalErrorExit:
    suberror: int
    data: tuple


@dataclass(frozen=True, slots=True)
class UnsupportedExit:
    """An exit reason kvmfilter does not service."""
    reason: int

    @property
    def name(self) -> str:
        return exit_name(self.reason)


Exit = Union[IoExit, MsrExit, HypercallExit, HltExit, ShutdownExit, InterruptedExit,
             FailEntryExit, InternalErrorExit, UnsupportedExit]

HLT = HltExit()
SHUTDOWN = ShutdownExit()
INTERRUPTED = InterruptedExit()


def decode(run) -> Exit:
    """Decode ``run`` (a ``struct kvm_run *``) into an exit record."""
    reason = run.exit_reason
    if reason == lib.KVM_EXIT_X86_WRMSR:
        m = run.msr
        return MsrExit(WRMSR, m.index, m.data, m.reason)
    if reason == lib.KVM_EXIT_X86_RDMSR:
        m = run.msr
        return MsrExit(RDMSR, m.index, 0, m.reason)
    if reason == lib.KVM_EXIT_IO:
        io = run.io
        data = b""
        if io.direction == lib.KVM_EXIT_IO_OUT:
            nbytes = io.size * io.count
            data = ffi.buffer(ffi.cast("char *", run) + io.data_offset, nbytes)[:]
        return IoExit(io.direction, io.size, io.port, io.count, data)
    if reason == lib.KVM_EXIT_HLT:
        return HLT
    if reason == lib.KVM_EXIT_INTR:
        return INTERRUPTED
    if reason == lib.KVM_EXIT_SHUTDOWN:
        return SHUTDOWN
    if reason == lib.KVM_EXIT_HYPERCALL:
        hc = run.hypercall
        flags = ffi.cast("uint64_t *", ffi.cast("char *", run)
                         + lib.KVMF_HYPERCALL_FLAGS_OFFSET)[0]
        return HypercallExit(hc.nr, tuple(hc.args), flags)
    if reason == lib.KVM_EXIT_FAIL_ENTRY:
        fe = run.fail_entry
        return FailEntryExit(fe.hardware_entry_failure_reason, fe.cpu)
    if reason == lib.KVM_EXIT_INTERNAL_ERROR:
        ie = run.internal
        return InternalErrorExit(ie.suberror, tuple(ie.data[0:min(ie.ndata, 16)]))
    return UnsupportedExit(reason)


# ---- replies --------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MsrReply:
    """error=True: KVM injects #GP(0) on the next KVM_RUN.  ``data``: RDMSR result."""
    error: bool
    data: int = 0


@dataclass(frozen=True, slots=True)
class IoInReply:
    data: bytes


@dataclass(frozen=True, slots=True)
class HypercallReply:
    ret: int  # becomes the guest's RAX; negative KVM_E* as two's complement


MSR_OK = MsrReply(False)
MSR_GP = MsrReply(True)

Reply = Union[MsrReply, IoInReply, HypercallReply, None]


def apply(run, reply: Reply) -> None:
    """Write ``reply`` into ``run`` so the next KVM_RUN completes the access."""
    if reply is None:
        return
    if type(reply) is MsrReply:
        # KVM ABI: api.rst, KVM_EXIT_X86_RDMSR/WRMSR: error=1 injects #GP;
        # for RDMSR, data is what the guest reads.
        m = run.msr
        m.error = 1 if reply.error else 0
        if not reply.error and run.exit_reason == lib.KVM_EXIT_X86_RDMSR:
            m.data = reply.data
    elif type(reply) is HypercallReply:
        # KVM ABI: api.rst, KVM_EXIT_HYPERCALL: RAX = ret on re-entry.  Always
        # written: kernels before 6.13 leave stale data here.
        run.hypercall.ret = reply.ret & 0xFFFF_FFFF_FFFF_FFFF
    elif type(reply) is IoInReply:
        io = run.io
        nbytes = io.size * io.count
        data = reply.data[:nbytes].ljust(nbytes, b"\xff")
        ffi.memmove(ffi.cast("char *", run) + io.data_offset, data, nbytes)
    else:
        raise TypeError(f"not a reply: {reply!r}")
