"""L4: one kvmfilter VM - the machine wired to the migration-control policy,
the page map, the journal and the power button - and its lifecycle API.

Shared by ``kvmfilter run``, ``kvmfilter serve``, snapshots, migration and the
benchmarks, so every path services the MSR the same way.  Code outside
``kvmfilter.vm`` uses this class, never the ``Machine`` inside it:

    vmm = Vmm(kvm, RunOptions(...))      # or vm.state.restore(...)
    vmm.start(); vmm.pause(); vmm.resume(); vmm.stop(); vmm.wait()
    vmm.status, vmm.stop_record, vmm.blocked_reasons(), vmm.report()
"""
from __future__ import annotations

import logging
import uuid
from typing import Optional

from ..base import BadInput
from ..kvm import abi
from ..policy.gate import EncryptionStatus, blocked_reasons
from ..policy.pagemap import PageMap
from ..policy.readiness import MSR_KVM_MIGRATION_CONTROL, MigrationControl
from .devices import POWER_BUTTON_PORT, PowerButton
from .dispatch import StopReason, StopRecord
from .handlers import MapGpaRange, MigrationControlMsr
from .image import load_image
from .machine import DEFAULT_MEMORY, DEFAULT_TIMEOUT, Machine, RunResult, RunState

log = logging.getLogger("kvmfilter.vm")

# Above this, KVM's own per-page tracking for the memory slot costs noticeable
# host kernel memory (vmalloc) even when the guest touches nothing.
LARGE_MEMORY = 256 << 30


class RunOptions:
    """What `kvmfilter run`/`serve` configure (their options, by the same names)."""

    FIELDS = ("image", "memory", "vcpus", "timeout", "migration_control", "map_gpa_range",
              "plain_memory", "journal", "name", "fast_path", "hlt_parks")

    def __init__(self, image: Optional[str] = None, memory: int = DEFAULT_MEMORY,
                 vcpus: int = 1, timeout: Optional[float] = DEFAULT_TIMEOUT,
                 migration_control: bool = True, map_gpa_range: bool = True,
                 plain_memory: bool = False, journal: Optional[str] = None,
                 name: str = "vm", fast_path: bool = True, hlt_parks: bool = False):
        self.image = image  # a path or bundled:NAME; None = the bundled conformance guest
        self.memory = memory
        self.vcpus = vcpus
        self.timeout = timeout  # None: run until the guest stops
        self.migration_control = migration_control
        self.map_gpa_range = map_gpa_range
        self.plain_memory = plain_memory
        self.journal = journal
        self.name = name
        self.fast_path = fast_path  # the C MSR fast path; off only to measure it
        self.hlt_parks = hlt_parks  # HLT waits for the power button (a daemon's guest)

    def to_json(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}

    def __repr__(self) -> str:
        return f"RunOptions({self.to_json()!r})"


class Vmm:
    """One kvmfilter VM: build it, ``start()``/``run()`` it, ``report()`` on it, ``close()``.

    Args:
        kvm: the ``Kvm`` (may be given later, to ``start()`` or ``run()``).
        options: ``RunOptions``.
        image, label: the image bytes and report label (default: load
            ``options.image``).  ``image=False``: no image (a restore).
        cpuid: the CPUID table the guest had (a restore).
        origin, source, parent: how this VM instance began - "boot", or
            "restore"/"incoming" from ``source`` (a URI), continuing the VM
            instance ``parent`` (its run id); recorded in the journal.

    Raises (from the constructor):
        ImageError, ValueError: bad image or options.
        JournalError: the journal cannot be opened.
    """

    def __init__(self, kvm, options: RunOptions, image=None, label: Optional[str] = None,
                 cpuid: Optional[list] = None, origin: str = "boot",
                 source: Optional[str] = None, parent: Optional[str] = None):
        self.options = options
        if image is None:
            image, label = load_image(options.image)
        self.image = image or None
        self.label = label or "<bytes>"
        self.run_id = uuid.uuid4().hex  # this VM instance (a restore is a new one)
        self.origin, self.source, self.parent = origin, source, parent
        self.restored = False
        self.control = MigrationControl(advertised=options.migration_control,
                                        encrypted_memory=not options.plain_memory)
        self.page_map = PageMap(tracking=not options.plain_memory)
        if options.memory > LARGE_MEMORY:
            log.warning("large_guest_memory", extra={
                "memory": options.memory,
                "note": "KVM's per-page tracking of this slot costs host kernel memory "
                        "in proportion to its size, even if the guest touches none of it"})
        self.machine = machine = Machine(
            kvm, memory_size=options.memory, vcpus=options.vcpus, timeout=options.timeout,
            fast_path=options.fast_path, hlt_parks=options.hlt_parks, cpuid=cpuid,
            pv_features=(1 << abi.KVM_FEATURE_MIGRATION_CONTROL)
            if options.migration_control else 0)
        # The MSR is trapped even when not advertised: the guest then gets #GP
        # from the policy, not whatever KVM would do with an unknown MSR.
        machine.add_msr_handler(MSR_KVM_MIGRATION_CONTROL, MigrationControlMsr(self.control))
        self.control.add_count_source(MigrationControlMsr.fast_counts(machine.fast_paths))
        if options.map_gpa_range:
            machine.add_hypercall_handler(abi.KVM_HC_MAP_GPA_RANGE,
                                          MapGpaRange(self.page_map, options.memory),
                                          cpuid_feature_bit=abi.KVM_FEATURE_HC_MAP_GPA_RANGE)
        self.power_button = PowerButton(on_press=machine.wake_halted)
        machine.ports.add(POWER_BUTTON_PORT, self.power_button)
        self.result: Optional[RunResult] = None
        # Last, so a bad option above leaves nothing open.  Still before any
        # guest runs: an unusable journal is refused up front.
        self.journal = None
        if options.journal:
            self.open_journal(options.journal)

    def open_journal(self, path: str) -> None:
        """Record every transition in the journal at ``path`` (before any guest
        runs: at construction, or once a prepared VM knows its parent run).

        Raises:
            JournalError: the journal cannot be opened.
        """
        from ..policy.journal import ReadinessJournal  # sqlite3 costs start-up time
        self.journal = ReadinessJournal(path, self.options.name, run=self.run_id,
                                        origin=self.origin, source=self.source,
                                        parent=self.parent)
        self.options.journal = path
        self.control.add_recorder(self.journal.record)

    # -- the lifecycle ------------------------------------------------------------

    def start(self, kvm=None) -> None:
        """Boot the image (unless the vCPUs were restored) and start the vCPUs."""
        machine = self.machine
        if kvm is not None:
            machine.kvm = kvm
        if self.image is not None:
            machine.boot(self.image)
        machine.start()

    def run(self, kvm=None) -> RunResult:
        """Run the VM to its end (or its timeout)."""
        self.start(kvm)
        return self.wait()

    def wait(self) -> RunResult:
        """Until the VM stops.  Interrupted (Ctrl-C): the vCPUs are stopped and
        joined, ``result`` holds the partial run, and the interruption goes on."""
        try:
            self.result = self.machine.wait()
        except KeyboardInterrupt:
            self.result = self.machine.result()
            raise
        return self.result

    def prepare(self, kvm=None) -> list:
        """Set the VM up and boot the image, but start no thread: the vCPUs
        (``kvm.ioctls.Vcpu``) for a caller that drives KVM_RUN itself (the
        benchmarks' C baseline)."""
        machine = self.machine
        if kvm is not None:
            machine.kvm = kvm
        machine.boot(self.image)
        return [t.vcpu for t in machine.threads]

    def pause(self, timeout: float = 5.0, state: RunState = RunState.PAUSED) -> bool:
        """Park every vCPU (the access in flight completes); False if they did not
        all park within ``timeout`` (the VM then runs on, unchanged)."""
        return self.machine.pause(timeout, state)

    def resume(self) -> None:
        self.machine.resume()

    def set_state(self, state: RunState) -> None:
        self.machine.set_state(state)

    def stop(self, reason: str = StopReason.QUIT, detail: Optional[str] = None,
             code: int = 0) -> None:
        """Stop the VM (the first reason given wins); ``wait()`` joins it."""
        self.machine.stop(StopRecord(reason, code, detail))

    def request_powerdown(self) -> None:
        """Press the power button: the guest reads 1 from port 0xF5 from now on."""
        self.power_button.press()

    @property
    def status(self) -> RunState:
        return self.machine.state

    @property
    def stop_record(self) -> Optional[StopRecord]:
        """Why the guest stopped; None while it runs or is paused."""
        return self.machine.stopped

    @property
    def started(self) -> bool:
        return self.machine.state is not RunState.PRELAUNCH

    @property
    def ram(self):
        """The guest RAM (``vm.ram.GuestRam``), once the VM is set up."""
        return self.machine.ram

    # -- the migration gate ----------------------------------------------------------

    @property
    def encryption_status(self) -> tuple[EncryptionStatus, str]:
        """Can this VM learn the guest's page encryption status, and why not."""
        if not self.control.encrypted_memory:
            return EncryptionStatus.NOT_NEEDED, ""
        if not self.options.map_gpa_range:
            return EncryptionStatus.DISABLED, ""
        status = self.machine.hypercall_exits.get(abi.KVM_HC_MAP_GPA_RANGE)
        if status is None or status == "enabled":
            return EncryptionStatus.ENABLED, ""
        return EncryptionStatus.UNAVAILABLE, status

    def blockers(self) -> list:
        """Every reason the guest may not be moved now (``policy.gate.Blocker``)."""
        status, detail = self.encryption_status
        return blocked_reasons(self.control, self.page_map, status, detail)

    def blocked_reasons(self) -> list[str]:
        """The migration gate: empty exactly when the guest may be migrated now."""
        return [b.text for b in self.blockers()]

    # -- reporting ----------------------------------------------------------------------

    def report(self) -> dict:
        """The run report (docs/contracts.md); fields are only ever added."""
        from .report import build_report
        if self.result is None:
            raise BadInput("no run to report on")
        return build_report(self, self.result)

    def close(self) -> None:
        self.machine.close()
        if self.journal is not None:
            self.journal.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
