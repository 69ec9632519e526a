"""L4: a real-mode VM - guest RAM, vCPU threads, port devices, the MSR handler
table (from which the MSR filter is built), stop and timeout.

The guest-image contract (design.md): a flat binary loaded at 0x7C00, run in
16-bit real mode with CS=DS=ES=SS=0, IP=SP=0x7C00, EFLAGS=0x2, general registers
0 except SI = the vCPU index.  Port 0xE9 is the console, an OUT to 0xF4 stops
the VM with that code, HLT stops a vCPU.  Extension: CPUID.01H:EBX[31:24] is the
vCPU index and EBX[23:16] the number of vCPUs, as on real hardware.  (kvmfilter's
VMM adds the power-button port 0xF5 on top: vmm.py.)
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections import namedtuple
from typing import TYPE_CHECKING

from . import exits
from ._kvm import ffi, lib
from .cpuid import CpuidEntry, with_pv_features
from .exits import (HltExit, HypercallExit, HypercallReply, InterruptedExit, IoExit,
                    MsrExit, MsrReply, ShutdownExit, apply, decode, exit_name)
from .kvm import GuestMemory, Kvm, KvmError, Vcpu, Vm
from .msr_filter import READ, WRITE, MsrFilter

if TYPE_CHECKING:
    from typing import Optional

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
CONSOLE_CHUNK = 4096  # console bytes a vCPU collects in C before Python takes them

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


class MsrHandler:
    """The interface of an MSR handler (documentation; any object with these works).

    Serves one MSR.  ``reads``/``writes`` say which accesses it takes.

    A handler may also take a fast path: ``attach_fast_path(fast)`` receives an
    ``MsrFastPath`` to publish its no-change verdicts to, and
    ``record_fast(vcpu, read_ok, read_gp, write_ok, write_gp)`` is told what
    the C loop serviced with them.
    """

    reads: bool
    writes: bool

    def __call__(self, vcpu: int, op: str, data: int) -> MsrReply: ...


class MsrFastPath:
    """Rules for one MSR that the C run loop applies without calling Python.

    See ``kvmf_run_fast`` in cstubs/kvm_source.c: reads, writes of the current
    value and writes rejected whatever the value are serviced in C; anything
    else (above all every write that changes the value) comes to the handler.
    """

    BUDGET = 4096  # fast exits between returns to Python (to drain the counts)

    def __init__(self, index: int):
        self.struct = ffi.new("struct kvmf_msr_fast *")
        self.struct.index = index

    def publish(self, value: int, read_gp: bool, write_all_gp: bool,
                write_gp_mask: int) -> None:
        """Install the rules and enable them (call with the handler's lock held)."""
        s = self.struct
        s.enabled = 0
        s.value = value
        s.read_gp = read_gp
        s.write_all_gp = write_all_gp
        s.write_gp_mask = write_gp_mask
        s.enabled = 1

    def set_value(self, value: int) -> None:
        self.struct.value = value

    @property
    def enabled(self) -> bool:
        return bool(self.struct.enabled)


# A port handler is called as handler(vcpu_index, IoExit) and returns the bytes
# an IN reads (None for OUT).  A hypercall handler is called as
# handler(vcpu_index, HypercallExit) and returns the guest's RAX: 0 or -KVM_E*.

# dispatch() outcomes
CONTINUE = "continue"
HALTED = "halted"
STOPPED = "stopped"


class StopRecord(namedtuple("StopRecord", "reason code detail vcpu", defaults=(0, None, None))):
    """Why the VM stopped (the run report's ``exit``)."""
    __slots__ = ()


class RunResult(namedtuple("RunResult", "exit console console_dropped exits unhandled_ports "
                                        "elapsed_s")):
    """What a run produced: the StopRecord, console text, exit counts by name."""
    __slots__ = ()


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


def kick_vcpu_thread(vcpu: Vcpu, thread_ident: int) -> None:
    """Get the thread running ``vcpu`` out of KVM_RUN, now or at its next entry.

    The thread must be alive (pthread_kill on a finished thread is undefined).
    """
    # KVM ABI: api.rst, immediate_exit: set before the signal, so a vCPU that
    # is between KVM_RUNs returns EINTR on its next entry instead of missing it.
    vcpu.run_page.immediate_exit = 1
    signal.pthread_kill(thread_ident, _kick_signal_number())


class _VcpuThread:
    """A vCPU and the thread that runs it; ``kick()`` gets it out of KVM_RUN."""

    def __init__(self, machine: "Machine", vcpu: Vcpu):
        self.machine = machine
        self.vcpu = vcpu
        self.exits: dict = {}
        self.parked = threading.Event()
        self._alive = False
        self._alive_lock = threading.Lock()
        self.thread = threading.Thread(target=self._main, name=f"vcpu{vcpu.id}", daemon=True)

    def start(self) -> None:
        self._alive = True
        self.thread.start()

    def kick(self) -> None:
        with self._alive_lock:
            if self._alive and self.thread.ident is not None:
                kick_vcpu_thread(self.vcpu, self.thread.ident)

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

    def __init__(self, kvm: Kvm | None, image: bytes, *, memory_size: int = DEFAULT_MEMORY,
                 vcpus: int = 1, timeout: Optional[float] = DEFAULT_TIMEOUT,
                 pv_features: int = 0, fast_path: bool = True, console_limit: int = CONSOLE_LIMIT):
        validate_image(image)
        validate_memory(memory_size)
        if not 1 <= vcpus <= MAX_VCPUS:
            raise ValueError(f"vcpus must be 1..{MAX_VCPUS}, not {vcpus}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self.kvm = kvm
        self.image = image
        self.memory_size = memory_size
        self.nvcpus = vcpus
        self.timeout = timeout
        self.pv_features = pv_features
        self.msr_handlers: dict[int, MsrHandler] = {}
        self.fast_path = fast_path
        self.console_limit = console_limit
        self._fast: tuple[MsrFastPath, MsrHandler] | None = None
        self.port_handlers: dict = {
            CONSOLE_PORT: self._console_out,
            DEBUG_EXIT_PORT: self._debug_exit,
        }
        self.hypercall_handlers: dict = {}
        self._hypercall_features: dict[int, int] = {}
        self.hypercall_exits: dict[int, str] = {}  # nr -> "enabled" or why not
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
        self._pause_requested = threading.Event()
        self._resume = threading.Condition()
        self._started = 0.0
        self._ran = False

    # -- configuration -------------------------------------------------------

    def add_msr_handler(self, index: int, handler: MsrHandler) -> None:
        if self._ran:
            raise RuntimeError("handlers must be registered before run()")
        self.msr_handlers[index] = handler
        # One MSR can have a C fast path (the loop takes one rule set).
        if self.fast_path and self._fast is None and hasattr(handler, "attach_fast_path"):
            fast = MsrFastPath(index)
            handler.attach_fast_path(fast)
            self._fast = (fast, handler)

    def add_port_handler(self, port: int, handler) -> None:
        if self._ran:
            raise RuntimeError("handlers must be registered before run()")
        self.port_handlers[port] = handler

    def add_hypercall_handler(self, nr: int, handler,
                              cpuid_feature_bit: int | None = None) -> None:
        """Serve hypercall ``nr`` through KVM_CAP_EXIT_HYPERCALL.

        The CPUID PV feature bit, if given, is advertised only when KVM agreed to
        exit on this hypercall (enabled before any vCPU exists).
        """
        if self._ran:
            raise RuntimeError("handlers must be registered before run()")
        self.hypercall_handlers[nr] = handler
        if cpuid_feature_bit is not None:
            self._hypercall_features[nr] = cpuid_feature_bit

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

    def setup(self) -> None:
        """Create the VM, its memory and vCPUs (start() does this if needed)."""
        if self.vm is not None:
            return
        self._check_caps(REQUIRED_CAPS)
        if self.msr_handlers:
            self._check_caps(MSR_CAPS)
        self.vm = vm = self.kvm.create_vm()
        pv_features = self.pv_features | self._enable_hypercall_exits(vm)
        cpuid = self.kvm.get_supported_cpuid()
        if pv_features:
            cpuid = with_pv_features(cpuid, pv_features)
        self.memory = GuestMemory(self.memory_size)
        self.memory.write(LOAD_ADDRESS, self.image)
        vm.set_user_memory_region(0, 0, self.memory_size, self.memory.address)
        if self.msr_handlers:
            # KVM ABI: api.rst: enable the FILTER exit reason before installing
            # a filter, or denied accesses #GP in the kernel.
            vm.enable_cap(lib.KVM_CAP_X86_USER_SPACE_MSR, lib.KVM_MSR_EXIT_REASON_FILTER)
            vm.set_msr_filter(self.msr_filter())
        for index in range(self.nvcpus):
            vcpu = vm.create_vcpu(index)
            self._threads.append(_VcpuThread(self, vcpu))
            vcpu.set_cpuid2(_per_vcpu_cpuid(cpuid, index, self.nvcpus))
            reset_real_mode(vcpu, index)
        log.info("vm_created", extra={"vcpus": self.nvcpus, "memory": self.memory_size,
                                      "msrs": sorted(self.msr_handlers)})

    def _enable_hypercall_exits(self, vm: Vm) -> int:
        """Enable the hypercall exits KVM offers; return the CPUID bits earned."""
        if not self.hypercall_handlers:
            return 0
        offered = vm.check_extension(lib.KVM_CAP_EXIT_HYPERCALL)
        mask = 0
        for nr in self.hypercall_handlers:
            if offered & (1 << nr):
                mask |= 1 << nr
                self.hypercall_exits[nr] = "enabled"
            else:
                self.hypercall_exits[nr] = ("KVM does not offer KVM_CAP_EXIT_HYPERCALL "
                                            f"for hypercall {nr} (mask {offered:#x})")
        if not mask:
            return 0
        # KVM ABI: api.rst, KVM_CAP_EXIT_HYPERCALL: enable before advertising the
        # PV feature that lets the guest use the hypercall.
        vm.enable_cap(lib.KVM_CAP_EXIT_HYPERCALL, mask)
        return sum(1 << bit for nr, bit in self._hypercall_features.items()
                   if mask & (1 << nr))

    # -- running --------------------------------------------------------------

    def run(self) -> RunResult:
        """Run every vCPU until the VM stops or the timeout expires."""
        self.start()
        return self.wait()

    def start(self) -> None:
        """Set the VM up and start its vCPU threads; returns at once."""
        if self._ran:
            raise RuntimeError("a Machine runs once")
        if self.kvm is None:
            raise RuntimeError("Machine.run() needs a Kvm")
        self._ran = True
        self.setup()
        _kick_signal_number()
        self._started = time.monotonic()
        self._running = len(self._threads)
        for t in self._threads:
            t.start()

    def wait(self) -> RunResult:
        """Block until the VM stops (or the timeout stops it); the result.

        Interrupted (Ctrl-C, any exception): the vCPUs are stopped and joined
        before it propagates, so nothing is unmapped under a running vCPU.
        """
        deadline = None if self.timeout is None else self._started + self.timeout
        try:
            while not self._all_stopped.wait(0.5 if deadline is None
                                             else max(0.0, deadline - time.monotonic())):
                if deadline is not None and time.monotonic() >= deadline:
                    self.stop(StopRecord("timeout", 1,
                                         f"the guest ran for more than {self.timeout:g} s"))
                    break
        except BaseException:
            self.stop(StopRecord("interrupted", 1, "the VMM was interrupted"))
            self._kick_all_until_stopped()
            raise
        self._kick_all_until_stopped()
        return self.result()

    def result(self) -> RunResult:
        exits_total: dict[str, int] = {}
        for t in self._threads:
            for name, n in list(t.exits.items()):
                exits_total[name] = exits_total.get(name, 0) + n
        stop = self._stop or StopRecord("hlt", 0)
        with self._console_lock:
            console = self._console.decode("utf-8", "replace")
        return RunResult(stop, console, self._console_dropped, exits_total,
                         dict(sorted(self._unhandled_ports.items())),
                         time.monotonic() - self._started)

    @property
    def stopped(self) -> Optional[StopRecord]:
        """Why the VM stopped, or None while it runs (or is paused)."""
        if not self._all_stopped.is_set():
            return None
        return self._stop or StopRecord("hlt", 0)

    @property
    def vcpus(self) -> list[Vcpu]:
        return [t.vcpu for t in self._threads]

    def pause(self, timeout: float = 5.0) -> bool:
        """Park every vCPU outside the guest; True once all are parked.

        A parked vCPU has re-entered KVM_RUN once with immediate_exit=1, which
        completes any MSR or port access it was servicing without running
        another guest instruction: nothing is left half-done.
        """
        self._pause_requested.set()
        for t in self._threads:
            t.kick()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            while t.thread.is_alive() and not t.parked.is_set():
                if time.monotonic() > deadline:
                    return False
                t.kick()
                t.parked.wait(0.01)
        return True

    def resume(self) -> None:
        self._pause_requested.clear()
        with self._resume:
            self._resume.notify_all()

    def stop(self, record: StopRecord) -> None:
        """Stop the VM; the first reason given wins.  Safe from any thread."""
        with self._stop_lock:
            if self._stop is None:
                self._stop = record
                log.info("vm_stopping", extra={"reason": record.reason, "code": record.code,
                                               "detail": record.detail})
        self._all_stopped.set()
        with self._resume:
            self._resume.notify_all()
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
        dispatch = self.dispatch
        if self.fast_path:
            # The C loop: the MSR fast path (when a handler offers one; else a
            # disabled rule set) and the console port's OUTs.
            fast, handler = self._fast or (MsrFastPath(0), None)
            fast_struct = fast.struct
            fast_counts = ffi.new("struct kvmf_fast_counts *")
            console_buffer = ffi.new("char[]", CONSOLE_CHUNK)
            console = ffi.new("struct kvmf_console *", {
                "port": CONSOLE_PORT, "capacity": CONSOLE_CHUNK, "buffer": console_buffer})
        while self._stop is None:
            if self._pause_requested.is_set():
                self._park(vt)
                continue
            if not self.fast_path:
                vcpu.run()
            else:
                pending = vcpu.run_fast(fast_struct, fast_counts, console, MsrFastPath.BUDGET)
                if console.length:  # first: a pending console exit prints after these
                    self._console_append(ffi.buffer(console_buffer, console.length)[:])
                    counts["io"] = counts.get("io", 0) + console.exits
                    console.length = console.exits = 0
                c = fast_counts
                if c.read_ok or c.read_gp or c.write_ok or c.write_gp:
                    reads, writes = c.read_ok + c.read_gp, c.write_ok + c.write_gp
                    handler.record_fast(vcpu.id, c.read_ok, c.read_gp, c.write_ok, c.write_gp)
                    counts["x86_rdmsr"] = counts.get("x86_rdmsr", 0) + reads
                    counts["x86_wrmsr"] = counts.get("x86_wrmsr", 0) + writes
                    c.read_ok = c.read_gp = c.write_ok = c.write_gp = 0
                if not pending:
                    continue
            name = exit_name(run.exit_reason)
            counts[name] = counts.get(name, 0) + 1
            outcome = dispatch(vcpu.id, run)
            if outcome is not CONTINUE:
                return

    def _park(self, vt: _VcpuThread) -> None:
        run = vt.vcpu.run_page
        # KVM ABI: kvm-abi.md section 2: an access completes only inside the
        # next KVM_RUN; with immediate_exit=1 that KVM_RUN completes it and
        # returns EINTR before any guest instruction runs.
        run.immediate_exit = 1
        vt.vcpu.run()
        vt.parked.set()
        with self._resume:
            while self._pause_requested.is_set() and self._stop is None:
                self._resume.wait(0.1)
        vt.parked.clear()
        run.immediate_exit = 0

    def dispatch(self, vcpu_id: int, run) -> str:
        """Service the exit in ``run`` (any run page, also a hand-filled one).

        Returns CONTINUE (re-enter the guest), HALTED (this vCPU is done) or
        STOPPED (the VM is stopping; ``self.stop`` has the reason).
        """
        ex = decode(run)
        kind = type(ex)
        if kind is MsrExit:
            handler = self.msr_handlers.get(ex.index)
            if handler is None:
                self.stop(StopRecord("unhandled", 1,
                                     f"{ex.op} of MSR {ex.index:#x} exited to userspace "
                                     "but no handler is registered", vcpu_id))
                return STOPPED
            apply(run, handler(vcpu_id, ex.op, ex.data))
            return CONTINUE
        if kind is IoExit:
            self._io(vcpu_id, run, ex)
            return CONTINUE
        if kind is InterruptedExit:
            run.immediate_exit = 0
            return CONTINUE if self._stop is None else STOPPED
        if kind is HltExit:
            log.debug("vcpu_halted", extra={"vcpu": vcpu_id})
            return HALTED
        if kind is HypercallExit:
            handler = self.hypercall_handlers.get(ex.nr)
            # KVM ABI: linux/kvm_para.h: an unknown hypercall returns -KVM_ENOSYS.
            ret = -lib.KVM_ENOSYS if handler is None else handler(vcpu_id, ex)
            apply(run, HypercallReply(ret))
            return CONTINUE
        if kind is ShutdownExit:
            record = StopRecord("shutdown", 1, "triple fault: the vCPU shut down", vcpu_id)
        elif kind is exits.FailEntryExit:
            record = StopRecord("fail_entry", 1, "hardware entry failure reason "
                                f"{ex.hardware_entry_failure_reason:#x} on CPU {ex.cpu}",
                                vcpu_id)
        elif kind is exits.InternalErrorExit:
            record = StopRecord("internal_error", 1, f"KVM internal error, suberror "
                                f"{ex.suberror}, data {[hex(d) for d in ex.data]}", vcpu_id)
        else:
            record = StopRecord("unhandled", 1, f"exit reason {ex.reason} ({ex.name}) "
                                "is not serviced", vcpu_id)
        self.stop(record)
        return STOPPED

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
        self._console_append(ex.data)
        return None

    def _console_append(self, data: bytes) -> None:
        with self._console_lock:
            room = max(self.console_limit - len(self._console), 0)
            self._console += data[:room]
            self._console_dropped += max(len(data) - room, 0)

    def _debug_exit(self, vcpu_id: int, ex: IoExit) -> None:
        if not ex.is_out:
            return b"\xff"
        code = int.from_bytes(ex.data[:ex.size], "little")
        self.stop(StopRecord("debug_exit", code, None, vcpu_id))
        return None

    # -- teardown -------------------------------------------------------------

    def close(self) -> None:
        """Stop and join any vCPU thread still running, then release everything."""
        if any(t.thread.is_alive() for t in self._threads):
            self.stop(StopRecord("interrupted", 1, "the machine was closed while running"))
            self._kick_all_until_stopped()
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


def reset_real_mode(vcpu: Vcpu, index: int) -> None:
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
