"""L4: a VM in this process - memory, vCPU threads, the handler tables (from
which the MSR filter is built), and its run state.

Order (kvmtool's habit of declaring it): ``setup()`` creates the VM, RAM (with
dirty logging), the MSR filter and the vCPUs with their CPUID; then either
``boot(image)`` (the image-contract reset) or ``restore_vcpus(states)`` (a
snapshot); then ``start()``.  ``pause()``/``resume()``/``stop()`` change the
run state; ``close()`` releases every fd and mapping, after joining the vCPU
threads.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

from ..base import KvmfilterError, StrEnum, Unavailable
from ..kvm import abi
from ..kvm.cpuid import per_vcpu, pv_bits, vcpu_neutral, with_pv_features
from ..kvm.fastpath import FastValue, MsrRules, TransitionRing, VcpuFastPath
from ..kvm.kick import kick_signal
from ..kvm import vcpu_state
from ..kvm.msr_filter import READ, WRITE, MsrFilter
from .devices import Console, DebugExit, PortTable, CONSOLE_PORT, DEBUG_EXIT_PORT
from .dispatch import ERROR_REASONS, ExitHandlers, StopReason, StopRecord
from .image import LOAD_ADDRESS, reset_real_mode, validate_image
from .ram import GuestRam
from .vcpu_thread import AT_REST, RunControl, VcpuThread

log = logging.getLogger("kvmfilter.vm")

DEFAULT_MEMORY = 1 << 20
MIN_MEMORY = 1 << 20
MAX_MEMORY = 1 << 40
MAX_VCPUS = 64
DEFAULT_TIMEOUT = 10.0

# Capabilities every Machine needs, with why (kvmtool's one named table).
REQUIRED_CAPS = {
    abi.KVM_CAP_IMMEDIATE_EXIT: ("KVM_CAP_IMMEDIATE_EXIT",
                                 "to stop a vCPU that is about to enter the guest"),
}
MSR_CAPS = {
    abi.KVM_CAP_X86_USER_SPACE_MSR: ("KVM_CAP_X86_USER_SPACE_MSR",
                                     "to service MSR accesses in userspace"),
    abi.KVM_CAP_X86_MSR_FILTER: ("KVM_CAP_X86_MSR_FILTER",
                                 "to trap the MSRs kvmfilter implements"),
}


class MissingCapabilityError(Unavailable):
    """The host's KVM lacks a capability the machine needs."""


class StateError(KvmfilterError):
    """The machine is not in a state that allows the operation."""


class RunState(StrEnum):
    """A VM's run state, by QEMU's RunState names (query-status)."""
    PRELAUNCH = "prelaunch"            # created, not started
    INMIGRATE = "inmigrate"            # waiting for an incoming migration
    RUNNING = "running"
    PAUSED = "paused"                  # every vCPU parked
    FINISH_MIGRATE = "finish-migrate"  # parked for the last copy of a migration
    POSTMIGRATE = "postmigrate"        # parked; the state was saved or moved
    SHUTDOWN = "shutdown"              # the guest stopped (see the stop record)
    INTERNAL_ERROR = "internal-error"  # the VMM or KVM failed


RESUMABLE = frozenset({RunState.PAUSED, RunState.FINISH_MIGRATE, RunState.POSTMIGRATE})


def validate_memory(size: int) -> None:
    if size % 4096:
        raise ValueError(f"memory size {size} is not a multiple of 4 KiB")
    if not MIN_MEMORY <= size <= MAX_MEMORY:
        raise ValueError(f"memory size {size} outside {MIN_MEMORY} .. {MAX_MEMORY} bytes")


class RunResult:
    """What a run produced: the stop record, console text, exit counts by name."""

    def __init__(self, exit: StopRecord, console: str, console_dropped: int, exits: dict,
                 unhandled_ports: dict, elapsed_s: float):
        self.exit = exit
        self.console = console
        self.console_dropped = console_dropped
        self.exits = exits
        self.unhandled_ports = unhandled_ports
        self.elapsed_s = elapsed_s


class Machine:
    """A VM over /dev/kvm.  See the module docstring for the order of calls.

    Args:
        kvm: the ``Kvm`` (may be given later, before ``setup()``).
        memory_size, vcpus: guest RAM in bytes and the number of vCPUs.
        timeout: seconds ``wait()`` lets the VM run (None: no limit).
        pv_features: CPUID 0x40000001.EAX bits to advertise.
        fast_path: service no-change MSR accesses and console OUTs in C.
        hlt_parks: HLT waits for a wake-up (a daemon) instead of ending the vCPU.
        cpuid: the CPUID table to give the guest (a restore: the one it had),
            instead of KVM's supported table with ``pv_features`` added.
    """

    def __init__(self, kvm, *, memory_size: int = DEFAULT_MEMORY, vcpus: int = 1,
                 timeout: Optional[float] = DEFAULT_TIMEOUT, pv_features: int = 0,
                 fast_path: bool = True, hlt_parks: bool = False,
                 cpuid: Optional[list] = None):
        validate_memory(memory_size)
        if not 1 <= vcpus <= MAX_VCPUS:
            raise ValueError(f"vcpus must be 1..{MAX_VCPUS}, not {vcpus}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self.kvm = kvm
        self.memory_size = memory_size
        self.nvcpus = vcpus
        self.timeout = timeout
        self.pv_features = pv_features
        self.fast_path = fast_path
        self.msr_handlers: dict = {}
        self.hypercall_handlers: dict = {}
        self._hypercall_features: dict[int, int] = {}
        self.hypercall_exits: dict[int, str] = {}  # nr -> "enabled" or why not
        self.console = Console()
        self.ports = PortTable()
        self.ports.add(CONSOLE_PORT, self.console)
        self.ports.add(DEBUG_EXIT_PORT, DebugExit(self._debug_exit))
        self.msr_rules: Optional[MsrRules] = None  # the MSR served in C, if any
        self.control = RunControl(hlt_parks)
        self.handlers = ExitHandlers(self.msr_handlers, self.ports, self.hypercall_handlers,
                                     self.stop)
        self.vm = None
        self.ram: Optional[GuestRam] = None
        self.threads: list[VcpuThread] = []
        self.cpuid: list = cpuid or []
        self._cpuid_given = cpuid is not None
        self.state = RunState.PRELAUNCH
        self._stop: Optional[StopRecord] = None
        self._running = 0
        self._all_stopped = threading.Event()
        self._lifecycle = threading.Lock()  # one pause/resume/stop at a time
        self._started = 0.0
        self._vcpus_ready = False
        self._launched = False
        self._earned = 0  # CPUID PV bits whose hypercall exits KVM agreed to deliver

    # -- configuration ---------------------------------------------------------------

    def add_msr_handler(self, index: int, handler) -> None:
        """Serve MSR ``index`` with ``handler(vcpu, MsrExit) -> MsrReply``.

        A handler with ``reads``/``writes`` says which accesses it takes (the
        filter is derived from them).  One MSR may also be served in C: a
        handler with ``attach_fast_path(rules, holder)`` receives, at set-up,
        the ``MsrRules`` to publish its verdicts to and the ``FastValue`` that
        keeps the MSR's value and records its changes.
        """
        self._configurable()
        self.msr_handlers[index] = handler
        if self.fast_path and self.msr_rules is None and hasattr(handler, "attach_fast_path"):
            self.msr_rules = MsrRules(index)
            self._fast_handler = handler

    def add_hypercall_handler(self, nr: int, handler,
                              cpuid_feature_bit: Optional[int] = None) -> None:
        """Serve hypercall ``nr`` through KVM_CAP_EXIT_HYPERCALL.

        The CPUID PV feature bit, if given, is advertised only when KVM agreed to
        exit on this hypercall (enabled before any vCPU exists).
        """
        self._configurable()
        self.hypercall_handlers[nr] = handler
        if cpuid_feature_bit is not None:
            self._hypercall_features[nr] = cpuid_feature_bit

    def _configurable(self) -> None:
        if self.vm is not None:
            raise StateError("handlers must be registered before setup()")

    def msr_filter(self) -> MsrFilter:
        """The filter, derived from the handler table: one denying range per MSR."""
        return MsrFilter.deny_only({
            index: (READ if h.reads else 0) | (WRITE if h.writes else 0)
            for index, h in self.msr_handlers.items()
        })

    # -- set-up -----------------------------------------------------------------------

    def _check_caps(self, caps: dict) -> None:
        for cap, (name, why) in caps.items():
            if not self.kvm.check_extension(cap):
                raise MissingCapabilityError(f"KVM lacks {name}, needed {why}")

    def setup(self) -> None:
        """Create the VM, its RAM, the MSR filter and the vCPUs (idempotent)."""
        if self.vm is not None:
            return
        if self.kvm is None:
            raise StateError("the machine has no Kvm to create its VM with")
        self._check_caps(REQUIRED_CAPS)
        if self.msr_handlers:
            self._check_caps(MSR_CAPS)
        self.vm = vm = self.kvm.create_vm()
        self._earned = earned = self._enable_hypercall_exits(vm)
        if self._cpuid_given:
            cpuid = self.cpuid
            self._check_cpuid(cpuid)
        else:
            cpuid = vcpu_neutral(self.kvm.get_supported_cpuid())
            pv_features = self.pv_features | earned
            if pv_features:
                cpuid = with_pv_features(cpuid, pv_features)
        self.ram = GuestRam(vm, self.memory_size)
        if self.msr_handlers:
            # KVM ABI: api.rst: enable the FILTER exit reason before installing
            # a filter, or denied accesses #GP in the kernel.
            vm.enable_cap(abi.KVM_CAP_X86_USER_SPACE_MSR, abi.KVM_MSR_EXIT_REASON_FILTER)
            vm.set_msr_filter(self.msr_filter())
        console_port = self.ports.console_port() if self.fast_path else None
        rings: dict = {}
        for index in range(self.nvcpus):
            vcpu = vm.create_vcpu(index)
            ring = rings[index] = TransitionRing(index) if self.msr_rules else None
            fast = VcpuFastPath(self.msr_rules, console_port, ring) if self.fast_path else None
            self.threads.append(VcpuThread(vcpu, self.control, self.handlers, fast,
                                           self.console.append, self._vcpu_finished))
            vcpu.set_cpuid2(per_vcpu(cpuid, index, self.nvcpus))
        self.cpuid = cpuid
        if self.msr_rules is not None:
            self._fast_handler.attach_fast_path(self.msr_rules, FastValue(self.msr_rules, rings))

    def _check_cpuid(self, cpuid: list) -> None:
        missing = pv_bits(cpuid) & self._hypercall_feature_bits() & ~self._earned
        if missing:
            raise MissingCapabilityError(
                "the guest was offered a hypercall (CPUID 0x40000001 bits "
                f"{missing:#x}) whose exit this host's KVM does not deliver")

    def set_cpuid(self, cpuid: list) -> None:
        """Give every vCPU ``cpuid`` instead of the table set up with: a guest
        restored into a VM prepared before its configuration arrived.

        KVM ABI: api.rst, KVM_SET_CPUID2: CPUID may change until the vCPU
        first runs (afterwards KVM refuses all but the same table).
        """
        self.setup()
        if self.state is not RunState.PRELAUNCH or self._vcpus_ready:
            raise StateError("CPUID can be set only on a machine that has not run")
        self._check_cpuid(cpuid)
        for t in self.threads:
            t.vcpu.set_cpuid2(per_vcpu(cpuid, t.id, self.nvcpus))
        self.cpuid, self._cpuid_given = cpuid, True

    def _enable_hypercall_exits(self, vm) -> int:
        """Enable the hypercall exits KVM offers; return the CPUID bits earned."""
        if not self.hypercall_handlers:
            return 0
        offered = vm.check_extension(abi.KVM_CAP_EXIT_HYPERCALL)
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
        vm.enable_cap(abi.KVM_CAP_EXIT_HYPERCALL, mask)
        return sum(1 << bit for nr, bit in self._hypercall_features.items()
                   if mask & (1 << nr))

    def _hypercall_feature_bits(self) -> int:
        return sum(1 << bit for bit in self._hypercall_features.values())

    def boot(self, image: bytes) -> None:
        """Load ``image`` at 0x7C00 and reset every vCPU to the contract's registers."""
        validate_image(image)
        self.setup()
        self.ram.write(LOAD_ADDRESS, image)
        for t in self.threads:
            reset_real_mode(t.vcpu, t.id)
        self._vcpus_ready = True

    def restore_vcpus(self, states: list) -> None:
        """Give each vCPU the state ``capture_vcpus()`` returned (instead of ``boot``)."""
        self.setup()
        if self.state is not RunState.PRELAUNCH or self._vcpus_ready:
            raise StateError("vCPU state can be restored only into a new machine")
        if len(states) != len(self.threads):
            raise StateError(f"{len(states)} vCPU states for {len(self.threads)} vCPUs")
        for t, state in zip(self.threads, states):
            vcpu_state.restore(t.vcpu, state)
        self._vcpus_ready = True

    # -- the lifecycle ---------------------------------------------------------------

    def launch(self) -> None:
        """Create the vCPU threads ahead of ``start()``; they wait before their
        first KVM_RUN.  Starting is then a notification, not a thread creation
        (0.3-0.5 ms here): a restored VM launches while its state loads, so its
        guest resumes sooner.  Idempotent."""
        self.setup()
        kick_signal()  # install the handler before any thread can be kicked
        with self.control.cond:
            if self._launched:
                return
            self._launched = True
            self._running = len(self.threads)
        for t in self.threads:
            t.launch()

    def start(self) -> None:
        """Start the vCPUs (launching their threads if need be); returns at once."""
        with self._lifecycle:
            if self.state is not RunState.PRELAUNCH:
                raise StateError(f"a machine starts once (it is {self.state})")
            if not self._vcpus_ready:
                raise StateError("boot(image) or restore_vcpus(states) before start()")
            self.launch()
            self._started = time.monotonic()
            self.state = RunState.RUNNING
            for t in self.threads:
                t.start()
        # Logged when it starts, not when built: a VM built and discarded (a
        # failed incoming migration, a destination's warm-up) never ran.
        log.info("vm_created", extra={"vcpus": self.nvcpus, "memory": self.memory_size,
                                      "msrs": sorted(self.msr_handlers)})

    def run(self, image: Optional[bytes] = None) -> RunResult:
        """Boot ``image`` (if given), run until the VM stops or times out."""
        if image is not None:
            self.boot(image)
        self.start()
        return self.wait()

    def pause(self, timeout: float = 5.0, state: RunState = RunState.PAUSED) -> bool:
        """Park every vCPU; True once all are at rest (the state is then ``state``).

        False if they did not all park within ``timeout`` (a vCPU busy in a
        journal commit, say): then the machine is resumed and nothing changed.
        """
        with self._lifecycle:
            if self.state in RESUMABLE:
                self.state = state
                return True
            if self.state is not RunState.RUNNING:
                raise StateError(f"cannot pause a machine that is {self.state}")
            control = self.control
            with control.cond:
                control.park_requested = True
            for t in self.threads:
                t.kick()
            deadline = time.monotonic() + timeout
            with control.cond:
                while not all(t.state in AT_REST for t in self.threads):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        control.park_requested = False
                        control.cond.notify_all()
                        return False
                    control.cond.wait(left)
                if self._stop is None:
                    self.state = state
            return self._stop is None

    def resume(self) -> None:
        """Unpark every vCPU (from paused, finish-migrate or postmigrate)."""
        with self._lifecycle:
            if self.state is RunState.RUNNING:
                return
            if self.state not in RESUMABLE:
                raise StateError(f"cannot resume a machine that is {self.state}")
            self.state = RunState.RUNNING
            with self.control.cond:
                self.control.park_requested = False
                self.control.cond.notify_all()

    def set_state(self, state: RunState) -> None:
        """Relabel a parked machine (paused, finish-migrate, postmigrate)."""
        with self._lifecycle:
            if self.state not in RESUMABLE or state not in RESUMABLE:
                raise StateError(f"cannot go from {self.state} to {state}")
            self.state = state

    def wake_halted(self) -> None:
        """Wake vCPUs waiting in HLT (a daemon's guest, on the power button)."""
        self.control.wake_halted()

    def stop(self, record: StopRecord) -> None:
        """Stop the VM; the first reason given wins.  Safe from any thread."""
        control = self.control
        with control.cond:
            if self._stop is None:
                self._stop = record
                log.info("vm_stopping", extra={"reason": record.reason, "code": record.code,
                                               "detail": record.detail})
            control.stopping = True
            control.cond.notify_all()
        if not self.threads or self.state is RunState.PRELAUNCH:
            self._all_stopped.set()
        for t in self.threads:
            if t.thread is not threading.current_thread():
                t.kick()

    def _debug_exit(self, vcpu: int, code: int) -> None:
        self.stop(StopRecord(StopReason.DEBUG_EXIT, code, None, vcpu))

    def _vcpu_finished(self, t: VcpuThread) -> None:
        with self.control.cond:
            self._running -= 1
            last = self._running == 0
        if last:
            stop = self._stop or StopRecord(StopReason.HLT, 0)
            self.state = (RunState.INTERNAL_ERROR if stop.reason in ERROR_REASONS
                          else RunState.SHUTDOWN)
            self._all_stopped.set()

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
                    self.stop(StopRecord(StopReason.TIMEOUT, 1,
                                         f"the guest ran for more than {self.timeout:g} s"))
                    break
        except BaseException:
            self.stop(StopRecord(StopReason.INTERRUPTED, 1, "the VMM was interrupted"))
            self._join()
            raise
        self._join()
        return self.result()

    def _join(self) -> None:
        for t in self.threads:
            while t.thread.is_alive():
                t.kick()
                t.thread.join(0.05)

    def result(self) -> RunResult:
        exits_total: dict[str, int] = {}
        for t in self.threads:
            for name, n in t.exit_counts().items():
                exits_total[name] = exits_total.get(name, 0) + n
        return RunResult(self.stopped or StopRecord(StopReason.HLT, 0), self.console.text(),
                         self.console.dropped, exits_total, self.ports.unhandled(),
                         time.monotonic() - self._started if self._started else 0.0)

    @property
    def stopped(self) -> Optional[StopRecord]:
        """Why the VM stopped, or None while it runs (or is paused)."""
        if not self._all_stopped.is_set():
            return None
        return self._stop or StopRecord(StopReason.HLT, 0)

    def fast_paths(self) -> list:
        """Each vCPU's ``VcpuFastPath`` (empty without the fast path)."""
        return [(t.id, t.fast) for t in self.threads if t.fast is not None]

    # -- state ------------------------------------------------------------------------

    def capture_vcpus(self, msr_indices: list[int]) -> list:
        """Every vCPU's state; only with every vCPU at rest (paused), else StateError."""
        with self._lifecycle:
            if self.state not in RESUMABLE and self.state is not RunState.PRELAUNCH:
                raise StateError(f"vCPU state is captured only from a paused machine "
                                 f"(it is {self.state})")
            return [vcpu_state.capture(t.vcpu, msr_indices, self.kvm) for t in self.threads]

    # -- teardown ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop and join any vCPU thread still running, then release everything."""
        if any(t.thread.is_alive() for t in self.threads):
            if self.state is RunState.PRELAUNCH:  # launched, never started: no guest ran
                with self.control.cond:
                    self.control.stopping = True
                    self.control.cond.notify_all()
            else:
                self.stop(StopRecord(StopReason.INTERRUPTED, 1,
                                     "the machine was closed while running"))
            self._join()
        for t in self.threads:
            t.vcpu.close()
        self.threads = []
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.ram is not None:
            self.ram.close()
            self.ram = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
