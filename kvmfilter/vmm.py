"""L4: a kvmfilter VM - the Machine wired to the migration-control policy, the
page map, the journal - and the run report (design.md).

Shared by ``kvmfilter run``, ``kvmfilter serve`` and the benchmarks, so every
path services the MSR the same way.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from typing import TYPE_CHECKING

from ._kvm import lib
from .exits import MSR_GP, HypercallExit, MsrReply
from .kvm import Kvm
from .machine import (DEFAULT_MEMORY, DEFAULT_TIMEOUT, MAX_IMAGE_SIZE, ImageError, Machine,
                      RunResult, validate_image)
from .migration import (ACCESS_LOG_LIMIT, GP, MSR_KVM_MIGRATION_CONTROL, OK, RDMSR, WRMSR,
                        MigrationControl)
from .pagemap import PageMap

if TYPE_CHECKING:
    from typing import Optional

log = logging.getLogger("kvmfilter.vmm")

BUNDLED_GUESTS = ("conformance", "hello", "readiness_cycle")
DEFAULT_GUEST = "conformance"
BUNDLED_PREFIX = "bundled:"
POWER_BUTTON_PORT = 0xF5  # kvmfilter extension: reads 1 once a powerdown is requested
PAGE_SIZE = 4096
# attrs bits 3:0 = page-size hint; bit 4 = encrypted; 63:5 reserved (asm/kvm_para.h)
_MAP_PAGE_SIZES = (lib.KVM_MAP_GPA_RANGE_PAGE_SZ_4K, lib.KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
                   lib.KVM_MAP_GPA_RANGE_PAGE_SZ_1G)
_MAP_ENCRYPTED = lib.KVM_MAP_GPA_RANGE_ENCRYPTED
_MAP_RESERVED = ~0x1F & 0xFFFF_FFFF_FFFF_FFFF


class RunOptions:
    """What `kvmfilter run`/`serve` configure (their options, by the same names)."""

    def __init__(self, image: Optional[str] = None, memory: int = DEFAULT_MEMORY,
                 vcpus: int = 1, timeout: Optional[float] = DEFAULT_TIMEOUT,
                 migration_control: bool = True, map_gpa_range: bool = True,
                 plain_memory: bool = False, journal: Optional[str] = None,
                 name: str = "vm", fast_path: bool = True):
        self.image = image  # a path; None = the bundled conformance guest
        self.memory = memory
        self.vcpus = vcpus
        self.timeout = timeout  # None: run until the guest stops
        self.migration_control = migration_control
        self.map_gpa_range = map_gpa_range
        self.plain_memory = plain_memory
        self.journal = journal
        self.name = name
        self.fast_path = fast_path  # the C MSR fast path; off only to measure it

    def __repr__(self) -> str:
        return f"RunOptions({vars(self)!r})"


def load_image(path: Optional[str]) -> tuple[bytes, str]:
    """The image bytes and its report label; ``None`` -> the bundled default.

    Raises:
        ImageError: missing, unreadable, empty or oversized.
    """
    if path is None:
        path = BUNDLED_PREFIX + DEFAULT_GUEST
    if path.startswith(BUNDLED_PREFIX):
        name = path[len(BUNDLED_PREFIX):]
        if name not in BUNDLED_GUESTS:
            raise ImageError(f"{path}: no such bundled guest (there are: "
                             f"{', '.join(BUNDLED_PREFIX + g for g in BUNDLED_GUESTS)})")
        return bundled_guest(name), f"<bundled:{name}>"
    try:
        size = os.path.getsize(path)
        if size > MAX_IMAGE_SIZE:
            raise ImageError(f"{path}: {size} bytes; an image must fit in {MAX_IMAGE_SIZE} "
                             "bytes between 0x7C00 and 0xA0000")
        with open(path, "rb") as f:
            image = f.read(MAX_IMAGE_SIZE + 1)
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror or exc}") from None
    try:
        validate_image(image)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None
    return image, path


GUESTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guests")


def bundled_guest(name: str) -> bytes:
    """A guest image shipped in kvmfilter/guests/ (built from its .S source)."""
    with open(os.path.join(GUESTS_DIR, f"{name}.bin"), "rb") as f:
        return f.read()


class MigrationControlMsr:
    """MsrHandler for MSR_KVM_MIGRATION_CONTROL: delegates to the policy.

    Once the report's access log is full, the policy's no-change verdicts are
    published to the machine's C fast path; every write that would change
    the value still comes here, so the policy decides each transition and the
    journal commits it before the vCPU re-enters.
    """

    reads = True
    writes = True

    def __init__(self, control: MigrationControl):
        self.control = control
        self.fast = None
        self._ok = {0: MsrReply(False, 0), 1: MsrReply(False, 1)}

    def __call__(self, vcpu: int, op: str, data: int) -> MsrReply:
        control = self.control
        verdict = control.access(vcpu, op, data)
        if self.fast is not None and not self.fast.enabled \
                and control.accesses_total >= ACCESS_LOG_LIMIT:
            with control.lock:
                self.fast.publish(**control.fast_rules())
        if verdict.gp:
            return MSR_GP
        return self._ok.get(verdict.value) or MsrReply(False, verdict.value)

    def attach_fast_path(self, fast) -> None:
        self.fast = fast
        # Runs under the policy's lock, before the transition's vCPU re-enters.
        self.control.add_listener(lambda t: fast.set_value(t.new))

    def record_fast(self, vcpu: int, read_ok: int, read_gp: int, write_ok: int,
                    write_gp: int) -> None:
        record = self.control.record_bulk
        record(vcpu, RDMSR, OK, read_ok)
        record(vcpu, RDMSR, GP, read_gp)
        record(vcpu, WRMSR, OK, write_ok)
        record(vcpu, WRMSR, GP, write_gp)


class MapGpaRange:
    """Hypercall handler for KVM_HC_MAP_GPA_RANGE: validates and updates the page map.

    KVM ABI: kvm-abi.md section 3.  RBX = gpa, RCX = npages (4 KiB), RDX = attrs.
    Outside long mode the arguments are 32-bit.
    """

    def __init__(self, page_map: PageMap, memory_size: int):
        self.page_map = page_map
        self.memory_size = memory_size
        self._lock = threading.Lock()  # PageMap updates are serialized by its user

    def __call__(self, vcpu: int, ex: HypercallExit) -> int:
        gpa, npages, attrs = ex.args[0], ex.args[1], ex.args[2]
        if not ex.long_mode:
            gpa, npages, attrs = gpa & 0xFFFF_FFFF, npages & 0xFFFF_FFFF, attrs & 0xFFFF_FFFF
        end = gpa + npages * PAGE_SIZE
        if (attrs & _MAP_RESERVED or (attrs & 0xF) not in _MAP_PAGE_SIZES
                or gpa % PAGE_SIZE or npages == 0 or end > self.memory_size):
            log.warning("map_gpa_range_rejected", extra={"vcpu": vcpu, "gpa": gpa,
                                                        "npages": npages, "attrs": attrs})
            return -lib.KVM_EINVAL
        with self._lock:
            self.page_map.update(gpa, end, shared=not attrs & _MAP_ENCRYPTED)
        return 0


class Vmm:
    """One kvmfilter VM: build it, ``run()`` it, ``report()`` on it, ``close()``.

    Raises (from the constructor):
        ImageError, ValueError: bad image or options.
        JournalError: the journal cannot be opened.
    """

    def __init__(self, kvm: Optional[Kvm], options: RunOptions,
                 image: Optional[bytes] = None, label: Optional[str] = None):
        self.options = options
        if image is None:
            image, label = load_image(options.image)
        self.label = label or "<bytes>"
        self.control = MigrationControl(advertised=options.migration_control,
                                        encrypted_memory=not options.plain_memory)
        self.page_map = PageMap(tracking=not options.plain_memory)
        self.machine = Machine(
            kvm, image, memory_size=options.memory, vcpus=options.vcpus,
            timeout=options.timeout, fast_path=options.fast_path,
            pv_features=(1 << lib.KVM_FEATURE_MIGRATION_CONTROL)
            if options.migration_control else 0)
        # The MSR is trapped even when not advertised: the guest then gets #GP
        # from the policy, not whatever KVM would do with an unknown MSR.
        self.machine.add_msr_handler(MSR_KVM_MIGRATION_CONTROL,
                                     MigrationControlMsr(self.control))
        self.map_gpa_range: Optional[MapGpaRange] = None
        if options.map_gpa_range:
            self.map_gpa_range = MapGpaRange(self.page_map, options.memory)
            self.machine.add_hypercall_handler(lib.KVM_HC_MAP_GPA_RANGE, self.map_gpa_range,
                                               cpuid_feature_bit=lib.KVM_FEATURE_HC_MAP_GPA_RANGE)
        self.powerdown_requested = False
        self.machine.add_port_handler(POWER_BUTTON_PORT, self._power_button)
        self.result: Optional[RunResult] = None
        # Last, so a bad option above leaves nothing open.  Still before any
        # guest runs: an unusable journal is refused up front.
        self.journal = None
        if options.journal:
            from .journal import ReadinessJournal  # sqlite3 costs start-up time
            self.journal = ReadinessJournal(options.journal, options.name)
            self.control.add_recorder(self.journal.record)

    def _power_button(self, vcpu: int, ex) -> Optional[bytes]:
        return None if ex.is_out else (b"\x01" if self.powerdown_requested else b"\x00")

    def request_powerdown(self) -> None:
        """Press the power button: the guest reads 1 from port 0xF5 from now on."""
        self.powerdown_requested = True

    def run(self, kvm: Optional[Kvm] = None) -> RunResult:
        """Run the VM to its end; ``kvm`` if the VMM was built without one."""
        if kvm is not None:
            self.machine.kvm = kvm
        self.result = self.machine.run()
        return self.result

    def blocked_reasons(self) -> list[str]:
        """The migration gate: empty exactly when the guest may be migrated now.

        Migration control advertised, READY announced, and - for a VM with
        encrypted memory - the page encryption status being reported, since a
        migration stream must know which pages the guest made shared.
        """
        reasons = self.control.blocked_reasons()
        if not (self.page_map.tracking and self.control.advertised):
            return reasons
        status = self.machine.hypercall_exits.get(lib.KVM_HC_MAP_GPA_RANGE)
        if not self.options.map_gpa_range:
            reasons.append("Page encryption status is not reported (started with "
                           "--no-map-gpa-range), so the shared pages of this encrypted "
                           "guest are unknown; restart it without that option.")
        elif status is not None and status != "enabled":
            reasons.append("Page encryption status cannot be reported on this host "
                           f"({status}); run the guest on a host whose KVM offers the "
                           "KVM_HC_MAP_GPA_RANGE exit.")
        elif self.page_map.updates == 0:
            reasons.append("The guest has not reported its page encryption status (no "
                           "KVM_HC_MAP_GPA_RANGE received), so its shared pages are "
                           "unknown; wait for it, or check `kvmfilter probe` "
                           "(exit_hypercall) on this host.")
        return reasons

    def report(self) -> dict:
        """The run report (design.md, "the run report"); extra fields only added."""
        result = self.result
        migration = self.control.snapshot()
        migration["blocked_reasons"] = self.blocked_reasons()
        page_map = self.page_map.snapshot()
        page_map["hypercall_exit"] = self.machine.hypercall_exits.get(
            lib.KVM_HC_MAP_GPA_RANGE, "disabled (--no-map-gpa-range)")
        report = {
            "image": self.label,
            "vcpus": self.options.vcpus,
            "exit": {"reason": result.exit.reason, "code": result.exit.code,
                     "detail": result.exit.detail},
            "console": result.console,
            "migration": migration,
            "page_map": page_map,
            "exits": dict(sorted(result.exits.items())),
            "unhandled_ports": {f"{p:#x}": n for p, n in result.unhandled_ports.items()},
            "elapsed_s": round(result.elapsed_s, 6),
        }
        if result.console_dropped:
            report["console_dropped"] = result.console_dropped
        report["checks"] = self_checks(report)
        report["ok"] = run_ok(report)
        return report

    def close(self) -> None:
        self.machine.close()
        if self.journal is not None:
            self.journal.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_GUEST_GP = re.compile(r"^# guest saw (\d+) #GP$", re.MULTILINE)


def self_checks(report: dict) -> list[dict]:
    """Host-side cross-checks of what the guest said against what the host saw."""
    checks = []
    m = _GUEST_GP.search(report["console"])
    if m:
        guest = int(m.group(1))
        host = report["migration"]["verdicts"]["gp"]
        checks.append({"name": "guest #GP count equals the host's gp verdicts",
                       "guest": guest, "host": host, "ok": guest == host})
    return checks


def run_ok(report: dict) -> bool:
    """Contract: success is a HLT or a debug exit with code 0, and every check ok."""
    ex = report["exit"]
    clean = ex["reason"] == "hlt" or (ex["reason"] == "debug_exit" and ex["code"] == 0)
    return clean and all(c["ok"] for c in report["checks"])
