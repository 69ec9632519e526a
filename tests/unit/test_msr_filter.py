"""The filter model's checks (what api.rst says KVM rejects) and lookup rule."""
import pytest

from kvmfilter.kvm.msr_filter import (MAX_BITMAP_BYTES, READ, WRITE, MsrFilter, MsrFilterError,
                                  MsrRange, bitmap_bytes)


def test_bitmap_is_whole_longs():
    assert bitmap_bytes(1) == 8
    assert bitmap_bytes(64) == 8
    assert bitmap_bytes(65) == 16


def test_deny_only_builds_one_range_per_msr():
    f = MsrFilter.deny_only({0x4B564D08: READ | WRITE, 0x10: WRITE})
    f.validate()
    assert not f.default_deny
    assert [(r.base, r.nmsrs, r.flags) for r in f.ranges] == [(0x10, 1, WRITE),
                                                            (0x4B564D08, 1, READ | WRITE)]
    assert all(r.bitmap == bytes(8) for r in f.ranges)


def test_lookup_follows_api_rst():
    f = MsrFilter.deny_only({0x4B564D08: WRITE})
    assert not f.allows(0x4B564D08, WRITE)
    assert f.allows(0x4B564D08, READ)  # no range with READ: the default (allow)
    assert f.allows(0x4B564D09, WRITE)
    assert f.allows(0x800, WRITE)  # x2APIC MSRs are never filtered


def test_first_matching_range_decides():
    allow = MsrRange(0x100, 8, WRITE, b"\xff" + bytes(7))
    deny = MsrRange(0x100, 8, WRITE, bytes(8))
    assert MsrFilter(False, (allow, deny)).allows(0x100, WRITE)
    assert not MsrFilter(False, (deny, allow)).allows(0x100, WRITE)


def test_default_deny():
    f = MsrFilter(True, (MsrRange(0x10, 1, READ, b"\x01" + bytes(7)),))
    f.validate()
    assert f.allows(0x10, READ)
    assert not f.allows(0x11, READ)


@pytest.mark.parametrize("flt, message", [
    (MsrFilter(False, tuple(MsrRange.deny(i, READ) for i in range(17))), "at most 16"),
    (MsrFilter(False, (MsrRange(0, 1, 0, bytes(8)),)), "non-empty subset"),
    (MsrFilter(False, (MsrRange(0, 1, 4, bytes(8)),)), "non-empty subset"),
    (MsrFilter(False, (MsrRange(0, 1, READ, bytes(7)),)), "reads 8"),
    (MsrFilter(False, (MsrRange(0, MAX_BITMAP_BYTES * 8 + 1, READ, bytes(4096)),)), "at most"),
    (MsrFilter(False, (MsrRange(0xFFFF_FFFF, 2, READ, bytes(8)),)), "32-bit"),
    (MsrFilter(True, (MsrRange(0, 0, READ, b""),)), "DEFAULT_DENY"),
    (MsrFilter(True, ()), "DEFAULT_DENY"),
])
def test_documented_rejections(flt, message):
    with pytest.raises(MsrFilterError, match=message):
        flt.validate()


def test_sixteen_ranges_and_max_bitmap_are_fine():
    MsrFilter(False, tuple(MsrRange.deny(i, READ) for i in range(16))).validate()
    MsrFilter(False, (MsrRange(0, MAX_BITMAP_BYTES * 8, READ, bytes(MAX_BITMAP_BYTES)),)).validate()


def test_error_is_a_value_error():
    assert issubclass(MsrFilterError, ValueError)
