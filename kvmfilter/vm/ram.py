"""L4: guest RAM, and which of its pages were ever written.

RAM is one KVM memory slot backed by ``MAP_NORESERVE`` host memory, created
with ``KVM_MEM_LOG_DIRTY_PAGES`` from the start.  KVM then reports every page
the guest writes (``KVM_GET_DIRTY_LOG``); kvmfilter ORs each report into a
bitmap of pages ever written, and marks the pages it writes itself (the image,
a restored page).  A snapshot or a migration sends exactly those pages: a 64 GiB
guest that touched 2 MiB costs 2 MiB and a 2 MiB bitmap, and no untouched page
is ever read (reading one would fault it in).

Logging from the start costs one write-protection fault per page the first
time the guest writes it after each harvest; a VM that is never saved is
harvested never, so it pays once per page, as demand paging does anyway.
"""
from __future__ import annotations

from ..kvm import abi
from ..kvm.bitmap import PageBitmap
from ..kvm.memory import PAGE_SIZE, GuestMemory

SLOT = 0


class GuestRam:
    """Guest RAM at guest-physical 0 in slot 0 of ``vm``, with its written-page bitmap."""

    def __init__(self, vm, size: int):
        if size % PAGE_SIZE:
            raise ValueError(f"memory size {size} is not a multiple of {PAGE_SIZE}")
        self.vm = vm
        self.size = size
        self.npages = size // PAGE_SIZE
        self.memory = GuestMemory(size)
        try:
            vm.set_user_memory_region(SLOT, 0, size, self.memory.address,
                                      flags=abi.KVM_MEM_LOG_DIRTY_PAGES)
        except BaseException:
            self.memory.close()
            raise
        self._written = PageBitmap(self.npages)  # pages ever written

    def write(self, offset: int, data: bytes) -> None:
        """Write guest memory from the VMM (not logged by KVM: marked here)."""
        self.memory.write(offset, data)
        self.mark(offset, len(data))

    def to_fill(self, offset: int, length: int) -> memoryview:
        """A writable view of memory the VMM is about to fill (a restore reads
        pages straight into it), marked written as ``write`` does."""
        view = self.memory.window(offset, length)
        self.mark(offset, length)
        return view

    def zero(self, offset: int, length: int) -> None:
        """Make whole pages zero.  Pages never written are zero already: they
        are left alone, so a large zero range costs nothing."""
        for page in self._written.pages_in(offset // PAGE_SIZE, length // PAGE_SIZE):
            self.memory.write(page * PAGE_SIZE, bytes(PAGE_SIZE))

    def mark(self, offset: int, length: int) -> None:
        if length > 0:
            first = offset // PAGE_SIZE
            self._written.add_range(first, (offset + length - 1) // PAGE_SIZE - first + 1)

    def harvest(self) -> memoryview:
        """The pages the guest wrote since the last harvest (KVM's bitmap, a view
        the next harvest overwrites), and remember them as written.  KVM clears
        its log and write-protects them."""
        dirty = self.vm.get_dirty_log(SLOT, self.npages)
        self._written.add_bitmap(dirty)
        return dirty

    def written(self) -> bytes:
        """Every page ever written, as a bitmap (harvests first)."""
        self.harvest()
        return self._written.to_bytes()

    def read_into(self, offset: int, out: memoryview) -> None:
        self.memory.read_into(offset, out)

    def close(self) -> None:
        self.memory.close()
