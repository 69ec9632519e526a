"""L1: the MSR filter model, checked against the rules api.rst documents.

KVM ABI: api.rst, KVM_X86_SET_MSR_FILTER.  A bitmap bit set to 1 means *allowed*
(KVM handles the access); 0 means denied, which with the FILTER exit reason
enabled becomes a KVM_EXIT_X86_RDMSR/WRMSR to userspace.
"""
from __future__ import annotations

from collections import namedtuple
from typing import TYPE_CHECKING

from ..base import BadInput
from ._kvm import lib

READ = lib.KVM_MSR_FILTER_READ
WRITE = lib.KVM_MSR_FILTER_WRITE
DEFAULT_ALLOW = lib.KVM_MSR_FILTER_DEFAULT_ALLOW
DEFAULT_DENY = lib.KVM_MSR_FILTER_DEFAULT_DENY
MAX_RANGES = lib.KVM_MSR_FILTER_MAX_RANGES
MAX_BITMAP_BYTES = lib.KVM_MSR_FILTER_MAX_BITMAP_SIZE
# KVM copies BITS_TO_LONGS(nmsrs) * 8 bytes of bitmap, so even nmsrs=1 needs 8.
_LONG_BYTES = 8


if TYPE_CHECKING:
    from typing import Mapping


class MsrFilterError(BadInput):
    """A filter that api.rst says KVM will reject."""


def bitmap_bytes(nmsrs: int) -> int:
    """Bytes of bitmap KVM reads for ``nmsrs`` MSRs."""
    return (nmsrs + 63) // 64 * _LONG_BYTES


class MsrRange(namedtuple("MsrRange", "base nmsrs flags bitmap")):
    """``bitmap`` bit i = MSR base+i; 1 = allowed, 0 = denied (exits)."""
    __slots__ = ()

    @classmethod
    def deny(cls, index: int, flags: int) -> "MsrRange":
        """One MSR, denied for the accesses in ``flags`` (so they exit)."""
        return cls(index, 1, flags, bytes(bitmap_bytes(1)))

    def allows(self, index: int) -> bool:
        offset = index - self.base
        return bool(self.bitmap[offset // 8] >> (offset % 8) & 1)

    def contains(self, index: int) -> bool:
        return self.base <= index < self.base + self.nmsrs


class MsrFilter(namedtuple("MsrFilter", "default_deny ranges")):
    """``ranges``: a tuple of MsrRange, looked up in order."""
    __slots__ = ()

    @classmethod
    def deny_only(cls, msrs: Mapping[int, int]) -> "MsrFilter":
        """DEFAULT_ALLOW plus one denying range per MSR: ``{index: READ|WRITE flags}``."""
        return cls(False, tuple(MsrRange.deny(i, f) for i, f in sorted(msrs.items())))

    @property
    def flags(self) -> int:
        return DEFAULT_DENY if self.default_deny else DEFAULT_ALLOW

    def validate(self) -> None:
        """Raise MsrFilterError for what api.rst says KVM rejects."""
        if len(self.ranges) > MAX_RANGES:
            raise MsrFilterError(f"{len(self.ranges)} ranges: KVM takes at most {MAX_RANGES}")
        for i, r in enumerate(self.ranges):
            where = f"range {i} (base {r.base:#x})"
            if r.flags == 0 or r.flags & ~(READ | WRITE):
                raise MsrFilterError(f"{where}: flags {r.flags:#x} must be a non-empty "
                                     "subset of READ|WRITE")
            if not 0 <= r.base <= 0xFFFF_FFFF or r.nmsrs < 0 or r.base + r.nmsrs > 1 << 32:
                raise MsrFilterError(f"{where}: range [{r.base:#x}, +{r.nmsrs}) is not "
                                     "inside the 32-bit MSR space")
            need = bitmap_bytes(r.nmsrs)
            if need > MAX_BITMAP_BYTES:
                raise MsrFilterError(f"{where}: {r.nmsrs} MSRs need a {need}-byte bitmap; "
                                     f"KVM takes at most {MAX_BITMAP_BYTES:#x}")
            if len(r.bitmap) < need:
                raise MsrFilterError(f"{where}: bitmap is {len(r.bitmap)} bytes; KVM "
                                     f"reads {need} for {r.nmsrs} MSRs")
        if self.default_deny and not any(r.nmsrs for r in self.ranges):
            raise MsrFilterError("DEFAULT_DENY needs at least one non-empty range")

    def kernel_ranges(self) -> list[tuple[int, int, int, bytes]]:
        return [(r.flags, r.nmsrs, r.base, r.bitmap) for r in self.ranges]

    def allows(self, index: int, access: int) -> bool:
        """Would KVM handle this access itself?  (api.rst's lookup rule.)"""
        if 0x800 <= index <= 0x8FF:  # x2APIC MSRs are never filtered
            return True
        for r in self.ranges:
            if r.flags & access and r.contains(index):
                return r.allows(index)
        return not self.default_deny
