"""The stream format (docs/stream-format.md) without KVM: what is written reads
back, and every kind of damage is refused, naming the section; URIs, and the
socket a unix: migration is sent on."""
import io
import pathlib
import shutil
import socket
import struct
import tempfile
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmfilter.base import BadInput
from kvmfilter.kvm.checksum import crc32c
from kvmfilter.migrate import precopy, stream, transport
from kvmfilter.migrate.stream import Reader, StreamError, Writer
from kvmfilter.migrate.transport import UriError, parse_uri


def sample() -> bytes:
    out = io.BytesIO()
    w = Writer(out)
    w.header()
    w.json(stream.CONF, {"vm": {"memory": 1 << 20, "vcpus": 1}})
    w.section(stream.RAM, stream.ram_head(0x7000), b"\x42" * 4096)
    w.section(stream.ZERO, stream.zero_payload([(0x9000, 2)]))
    w.section(stream.PASS, stream.u32(1))
    w.section(stream.SYNC, stream.u32(1))
    w.json(stream.KVMF, {"control": {}})
    w.end()
    return out.getvalue()


def read_all(data: bytes):
    return list(Reader(io.BytesIO(data)).sections())


def test_round_trip():
    sections = read_all(sample())
    assert [tag for tag, _ in sections] == [stream.CONF, stream.RAM, stream.ZERO,
                                            stream.PASS, stream.SYNC, stream.KVMF]
    assert stream.critical(stream.SYNC)  # a source waits for the answer: never skipped
    gpa, data = stream.parse_ram(sections[1][1], 1 << 20)
    assert gpa == 0x7000 and bytes(data) == b"\x42" * 4096
    assert stream.parse_zero(sections[2][1], 1 << 20) == [(0x9000, 2)]


def test_wrong_magic():
    data = b"NOTKVMF!" + sample()[8:]
    with pytest.raises(StreamError, match="not a kvmfilter stream"):
        read_all(data)


def test_wrong_version():
    data = bytearray(sample())
    struct.pack_into("<H", data, 8, 99)
    with pytest.raises(StreamError, match="format version 99"):
        read_all(bytes(data))


def test_tampered_payload_names_the_section():
    data = bytearray(sample())
    data[data.index(b"\x42" * 16) + 100] ^= 1  # one bit in the RAM page
    with pytest.raises(StreamError, match=r"section RAM \(RAM\).*checksum mismatch"):
        read_all(bytes(data))


@pytest.mark.parametrize("cut", [4, 20, 200, 3000, -5, -1])
def test_truncated_anywhere(cut):
    data = sample()
    with pytest.raises(StreamError, match="truncated"):
        read_all(data[:cut] if cut > 0 else data[:len(data) + cut])


def test_a_missing_end_is_truncation():
    data = sample()
    end_len = stream.SECTION.size + 4 + stream.CRC.size
    with pytest.raises(StreamError, match="truncated"):
        read_all(data[:-end_len])


def test_end_counts_the_sections():
    out = io.BytesIO()
    w = Writer(out)
    w.header()
    w.json(stream.CONF, {})
    w.sections = 5  # lie
    w.end()
    with pytest.raises(StreamError, match="the end says 5 sections, 1 were read"):
        read_all(out.getvalue())


def test_oversized_length_is_refused_before_reading():
    head = stream.HEADER.pack(stream.MAGIC, stream.VERSION, 0)
    bogus = stream.SECTION.pack(stream.CONF, 1 << 31)
    with pytest.raises(StreamError, match="exceeds the limit"):
        read_all(head + bogus)  # no payload follows: nothing was allocated


def test_unknown_sections():
    out = io.BytesIO()
    w = Writer(out)
    w.header()
    w.section(b"note", b"an ancillary section a reader may skip")
    w.json(stream.CONF, {})
    w.end()
    assert [tag for tag, _ in read_all(out.getvalue())] == [stream.CONF]
    out = io.BytesIO()
    w = Writer(out)
    w.header()
    w.section(b"NEWS", b"a critical section from a newer format")
    w.end()
    with pytest.raises(StreamError, match="unknown critical section"):
        read_all(out.getvalue())


def test_a_ram_payload_must_be_whole_pages_inside_memory():
    with pytest.raises(StreamError, match="outside guest memory"):
        stream.parse_ram(stream.ram_head(1 << 20) + bytes(4096), 1 << 20)
    with pytest.raises(StreamError, match="whole pages"):
        stream.parse_ram(stream.ram_head(0) + bytes(100), 1 << 20)
    with pytest.raises(StreamError, match="outside guest memory"):
        stream.parse_ram(stream.ram_head(0x800) + bytes(4096), 1 << 20)
    with pytest.raises(StreamError, match="outside guest memory"):
        stream.parse_zero(stream.zero_payload([(0xF0000, 100)]), 1 << 20)


def read_into(data: bytes, memory: bytearray):
    """Every section, RAM read straight into ``memory`` (a destination's way)."""
    reader = Reader(io.BytesIO(data))
    windows = []

    def window(gpa, size):
        windows.append((gpa, size))
        return memoryview(memory)[gpa:gpa + size]

    reader.into_memory(len(memory), window)
    return list(reader.sections()), windows


def test_ram_read_straight_into_memory():
    memory = bytearray(1 << 20)
    sections, windows = read_into(sample(), memory)
    assert windows == [(0x7000, 4096)]
    assert memory[0x7000:0x8000] == b"\x42" * 4096 and memory.count(0) == len(memory) - 4096
    assert [tag for tag, _ in sections] == [stream.CONF, stream.RAM, stream.ZERO,
                                            stream.PASS, stream.SYNC, stream.KVMF]
    assert bytes(sections[1][1]) == b"\x42" * 4096  # the view the pages landed in


def test_ram_into_memory_is_checked_as_any_section():
    data = bytearray(sample())
    data[data.index(b"\x42" * 16) + 100] ^= 1
    with pytest.raises(StreamError, match=r"section RAM \(RAM\).*checksum mismatch"):
        read_into(bytes(data), bytearray(1 << 20))
    with pytest.raises(StreamError, match="truncated"):
        read_into(sample()[:data.index(b"\x42" * 16) + 2000], bytearray(1 << 20))
    # Outside memory, or not whole pages: refused before anything is read into it.
    for gpa, pages in ((1 << 20, bytes(4096)), (0x800, bytes(4096)), (0, bytes(100))):
        out = io.BytesIO()
        w = Writer(out)
        w.header()
        w.section(stream.RAM, stream.ram_head(gpa), pages)
        w.end()
        memory = bytearray(1 << 20)
        with pytest.raises(StreamError, match="outside guest memory|whole pages"):
            read_into(out.getvalue(), memory)
        assert not any(memory)


def test_return_path_frames():
    data = (stream.frame(stream.SYNCED, stream.u32(3)) + stream.frame(stream.READY)
            + stream.frame(stream.FAILED, b'{"error": "x"}'))
    f = io.BytesIO(data)
    assert stream.read_frame(f) == (stream.SYNCED, stream.u32(3))
    assert stream.read_frame(f) == (stream.READY, b"")
    assert stream.read_frame(f) == (stream.FAILED, b'{"error": "x"}')
    with pytest.raises(EOFError):
        stream.read_frame(f)
    bad = bytearray(stream.frame(stream.COMMIT, b"x"))
    bad[-1] ^= 0xFF
    with pytest.raises(StreamError, match="checksum"):
        stream.read_frame(io.BytesIO(bytes(bad)))


def test_stream_errors_are_bad_input():
    assert issubclass(StreamError, BadInput)


# -- pre-copy arithmetic -------------------------------------------------------------

def reference_runs(bitmap: bytes):
    bits = int.from_bytes(bitmap, "little")
    out, i, n = [], 0, len(bitmap) * 8
    while i < n:
        if bits >> i & 1:
            j = i
            while j < n and bits >> j & 1:
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return out


@settings(max_examples=300)
@given(st.binary(min_size=0, max_size=300))
def test_runs_equal_the_reference(bitmap):
    assert list(precopy.runs(bitmap)) == reference_runs(bitmap)
    assert precopy.count(bitmap) == sum(n for _, n in reference_runs(bitmap))


def test_runs_cross_span_boundaries():
    bitmap = b"\xff" * 200 + b"\x00" * 10 + b"\x01"
    assert list(precopy.runs(bitmap)) == [(0, 1600), (1680, 1)]
    assert list(precopy.chunked([(0, 600)], 256)) == [(0, 256), (256, 256), (512, 88)]


def test_the_stop_rule():
    D = precopy.Decision
    # 1 MB/s, 300 ms limit: 200 KB fits, 400 KB does not.
    assert precopy.next_step(200_000, 1e6, 300, 1).decision is D.STOP_AND_COPY
    assert precopy.next_step(400_000, 1e6, 300, 1).decision is D.ANOTHER_ROUND
    assert precopy.next_step(400_000, 1e6, 300, 30).decision is D.GIVE_UP
    assert precopy.next_step(0, 0, 300, 1).decision is D.STOP_AND_COPY
    assert precopy.next_step(4096, 0, 300, 1).decision is D.ANOTHER_ROUND


# -- URIs ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, parsed", [
    ("file:/tmp/x", ("file", "/tmp/x", None, None)),
    ("unix:/run/m.sock", ("unix", "/run/m.sock", None, None)),
    ("tcp:127.0.0.1:4444", ("tcp", None, "127.0.0.1", 4444)),
    ("tcp:[::1]:4444", ("tcp", None, "::1", 4444)),
    ("tcp:host.example:1", ("tcp", None, "host.example", 1)),
])
def test_uris(text, parsed):
    uri = parse_uri(text)
    assert tuple(uri) == parsed and str(uri) == text


@pytest.mark.parametrize("text", ["exec:cat", "file:", "tcp:host", "tcp::80", "tcp:h:0",
                                  "tcp:h:99999", "tcp:[::1]4444", "nonsense"])
def test_bad_uris(text):
    with pytest.raises(UriError):
        parse_uri(text)


def test_a_unix_migration_socket_holds_a_stop_and_copy_in_flight():
    """The send buffer is widened past net.core.wmem_default (208 KiB), so the
    source does not wait for the destination every 200 KiB while the guest is
    stopped: outright when privileged, else as far as wmem_max allows."""
    directory = tempfile.mkdtemp(prefix="kvmf-")
    uri = parse_uri(f"unix:{directory}/m.sock")
    listener = transport.listen(uri)
    try:
        with transport.connect(uri, 5.0) as sock:
            got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)  # twice the size set
        wmem_max = int(pathlib.Path("/proc/sys/net/core/wmem_max").read_text())
        allowed = {2 * transport.UNIX_SEND_BUFFER, 2 * min(transport.UNIX_SEND_BUFFER, wmem_max)}
        assert got in allowed, (got, allowed)
        if _has_capability(12):  # CAP_NET_ADMIN: past wmem_max too
            assert got == 2 * transport.UNIX_SEND_BUFFER
    finally:
        listener.close()
        shutil.rmtree(directory)


def _has_capability(bit: int) -> bool:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def test_crc_covers_the_header():
    """A length changed together with a payload still fails the CRC."""
    data = bytearray(sample())
    offset = stream.HEADER.size
    tag, length = stream.SECTION.unpack_from(data, offset)
    payload = bytes(data[offset + 8:offset + 8 + length])
    assert crc32c(payload, crc32c(bytes(data[offset:offset + 8]))) == \
        struct.unpack_from("<I", data, offset + 8 + length)[0]


def as_version_1(data: bytes) -> bytes:
    """``data`` rewritten as kvmfilter 0.2.0 wrote it: version 1, zlib's CRC-32."""
    out = bytearray(stream.HEADER.pack(stream.MAGIC, 1, 0))
    offset = stream.HEADER.size
    while offset < len(data):
        tag, length = stream.SECTION.unpack_from(data, offset)
        head, payload = data[offset:offset + 8], data[offset + 8:offset + 8 + length]
        out += head + payload + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head)))
        offset += 8 + length + 4
    return bytes(out)


def test_version_1_streams_still_read():
    # Snapshots saved by the previous release restore: its checksum is zlib's.
    old = as_version_1(sample())
    assert struct.unpack_from("<H", old, 8)[0] == 1 and old != sample()
    assert read_all(old) == read_all(sample())
    damaged = bytearray(old)
    damaged[damaged.index(b"\x42" * 16)] ^= 1
    with pytest.raises(StreamError, match="checksum mismatch"):
        read_all(bytes(damaged))


def test_a_version_1_checksum_in_a_version_2_stream_is_refused():
    size = stream.HEADER.size
    mixed = sample()[:size] + as_version_1(sample())[size:]  # says 2, checks with CRC-32
    with pytest.raises(StreamError, match="checksum mismatch"):
        read_all(mixed)


@given(st.lists(st.binary(max_size=300), max_size=5))
def test_a_section_written_in_parts_is_the_section_of_the_joined_parts(parts):
    joined, split = io.BytesIO(), io.BytesIO()
    Writer(joined).section(stream.RAM, b"".join(parts))
    Writer(split).section(stream.RAM, *parts, b"")
    assert split.getvalue() == joined.getvalue()
