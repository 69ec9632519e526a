"""L4: a real-mode VM - guest RAM, vCPU threads, port devices, the MSR handler
table (from which the MSR filter is built), stop and timeout.

The guest-image contract (design.md): a flat binary loaded at 0x7C00, run in
16-bit real mode with CS=DS=ES=SS=0, IP=SP=0x7C00, EFLAGS=0x2, general registers
0 except SI = the vCPU index.  Port 0xE9 is the console, an OUT to 0xF4 stops
the VM with that code, HLT stops a vCPU.  Extension: CPUID.01H:EBX[31:24] is the
vCPU index and EBX[23:16] the number of vCPUs, as on real hardware.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

from . import exits
from ._kvm import lib
from .cpuid import CpuidEntry, with_pv_features
from .exits import (HltExit, HypercallExit, InterruptedExit, IoExit, MsrExit, MsrReply,
                    ShutdownExit, apply, decode)
from .kvm import GuestMemory, Kvm, KvmError, Vcpu, Vm
from .msr_filter import READ, WRITE, MsrFilter

log = logging.getLogger("kvmfilter.machine")

LOAD_ADDRESS = 0x7C00
IMAGE_LIMIT = 0xA0000  # the image must end below the legacy video hole
MAX_IMAGE_SIZE = IMAGE_LIMIT - LOAD_ADDRESS
DEFAULT_MEMORY = 1 << 20
MIN_MEMORY = 1 << 20
MAX_MEMORY = 1 << 40
MAX_VCPUS = 64
DEFAULT_TIMEOUT = 10.0
CONSOLE_PORT = 0xE9
DEBUG_EXIT_PORT = 0xF4
CONSOLE_LIMIT = 1 << 20  # bytes kept; the rest is counted as dropped
PORTS_LOGGED = 8  # distinct unknown ports logged; every access is still counted

# Capabilities every Machine needs, with why (kvmtool's one named table).
REQUIRED_CAPS = {
    lib.KVM_CAP_IMMEDIATE_EXIT: ("KVM_CAP_IMMEDIATE_EXIT",
                                 "to stop a vCPU that is about to enter the guest"),
}
MSR_CAPS = {
    lib.KVM_CAP_X86_USER_SPACE_MSR: ("KVM_CAP_X86_USER_SPACE_MSR",
                                     "to service MSR accesses in userspace"),
    lib.KVM_CAP_X86_MSR_FILTER: ("KVM_CAP_X86_MSR_FILTER",
                                 "to trap the MSRs kvmfilter implements"),
}


class ImageError(ValueError):
    """The guest image breaks the image contract."""


class MissingCapabilityError(RuntimeError):
    """The host's KVM lacks a capability the machine needs."""


class MsrHandler(Protocol):
    """Serves one MSR.  ``reads``/``writes`` say which accesses it takes."""

    reads: bool
    writes: bool

    def __call__(self, vcpu: int, op: str, data: int) -> MsrReply: ...


PortHandler = Callable[[int, IoExit], Optional[bytes]]


@dataclass
class StopRecord:
    """Why the VM stopped (the run report's ``exit``)."""
    reason: str
    code: int = 0
    detail: Optional[str] = None
    vcpu: Optional[int] = None


@dataclass
class RunResult:
    exit: StopRecord
    console: str
    console_dropped: int
    exits: dict
    unhandled_ports: dict
    vcpu_exits: list = field(default_factory=list)
    elapsed_s: float = 0.0


def validate_image(image: bytes) -> None:
    if not image:
        raise ImageError("the image is empty")
    if len(image) > MAX_IMAGE_SIZE:
        raise ImageError(f"the image is {len(image)} bytes; at most {MAX_IMAGE_SIZE} "
                         f"fit between {LOAD_ADDRESS:#x} and {IMAGE_LIMIT:#x}")


def validate_memory(size: int) -> None:
    if size % 4096:
        raise ValueError(f"memory size {size} is not a multiple of 4 KiB")
    if not MIN_MEMORY <= size <= MAX_MEMORY:
        raise ValueError(f"memory size {size} outside {MIN_MEMORY} .. {MAX_MEMORY} bytes")


_kick_signal: Optional[int] = None
_kick_lock = threading.Lock()


def _kick_signal_number() -> int:
    global _kick_signal
    with _kick_lock:
        if _kick_signal is None:
            sig = lib.kvmf_install_kick_handler()
            if sig < 0:
                raise KvmError(-sig, "sigaction (vCPU kick signal)")
            _kick_signal = sig
        return _kick_signal


class _VcpuThread:
    """A vCPU and the thread that runs it; ``kick()`` gets it out of KVM_RUN."""

    def __init__(self, machine: "Machine", vcpu: Vcpu):
        self.machine = machine
        self.vcpu = vcpu
        self.exits: dict = {}
        self.halted = False
        self._alive = False
        self._alive_lock = threading.Lock()
        self.thread = threading.Thread(target=self._main, name=f"vcpu{vcpu.id}", daemon=True)

    def start(self) -> None:
        self._alive = True
        self.thread.start()

    def kick(self) -> None:
        # KVM ABI: api.rst, immediate_exit: set before the signal, so a vCPU
        # that is between KVM_RUNs returns EINTR on its next entry instead of
        # missing the signal.
        self.vcpu.run_page.immediate_exit = 1
        with self._alive_lock:
            if self._alive and self.thread.ident is not None:
                signal.pthread_kill(self.thread.ident, _kick_signal_number())

    def _main(self) -> None:
        try:
            self.machine._vcpu_loop(self)
        except Exception as exc:  # a bug must stop the VM, not vanish with the thread
            log.exception("vcpu_thread_failed", extra={"vcpu": self.vcpu.id})
            self.machine.stop(StopRecord("internal_error", 1,
                                         f"vCPU {self.vcpu.id}: {type(exc).__name__}: {exc}",
                                         self.vcpu.id))
        finally:
            with self._alive_lock:
                self._alive = False
            self.machine._vcpu_finished()


class Machine:
    """A real-mode VM over /dev/kvm.

    Register MSR and port handlers, then ``run()`` once.  ``close()`` (or the
    context manager) releases every fd and mapping.
    """

    def __init__(self, kvm: Kvm, image: bytes, *, memory_size: int = DEFAULT_MEMORY,
                 vcpus: int = 1, timeout: float = DEFAULT_TIMEOUT,
                 pv_features: int = 0, before_first_run: Callable[[Vm], None] | None = None):
        validate_image(image)
        validate_memory(memory_size)
        if not 1 <= vcpus <= MAX_VCPUS:
            raise ValueError(f"vcpus must be 1..{MAX_VCPUS}, not {vcpus}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self.kvm = kvm
        self.image = image
        self.memory_size = memory_size
        self.nvcpus = vcpus
        self.timeout = timeout
        self.pv_features = pv_features
        self._before_first_run = before_first_run
        self.msr_handlers: dict[int, MsrHandler] = {}
        self.port_handlers: dict[int, PortHandler] = {
            CONSOLE_PORT: self._console_out,
            DEBUG_EXIT_PORT: self._debug_exit,
        }
        self.vm: Vm | None = None
        self.memory: GuestMemory | None = None
        self._threads: list[_VcpuThread] = []
        self._console = bytearray()
        self._console_dropped = 0
        self._console_lock = threading.Lock()
        self._unhandled_ports: dict[int, int] = {}
        self._ports_lock = threading.Lock()
        self._stop: StopRecord | None = None
        self._stop_lock = threading.Lock()
        self._running = 0
        self._all_stopped = threading.Event()
        self._ran = False

    # -- configuration -------------------------------------------------------

    def add_msr_handler(self, index: int, handler: MsrHandler) -> None:
        if self._ran:
            raise RuntimeError("handlers must be registered before run()")
        self.msr_handlers[index] = handler

    def add_port_handler(self, port: int, handler: PortHandler) -> None:
        if self._ran:
            raise RuntimeError("handlers must be registered before run()")
        self.port_handlers[port] = handler

    def msr_filter(self) -> MsrFilter:
        """The filter, derived from the handler table: one denying range per MSR."""
        return MsrFilter.deny_only({
            index: (READ if h.reads else 0) | (WRITE if h.writes else 0)
            for index, h in self.msr_handlers.items()
        })

    # -- set-up ---------------------------------------------------------------

    def _check_caps(self, caps: dict) -> None:
        for cap, (name, why) in caps.items():
            if not self.kvm.check_extension(cap):
                raise MissingCapabilityError(f"KVM lacks {name}, needed {why}")

    def _setup(self) -> None:
        self._check_caps(REQUIRED_CAPS)
        if self.msr_handlers:
            self._check_caps(MSR_CAPS)
        cpuid = self.kvm.get_supported_cpuid()
        if self.pv_features:
            cpuid = with_pv_features(cpuid, self.pv_features)
        self.vm = vm = self.kvm.create_vm()
        self.memory = GuestMemory(self.memory_size)
        self.memory.write(LOAD_ADDRESS, self.image)
        vm.set_user_memory_region(0, 0, self.memory_size, self.memory.address)
        if self.msr_handlers:
            # KVM ABI: api.rst: enable the FILTER exit reason before installing
            # a filter, or denied accesses #GP in the kernel.
            vm.enable_cap(lib.KVM_CAP_X86_USER_SPACE_MSR, lib.KVM_MSR_EXIT_REASON_FILTER)
            vm.set_msr_filter(self.msr_filter())
        if self._before_first_run is not None:
            self._before_first_run(vm)
        for index in range(self.nvcpus):
            vcpu = vm.create_vcpu(index)
            self._threads.append(_VcpuThread(self, vcpu))
            vcpu.set_cpuid2(_per_vcpu_cpuid(cpuid, index, self.nvcpus))
            _reset_real_mode(vcpu, index)
        log.info("vm_created", extra={"vcpus": self.nvcpus, "memory": self.memory_size,
                                      "msrs": sorted(self.msr_handlers)})

    # -- running --------------------------------------------------------------

    def run(self) -> RunResult:
        """Run every vCPU until the VM stops or the timeout expires."""
        if self._ran:
            raise RuntimeError("a Machine runs once")
        self._ran = True
        self._setup()
        _kick_signal_number()
        started = time.monotonic()
        self._running = len(self._threads)
        for t in self._threads:
            t.start()
        if not self._all_stopped.wait(self.timeout):
            self.stop(StopRecord("timeout", 1, f"the guest ran for more than {self.timeout:g} s"))
        self._kick_all_until_stopped()
        elapsed = time.monotonic() - started
        exits_total: dict[str, int] = {}
        for t in self._threads:
            for name, n in t.exits.items():
                exits_total[name] = exits_total.get(name, 0) + n
        stop = self._stop or StopRecord("hlt", 0)
        with self._console_lock:
            console = self._console.decode("utf-8", "replace")
        return RunResult(stop, console, self._console_dropped, exits_total,
                         dict(sorted(self._unhandled_ports.items())),
                         [dict(t.exits) for t in self._threads], elapsed)

    def stop(self, record: StopRecord) -> None:
        """Stop the VM; the first reason given wins.  Safe from any thread."""
        with self._stop_lock:
            if self._stop is None:
                self._stop = record
                log.info("vm_stopping", extra={"reason": record.reason, "code": record.code,
                                               "detail": record.detail})
        self._all_stopped.set()
        for t in self._threads:
            if t.thread is not threading.current_thread():
                t.kick()

    def _kick_all_until_stopped(self) -> None:
        for t in self._threads:
            while t.thread.is_alive():
                t.kick()
                t.thread.join(0.05)

    def _vcpu_finished(self) -> None:
        with self._stop_lock:
            self._running -= 1
            if self._running == 0:
                self._all_stopped.set()

    def _vcpu_loop(self, vt: _VcpuThread) -> None:
        vcpu = vt.vcpu
        run = vcpu.run_page
        counts = vt.exits
        msr_handlers = self.msr_handlers
        while self._stop is None:
            vcpu.run()
            reason = run.exit_reason
            name = exits.EXIT_NAMES.get(reason) or exits.exit_name(reason)
            counts[name] = counts.get(name, 0) + 1
            ex = decode(run)
            kind = type(ex)
            if kind is MsrExit:
                handler = msr_handlers.get(ex.index)
                if handler is None:
                    self.stop(StopRecord("unhandled", 1,
                                         f"{ex.op} of MSR {ex.index:#x} exited to userspace "
                                         "but no handler is registered", vcpu.id))
                    return
                apply(run, handler(vcpu.id, ex.op, ex.data))
            elif kind is IoExit:
                self._io(vcpu.id, run, ex)
            elif kind is InterruptedExit:
                run.immediate_exit = 0
            elif kind is HltExit:
                vt.halted = True
                log.debug("vcpu_halted", extra={"vcpu": vcpu.id})
                return
            elif kind is ShutdownExit:
                self.stop(StopRecord("shutdown", 1, "triple fault: the vCPU shut down",
                                     vcpu.id))
                return
            elif kind is HypercallExit:
                self.stop(StopRecord("unhandled", 1, f"hypercall {ex.nr} with no handler",
                                     vcpu.id))
                return
            elif kind is exits.FailEntryExit:
                self.stop(StopRecord("fail_entry", 1,
                                     f"hardware entry failure reason "
                                     f"{ex.hardware_entry_failure_reason:#x} on CPU {ex.cpu}",
                                     vcpu.id))
                return
            elif kind is exits.InternalErrorExit:
                self.stop(StopRecord("internal_error", 1,
                                     f"KVM internal error, suberror {ex.suberror}, data "
                                     f"{[hex(d) for d in ex.data]}", vcpu.id))
                return
            else:
                self.stop(StopRecord("unhandled", 1, f"exit reason {ex.reason} "
                                     f"({ex.name}) is not serviced", vcpu.id))
                return

    def _io(self, vcpu_id: int, run, ex: IoExit) -> None:
        handler = self.port_handlers.get(ex.port)
        if handler is None:
            # Contract: other ports read all-ones, writes are dropped; each
            # access is counted; the first few ports are logged (a guest that
            # sweeps every port must not flood the log).
            with self._ports_lock:
                n = self._unhandled_ports.get(ex.port, 0)
                self._unhandled_ports[ex.port] = n + 1
                first = n == 0 and len(self._unhandled_ports) <= PORTS_LOGGED
            if first:
                log.warning("unhandled_port_access",
                            extra={"vcpu": vcpu_id, "port": ex.port,
                                   "direction": "out" if ex.is_out else "in",
                                   "more_not_logged": len(self._unhandled_ports) == PORTS_LOGGED})
            if not ex.is_out:
                apply(run, exits.IoInReply(b""))
            return
        data = handler(vcpu_id, ex)
        if not ex.is_out:
            apply(run, exits.IoInReply(data or b""))

    # -- built-in devices -----------------------------------------------------

    def _console_out(self, vcpu_id: int, ex: IoExit) -> None:
        if not ex.is_out:
            return b"\xff"
        with self._console_lock:
            room = CONSOLE_LIMIT - len(self._console)
            self._console += ex.data[:max(room, 0)]
            self._console_dropped += max(len(ex.data) - max(room, 0), 0)
        return None

    def _debug_exit(self, vcpu_id: int, ex: IoExit) -> None:
        if not ex.is_out:
            return b"\xff"
        code = int.from_bytes(ex.data[:ex.size], "little")
        self.stop(StopRecord("debug_exit", code, None, vcpu_id))
        return None

    # -- teardown -------------------------------------------------------------

    def close(self) -> None:
        for t in self._threads:
            t.vcpu.close()
        self._threads = []
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _per_vcpu_cpuid(cpuid: list[CpuidEntry], index: int, count: int) -> list[CpuidEntry]:
    """Leaf 1 EBX: [31:24] initial APIC ID = vCPU index, [23:16] logical CPU count."""
    out = []
    for e in cpuid:
        if e.function == 1:
            ebx = (e.ebx & 0x0000_FFFF) | (min(count, 255) << 16) | ((index & 0xFF) << 24)
            e = CpuidEntry(e.function, e.index, e.flags, e.eax, ebx, e.ecx, e.edx)
        out.append(e)
    return out


def _reset_real_mode(vcpu: Vcpu, index: int) -> None:
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        seg.base = 0
        seg.selector = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    for name in ("rax", "rbx", "rcx", "rdx", "rdi", "rbp", "r8", "r9", "r10", "r11",
                 "r12", "r13", "r14", "r15"):
        setattr(regs, name, 0)
    regs.rsi = index
    regs.rip = LOAD_ADDRESS
    regs.rsp = LOAD_ADDRESS
    regs.rflags = 0x2
    vcpu.set_regs(regs)
