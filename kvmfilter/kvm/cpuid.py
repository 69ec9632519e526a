"""L1: CPUID tables for KVM_SET_CPUID2, and the paravirt leaves we edit.

KVM ABI: api.rst, KVM_GET_SUPPORTED_CPUID (docs/kvm-abi.md, "CPUID").  KVM reports
0x40000000 (signature) and 0x40000001 (its own PV features); the VMM ORs in the
feature bits it implements itself (16: HC_MAP_GPA_RANGE, 17: MIGRATION_CONTROL).
"""
from __future__ import annotations

from collections import namedtuple
from typing import TYPE_CHECKING

from ..base import Unavailable
from ._kvm import lib

KVM_SIGNATURE = (0x4B4D564B, 0x564B4D56, 0x4D)  # "KVMKVMKVM\0\0\0" in ebx, ecx, edx


if TYPE_CHECKING:
    from typing import Iterable

CpuidEntry = namedtuple("CpuidEntry", "function index flags eax ebx ecx edx")


class CpuidError(Unavailable):
    """The supported CPUID table lacks what the VMM needs to advertise."""


def with_pv_features(entries: Iterable[CpuidEntry], set_bits: int,
                     clear_bits: int = 0) -> list[CpuidEntry]:
    """Return ``entries`` with KVM_CPUID_FEATURES.EAX |= set_bits, &= ~clear_bits.

    Raises:
        CpuidError: the table has no KVM signature leaf or no features leaf.
    """
    entries = list(entries)
    functions = {e.function: e for e in entries}
    sig = functions.get(lib.KVM_CPUID_SIGNATURE)
    if sig is None or (sig.ebx, sig.ecx, sig.edx) != KVM_SIGNATURE:
        raise CpuidError("KVM_GET_SUPPORTED_CPUID has no KVM signature leaf 0x40000000")
    if lib.KVM_CPUID_FEATURES not in functions:
        raise CpuidError("KVM_GET_SUPPORTED_CPUID has no KVM features leaf 0x40000001")
    return [e._replace(eax=(e.eax | set_bits) & ~clear_bits & 0xFFFF_FFFF)
            if e.function == lib.KVM_CPUID_FEATURES else e
            for e in entries]


def pv_bits(entries: Iterable[CpuidEntry]) -> int:
    """KVM_CPUID_FEATURES.EAX of a table (0 if it has no such leaf)."""
    for e in entries:
        if e.function == lib.KVM_CPUID_FEATURES:
            return e.eax
    return 0


# Leaves whose EDX is the x2APIC ID of the CPU executing CPUID (Intel SDM vol. 2A,
# CPUID leaves 0BH and 1FH).
X2APIC_ID_LEAVES = (0xB, 0x1F)


def vcpu_neutral(entries: Iterable[CpuidEntry]) -> list[CpuidEntry]:
    """The table with every per-CPU field zero: leaf 1 EBX[31:16] and the x2APIC
    ID leaves' EDX.  KVM_GET_SUPPORTED_CPUID fills them in from whichever host
    CPU ran the ioctl (they differed between our two CPUs), so without this a
    VM's table - and a migration stream's - depended on where its VMM was
    scheduled.  ``per_vcpu`` sets them for each vCPU."""
    return [e._replace(ebx=e.ebx & 0x0000_FFFF) if e.function == 1 else
            e._replace(edx=0) if e.function in X2APIC_ID_LEAVES else e
            for e in entries]


def per_vcpu(entries: Iterable[CpuidEntry], index: int, count: int) -> list[CpuidEntry]:
    """The per-CPU fields as hardware sets them: leaf 1 EBX [31:24] initial APIC
    ID = the vCPU index, [23:16] the number of logical CPUs, so a guest can find
    its siblings; leaves 0xB and 0x1F EDX: the x2APIC ID, the same index."""
    out = []
    for e in entries:
        if e.function == 1:
            ebx = (e.ebx & 0x0000_FFFF) | (min(count, 255) << 16) | ((index & 0xFF) << 24)
            e = e._replace(ebx=ebx)
        elif e.function in X2APIC_ID_LEAVES:
            e = e._replace(edx=index)
        out.append(e)
    return out
