"""L2: typed exit records decoded from ``struct kvm_run``, and replies written back.

``decode(run)`` works on any run page: the one KVM maps for a vCPU, or a buffer a
test fills by hand (``RunPageBuffer``).  ``apply(run, reply)`` writes the reply to
an exit Python handled; the C fast path writes its own replies by the same rules
(``Vcpu`` lists every writer of the run page).
"""
from __future__ import annotations

from collections import namedtuple

from ..base import StrEnum
from ._kvm import ffi, lib


class ExitName(StrEnum):
    """Exit reasons by the names the run report counts them under ("exits")."""
    UNKNOWN = "unknown"
    EXCEPTION = "exception"
    IO = "io"
    HYPERCALL = "hypercall"
    DEBUG = "debug"
    HLT = "hlt"
    MMIO = "mmio"
    SHUTDOWN = "shutdown"
    FAIL_ENTRY = "fail_entry"
    INTR = "intr"
    INTERNAL_ERROR = "internal_error"
    SYSTEM_EVENT = "system_event"
    X86_RDMSR = "x86_rdmsr"
    X86_WRMSR = "x86_wrmsr"


EXIT_NAMES = {
    lib.KVM_EXIT_UNKNOWN: ExitName.UNKNOWN,
    lib.KVM_EXIT_EXCEPTION: ExitName.EXCEPTION,
    lib.KVM_EXIT_IO: ExitName.IO,
    lib.KVM_EXIT_HYPERCALL: ExitName.HYPERCALL,
    lib.KVM_EXIT_DEBUG: ExitName.DEBUG,
    lib.KVM_EXIT_HLT: ExitName.HLT,
    lib.KVM_EXIT_MMIO: ExitName.MMIO,
    lib.KVM_EXIT_SHUTDOWN: ExitName.SHUTDOWN,
    lib.KVM_EXIT_FAIL_ENTRY: ExitName.FAIL_ENTRY,
    lib.KVM_EXIT_INTR: ExitName.INTR,
    lib.KVM_EXIT_INTERNAL_ERROR: ExitName.INTERNAL_ERROR,
    lib.KVM_EXIT_SYSTEM_EVENT: ExitName.SYSTEM_EVENT,
    lib.KVM_EXIT_X86_RDMSR: ExitName.X86_RDMSR,
    lib.KVM_EXIT_X86_WRMSR: ExitName.X86_WRMSR,
}


def exit_name(reason: int) -> str:
    """The report name of an exit reason; ``exit_N`` for one KVM added later."""
    return EXIT_NAMES.get(reason) or f"exit_{reason}"


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
# Named tuples, not dataclasses: the same equality and repr, and importing this
# module stays cheap (start-up time is part of every `kvmfilter run`).

class IoExit(namedtuple("IoExit", "direction size port count data")):
    """KVM_EXIT_IO.  ``data``: what the guest wrote (OUT), b"" for IN."""
    __slots__ = ()

    @property
    def is_out(self) -> bool:
        return self.direction == lib.KVM_EXIT_IO_OUT


class MsrExit(namedtuple("MsrExit", "write index data reason")):
    """KVM_EXIT_X86_RDMSR/WRMSR.  ``data``: EDX:EAX for WRMSR, 0 for RDMSR."""
    __slots__ = ()

    @property
    def instruction(self) -> str:
        return "WRMSR" if self.write else "RDMSR"


class HypercallExit(namedtuple("HypercallExit", "nr args flags")):
    __slots__ = ()

    @property
    def long_mode(self) -> bool:
        return bool(self.flags & lib.KVM_EXIT_HYPERCALL_LONG_MODE)


class FailEntryExit(namedtuple("FailEntryExit", "hardware_entry_failure_reason cpu")):
    __slots__ = ()


class InternalErrorExit(namedtuple("InternalErrorExit", "suberror data")):
    __slots__ = ()


class UnsupportedExit(namedtuple("UnsupportedExit", "reason")):
    """An exit reason kvmfilter does not service."""
    __slots__ = ()

    @property
    def name(self) -> str:
        return exit_name(self.reason)


class _Singleton:
    __slots__ = ()

    def __repr__(self) -> str:
        return type(self).__name__ + "()"


class HltExit(_Singleton):
    """KVM_EXIT_HLT."""


class ShutdownExit(_Singleton):
    """Triple fault (or another reason the CPU shut down)."""


class InterruptedExit(_Singleton):
    """KVM_RUN returned EINTR: a kick signal or immediate_exit."""


HLT = HltExit()
SHUTDOWN = ShutdownExit()
INTERRUPTED = InterruptedExit()


def decode(run):
    """Decode ``run`` (a ``struct kvm_run *``) into an exit record."""
    reason = run.exit_reason
    if reason == lib.KVM_EXIT_X86_WRMSR:
        m = run.msr
        return MsrExit(True, m.index, m.data, m.reason)
    if reason == lib.KVM_EXIT_X86_RDMSR:
        m = run.msr
        return MsrExit(False, m.index, 0, m.reason)
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

class MsrReply(namedtuple("MsrReply", "error data", defaults=(0,))):
    """error=True: KVM injects #GP(0) on the next KVM_RUN.  ``data``: RDMSR result."""
    __slots__ = ()


class IoInReply(namedtuple("IoInReply", "data")):
    """What an IN reads; bytes beyond ``data`` read as all-ones (an absent device)."""
    __slots__ = ()


class HypercallReply(namedtuple("HypercallReply", "ret")):
    """``ret`` becomes the guest's RAX; negative KVM_E* as two's complement."""
    __slots__ = ()


MSR_GP = MsrReply(True)


def apply(run, reply) -> None:
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
