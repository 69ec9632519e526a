"""CRC-32C, the stream's checksum, in C: the published check values, the
incremental form, and the SSE4.2 path against the portable one."""
from hypothesis import given
from hypothesis import strategies as st

from kvmfilter.kvm.checksum import crc32c, crc32c_portable


def test_published_check_values():
    # The CRC catalogue's check value, and RFC 3720 (iSCSI) B.4's vectors.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(b"") == 0


@given(st.binary(max_size=5000), st.integers(0, 5000))
def test_incremental_and_portable_agree(data, cut):
    cut = min(cut, len(data))
    whole = crc32c(data)
    assert crc32c(data[cut:], crc32c(data[:cut])) == whole
    assert crc32c_portable(data) == whole
    assert crc32c(memoryview(bytearray(data))) == whole


def test_unaligned_views():
    data = bytes(range(256)) * 64
    for start in range(9):
        view = memoryview(data)[start:start + 4099]
        assert crc32c(view) == crc32c_portable(bytes(view))
