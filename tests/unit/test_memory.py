"""Host memory backing guest RAM, without KVM: the copy out the migration
source uses, and its bounds."""
import pytest

from kvmfilter.kvm.memory import PAGE_SIZE, GuestMemory


def test_read_into_copies_and_refuses_what_is_outside():
    with GuestMemory(4 * PAGE_SIZE) as mem:
        mem.write(PAGE_SIZE, b"\x42" * PAGE_SIZE)
        out = memoryview(bytearray(2 * PAGE_SIZE))
        mem.read_into(PAGE_SIZE // 2, out)
        assert bytes(out) == bytes(PAGE_SIZE // 2) + b"\x42" * PAGE_SIZE + bytes(PAGE_SIZE // 2)
        for offset in (-1, 3 * PAGE_SIZE + 1):
            with pytest.raises(ValueError, match="outside"):
                mem.read_into(offset, out)
