"""L1: host memory that backs guest RAM.

Anonymous, private, ``MAP_NORESERVE``: a 64 GiB guest costs nothing until it
touches a page, and nothing here ever reads a page it was not asked for.
"""
from __future__ import annotations

from ._kvm import ffi, lib
from .ioctls import KvmError

PAGE_SIZE = 4096


class GuestMemory:
    """Zero-filled host memory for one guest RAM slot; ``view`` is its buffer."""

    def __init__(self, size: int):
        ptr = lib.mmap(ffi.NULL, size, lib.PROT_READ | lib.PROT_WRITE,
                       lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_NORESERVE, -1, 0)
        if ptr == lib.kvmf_map_failed():
            raise KvmError(ffi.errno, "mmap guest memory")
        self.ptr = ptr
        self.size = size
        self.address = int(ffi.cast("uintptr_t", ptr))
        self.view = ffi.buffer(ffi.cast("char *", ptr), size)
        self._mv = memoryview(self.view)

    def window(self, offset: int, length: int) -> memoryview:
        """A writable view of ``length`` bytes at ``offset`` (no copy); the one
        bounds check every access goes through."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"{length} bytes at {offset:#x} are outside "
                             f"{self.size:#x} bytes of guest memory")
        return self._mv[offset:offset + length]

    def write(self, offset: int, data: bytes) -> None:
        self.window(offset, len(data))[:] = data

    def read_into(self, offset: int, out: memoryview) -> None:
        """Copy ``len(out)`` bytes at ``offset`` into ``out`` (one copy, no allocation)."""
        out[:] = self.window(offset, len(out))

    def close(self) -> None:
        if self.ptr is not None:
            self._mv.release()
            self.view = self._mv = None
            lib.munmap(self.ptr, self.size)
            self.ptr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()
