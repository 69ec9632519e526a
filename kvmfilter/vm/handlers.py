"""L4: the exit handlers that connect the machine to the policy.

- ``MigrationControlMsr`` serves MSR 0x4b564d08 through ``MigrationControl``
  and feeds the C fast path its rules.
- ``MapGpaRange`` serves KVM_HC_MAP_GPA_RANGE and updates the ``PageMap``.
"""
from __future__ import annotations

import logging
import threading

from ..kvm import abi
from ..kvm.exits import MSR_GP, HypercallExit, MsrExit, MsrReply
from ..policy.readiness import ACCESS_LOG_LIMIT, MigrationControl, Op, VerdictName
from ..policy.pagemap import PageMap

log = logging.getLogger("kvmfilter.vm")

PAGE_SIZE = 4096
# attrs bits 3:0 = page-size hint; bit 4 = encrypted; 63:5 reserved (asm/kvm_para.h)
_MAP_PAGE_SIZES = (abi.KVM_MAP_GPA_RANGE_PAGE_SZ_4K, abi.KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
                   abi.KVM_MAP_GPA_RANGE_PAGE_SZ_1G)
_MAP_ENCRYPTED = abi.KVM_MAP_GPA_RANGE_ENCRYPTED
_MAP_RESERVED = ~0x1F & 0xFFFF_FFFF_FFFF_FFFF


class MigrationControlMsr:
    """MSR handler for MSR_KVM_MIGRATION_CONTROL: delegates to the policy.

    Once the report's access log is full, the policy's no-change verdicts are
    published to the machine's C fast path; every write that would change
    the value still comes here, so the policy decides each transition and the
    journal commits it before the vCPU re-enters.
    """

    reads = True
    writes = True

    def __init__(self, control: MigrationControl):
        self.control = control
        self.rules = None
        self._ok = {0: MsrReply(False, 0), 1: MsrReply(False, 1)}

    def __call__(self, vcpu: int, ex: MsrExit) -> MsrReply:
        control = self.control
        verdict = control.access(vcpu, Op.WRMSR if ex.write else Op.RDMSR, ex.data)
        rules = self.rules
        if rules is not None and not rules.enabled and len(control.accesses) >= ACCESS_LOG_LIMIT:
            with control.lock:
                rules.publish(**control.fast_rules())
        if verdict.gp:
            return MSR_GP
        return self._ok.get(verdict.value) or MsrReply(False, verdict.value)

    def attach_fast_path(self, rules, holder) -> None:
        """The machine's C fast path: ``rules`` to publish verdicts to, and
        ``holder`` (``kvm.fastpath.FastValue``), which keeps the value from now on."""
        self.rules = rules
        holder.load(self.control.value)
        self.control.attach_value(holder)

    @staticmethod
    def fast_counts(fast_paths):
        """A ``MigrationControl`` count source over the vCPUs' live C counters."""
        def rows():
            for vcpu, fast in fast_paths():
                c = fast.read_counts()
                yield vcpu, Op.RDMSR, VerdictName.OK, c.read_ok
                yield vcpu, Op.RDMSR, VerdictName.GP, c.read_gp
                yield vcpu, Op.WRMSR, VerdictName.OK, c.write_ok
                yield vcpu, Op.WRMSR, VerdictName.GP, c.write_gp
        return rows


class MapGpaRange:
    """Hypercall handler for KVM_HC_MAP_GPA_RANGE: validates and updates the page map.

    KVM ABI: docs/kvm-abi.md, "The hypercall exit".  RBX = gpa, RCX = npages
    (4 KiB), RDX = attrs.  Outside long mode the arguments are 32-bit.
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
            return -abi.KVM_EINVAL
        with self._lock:
            self.page_map.update(gpa, end, shared=not attrs & _MAP_ENCRYPTED)
        return 0
