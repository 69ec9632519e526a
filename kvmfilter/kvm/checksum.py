"""L1: CRC-32C, the migration stream's checksum (format version 2).

Castagnoli's polynomial, as iSCSI and ext4 use it; computed in C with SSE4.2's
CRC32 instruction where the CPU has it (cstubs/kvm_source.c), about 3x faster
than zlib's CRC-32 that version 1 used.  The GIL is released while it runs.
"""
from __future__ import annotations

from ._kvm import ffi, lib


def crc32c(data, value: int = 0) -> int:
    """CRC-32C of ``data`` (any contiguous bytes-like), continuing from ``value``
    as ``zlib.crc32`` does: ``crc32c(b, crc32c(a)) == crc32c(a + b)``."""
    return lib.kvmf_crc32c(value, ffi.from_buffer(data), len(data))


def crc32c_portable(data, value: int = 0) -> int:
    """The same, without SSE4.2 (what CPUs without it compute; tests compare)."""
    return lib.kvmf_crc32c_portable(value, ffi.from_buffer(data), len(data))
