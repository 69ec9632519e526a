"""The kvmfilter migration stream: one format for snapshot files and sockets.

Pure: bytes in, bytes out (docs/stream-format.md is the specification).

    stream  := header section* END
    header  := MAGIC (8 bytes) version (u16 LE) flags (u16 LE, 0)
    section := tag (4 ASCII bytes) length (u32 LE) payload (length bytes)
               checksum (u32 LE, of tag + length + payload: CRC-32C in
               version 2, zlib's CRC-32 in version 1, which is still read)

A tag whose first letter is upper-case is *critical*: a reader that does not
know it must refuse the stream.  A lower-case first letter marks an
*ancillary* section a reader may skip (PNG's rule).  Every length is checked
against the bound for its tag before anything is allocated, and every checksum
before the payload is used - except RAM pages a destination reads straight
into guest memory (``Reader.into_memory``): a mismatch there fails the stream,
and the VM the pages landed in is discarded without ever running.
"""
from __future__ import annotations

import json
import struct
import zlib
from typing import BinaryIO, Callable, Iterator, Optional

from ..base import BadInput
from ..kvm.checksum import crc32c

MAGIC = b"\x89KVMFLT\n"  # a high bit and a newline: catches 7-bit and text-mode damage
VERSION = 2  # 2: CRC-32C checksums (2-3x cheaper than version 1's CRC-32)
CHECKSUMS = {1: zlib.crc32, 2: crc32c}  # the versions read, and their checksum
HEADER = struct.Struct("<8sHH")
SECTION = struct.Struct("<4sI")
CRC = struct.Struct("<I")
PAGE = 4096

CONF = b"CONF"  # the VM configuration (JSON)
RAM = b"RAM "   # gpa (u64) + whole pages of data
ZERO = b"ZERO"  # (gpa u64, npages u32) runs of pages that are all zero
VCPU = b"VCPU"  # one vCPU's architectural state
CLCK = b"CLCK"  # struct kvm_clock_data
KVMF = b"KVMF"  # kvmfilter's own state (JSON): the MSR, the record, the page map ...
PASS = b"pass"  # ancillary: a pre-copy round begins (u32 round number)
STOP = b"stop"  # ancillary: the source stopped its vCPUs (JSON: wall-clock time)
SYNC = b"SYNC"  # answer SYNCED (u32, echoed) once everything before it is loaded
END = b"END "   # u32 count of the sections before it

RAM_CHUNK_PAGES = 256  # 1 MiB of pages per RAM section
MAX_LENGTH = {
    CONF: 1 << 20,
    RAM: 8 + RAM_CHUNK_PAGES * PAGE,
    ZERO: 12 * 65536,
    VCPU: 1 << 20,
    CLCK: 4096,
    KVMF: 32 << 20,
    PASS: 4,
    STOP: 256,
    SYNC: 4,
    END: 4,
}
MAX_ANCILLARY = 1 << 20
NAMES = {b"ABRT": "abort", CONF: "configuration", RAM: "RAM", ZERO: "zero pages",
         VCPU: "vCPU state", CLCK: "clock", KVMF: "kvmfilter state", PASS: "pass",
         STOP: "stop", SYNC: "sync", END: "end"}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ZERO_RUN = struct.Struct("<QI")
_VCPU_HEAD = struct.Struct("<II")


class StreamError(BadInput):
    """The stream is not a valid kvmfilter stream; says which section and why."""

    def __init__(self, message: str, section: Optional[bytes] = None, offset: int = 0):
        where = f"section {describe(section)}" if section is not None else "header"
        super().__init__(f"{where} at byte {offset}: {message}")
        self.section = section
        self.offset = offset


def describe(tag: bytes) -> str:
    name = NAMES.get(tag)
    text = tag.decode("ascii", "backslashreplace").strip()
    return f"{text} ({name})" if name else repr(tag)


def critical(tag: bytes) -> bool:
    return tag[:1].isupper()


# -- writing ---------------------------------------------------------------------------

class Writer:
    """Writes sections to ``out`` (anything with ``write(bytes)``); counts bytes."""

    def __init__(self, out):
        self.out = out
        self.sections = 0
        self.bytes = 0

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.bytes += len(data)

    def header(self) -> None:
        self._write(HEADER.pack(MAGIC, VERSION, 0))

    def section(self, tag: bytes, *parts) -> None:
        """One section whose payload is ``parts`` (bytes-like) joined - written
        part by part, never joined in memory."""
        length = sum(len(p) for p in parts)
        limit = MAX_LENGTH.get(tag, MAX_ANCILLARY)
        if length > limit:
            raise ValueError(f"{describe(tag)}: {length} bytes, at most {limit}")
        head = SECTION.pack(tag, length)
        crc = crc32c(head)
        self._write(head)
        for part in parts:
            crc = crc32c(part, crc)
            self._write(part)
        self._write(CRC.pack(crc))
        self.sections += 1

    def json(self, tag: bytes, value) -> None:
        self.section(tag, json.dumps(value, separators=(",", ":")).encode())

    def end(self) -> None:
        self.section(END, _U32.pack(self.sections))


# -- reading ---------------------------------------------------------------------------

class Reader:
    """Reads and checks a stream from ``inp`` (anything with ``read(n)``).

    ``sections()`` yields ``(tag, payload)`` for every section up to END,
    each one's length bounded and checksum verified before it is yielded;
    unknown ancillary sections are skipped; END's count is checked.
    """

    def __init__(self, inp):
        self.inp = inp
        self.offset = 0
        self.version: Optional[int] = None
        self.sections_read = 0
        self._memory: Optional[tuple[int, Callable[[int, int], memoryview]]] = None

    def into_memory(self, memory_size: int, window: Callable[[int, int], memoryview]) -> None:
        """From now on, read each RAM section's pages straight into guest memory
        and yield ``(RAM, view)``, the view they were read into.

        ``window(gpa, size)`` is the writable view of that guest memory; it is
        asked only for whole pages inside ``memory_size``.  No bytes object is
        built and copied again (a fresh one faulted in 128 KiB per section).
        The pages land before their checksum is compared: on a mismatch the
        stream fails, and its reader discards the VM they landed in.
        """
        self._memory = (memory_size, window)

    def _read(self, n: int, tag: Optional[bytes], what: str) -> bytes:
        chunks, left = [], n
        while left:
            chunk = self.inp.read(left)
            if not chunk:
                raise StreamError(f"truncated: {what} needs {n} bytes, the stream ended "
                                  f"after {n - left}", tag, self.offset)
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks) if len(chunks) != 1 else chunks[0]
        self.offset += n
        return data

    def _read_into(self, view: memoryview, tag: bytes) -> None:
        got = 0
        while got < len(view):
            n = self.inp.readinto(view[got:])
            if not n:
                raise StreamError(f"truncated: the payload needs {len(view)} bytes, the "
                                  f"stream ended after {got}", tag, self.offset)
            got += n
            self.offset += n

    def header(self) -> int:
        data = self._read(HEADER.size, None, "the header")
        magic, version, flags = HEADER.unpack(data)
        if magic != MAGIC:
            raise StreamError(f"not a kvmfilter stream (magic {magic!r}, expected "
                              f"{MAGIC!r})", None, 0)
        if version not in CHECKSUMS:
            raise StreamError(f"format version {version}; this kvmfilter reads versions "
                              f"{', '.join(map(str, CHECKSUMS))}", None, 8)
        if flags:
            raise StreamError(f"unknown header flags {flags:#x}", None, 10)
        self.version = version
        self._checksum = CHECKSUMS[version]
        return version

    def sections(self) -> Iterator[tuple[bytes, bytes]]:
        if self.version is None:
            self.header()
        while True:
            start = self.offset
            head = self._read(SECTION.size, None, "a section header")
            tag, length = SECTION.unpack(head)
            if not all(0x20 <= b < 0x7F for b in tag):
                raise StreamError(f"bad section tag {tag!r}", tag, start)
            if tag == ABORT:
                raise StreamError("the sender abandoned the stream", tag, start)
            known = tag in MAX_LENGTH
            if not known and critical(tag):
                raise StreamError("unknown critical section (a newer format?)", tag, start)
            limit = MAX_LENGTH.get(tag, MAX_ANCILLARY)
            if length > limit:
                raise StreamError(f"length {length} exceeds the limit {limit}", tag, start)
            if tag == RAM and self._memory is not None:
                payload = self._ram_into_memory(head, length, start)
            else:
                payload = self._read(length, tag, "the payload")
                (crc,) = CRC.unpack(self._read(CRC.size, tag, "the checksum"))
                if self._checksum(payload, self._checksum(head)) != crc:
                    raise StreamError("checksum mismatch (the data is damaged)", tag, start)
            if tag == END:
                if length != 4 or _U32.unpack(payload)[0] != self.sections_read:
                    raise StreamError(f"the end says {_U32.unpack(payload)[0] if length == 4 else '?'}"
                                      f" sections, {self.sections_read} were read", tag, start)
                return
            self.sections_read += 1
            if known:
                yield tag, payload

    def _ram_into_memory(self, head: bytes, length: int, start: int) -> memoryview:
        memory_size, window = self._memory
        _check_ram_length(length, start)
        gpa_bytes = self._read(8, RAM, "the payload")
        (gpa,) = _U64.unpack(gpa_bytes)
        _check_ram(gpa, length - 8, memory_size)
        view = window(gpa, length - 8)
        self._read_into(view, RAM)
        (crc,) = CRC.unpack(self._read(CRC.size, RAM, "the checksum"))
        if self._checksum(view, self._checksum(gpa_bytes, self._checksum(head))) != crc:
            raise StreamError("checksum mismatch (the data is damaged)", RAM, start)
        return view


def read_exactly(inp: BinaryIO, n: int) -> bytes:
    """Helper for transports: ``n`` bytes or EOFError."""
    chunks, left = [], n
    while left:
        chunk = inp.read(left)
        if not chunk:
            raise EOFError(f"the peer closed the stream ({n - left} of {n} bytes)")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# -- section payloads ------------------------------------------------------------------

def ram_head(gpa: int) -> bytes:
    """A RAM payload's first part; the pages follow (``Writer.section(RAM, head, pages)``)."""
    return _U64.pack(gpa)


def parse_ram(payload: bytes, memory_size: int) -> tuple[int, memoryview]:
    """(gpa, data) of a RAM section, checked to be whole pages inside memory."""
    _check_ram_length(len(payload))
    (gpa,) = _U64.unpack_from(payload)
    _check_ram(gpa, len(payload) - 8, memory_size)
    return gpa, memoryview(payload)[8:]


def _check_ram_length(length: int, offset: int = 0) -> None:
    if length < 8 + PAGE or (length - 8) % PAGE:
        raise StreamError(f"RAM payload of {length} bytes is not a gpa and whole pages",
                          RAM, offset)


def _check_ram(gpa: int, size: int, memory_size: int) -> None:
    if gpa % PAGE or gpa + size > memory_size:
        raise StreamError(f"RAM at {gpa:#x}+{size:#x} is outside guest memory "
                          f"({memory_size:#x} bytes)", RAM)


def zero_payload(runs: list[tuple[int, int]]) -> bytes:
    return b"".join(_ZERO_RUN.pack(gpa, n) for gpa, n in runs)


def parse_zero(payload: bytes, memory_size: int) -> list[tuple[int, int]]:
    if len(payload) % _ZERO_RUN.size:
        raise StreamError(f"zero-page payload of {len(payload)} bytes", ZERO)
    runs = [_ZERO_RUN.unpack_from(payload, i) for i in range(0, len(payload), _ZERO_RUN.size)]
    for gpa, n in runs:
        if gpa % PAGE or n == 0 or gpa + n * PAGE > memory_size:
            raise StreamError(f"zero pages {gpa:#x}+{n} outside guest memory", ZERO)
    return runs


def vcpu_payload(index: int, meta: dict, blobs: list[bytes]) -> bytes:
    head = json.dumps(meta, separators=(",", ":")).encode()
    return _VCPU_HEAD.pack(index, len(head)) + head + b"".join(blobs)


def parse_vcpu(payload: bytes) -> tuple[int, dict, bytes]:
    """(index, meta, blob bytes); the meta says how the blob bytes divide."""
    if len(payload) < _VCPU_HEAD.size:
        raise StreamError("vCPU payload too short", VCPU)
    index, head_len = _VCPU_HEAD.unpack_from(payload)
    if _VCPU_HEAD.size + head_len > len(payload):
        raise StreamError("vCPU payload: the description runs past the end", VCPU)
    try:
        meta = json.loads(payload[_VCPU_HEAD.size:_VCPU_HEAD.size + head_len])
    except ValueError as exc:
        raise StreamError(f"vCPU description is not JSON: {exc}", VCPU) from None
    return index, meta, payload[_VCPU_HEAD.size + head_len:]


def parse_json(tag: bytes, payload: bytes) -> dict:
    try:
        value = json.loads(payload)
    except ValueError as exc:
        raise StreamError(f"not JSON: {exc}", tag) from None
    if not isinstance(value, dict):
        raise StreamError("not a JSON object", tag)
    return value


def parse_u32(tag: bytes, payload: bytes) -> int:
    if len(payload) != 4:
        raise StreamError(f"{len(payload)} bytes, expected 4", tag)
    return _U32.unpack(payload)[0]


def u32(value: int) -> bytes:
    return _U32.pack(value)


# -- the return path (destination -> source) and the commit ------------------------------
# A SYNC section is answered with SYNCED (its number) once everything before it
# is loaded.  After END the destination answers READY (it holds the whole
# state) or FAILED, the source answers COMMIT (it will never run the guest
# again) or ABORT, and the destination, once its vCPUs run, says STARTED.  Same
# framing as sections, but zlib's CRC-32 in every version: a destination that
# refuses a newer stream can still tell its source why.

READY = b"RDY!"
FAILED = b"NAK!"
COMMIT = b"CMIT"
ABORT = b"ABRT"
STARTED = b"STRT"
SYNCED = b"SYN!"
MESSAGES = {READY: 4096, FAILED: 4096, COMMIT: 4096, ABORT: 4096, STARTED: 4096,
            SYNCED: 4096}


def frame(tag: bytes, payload: bytes = b"") -> bytes:
    head = SECTION.pack(tag, len(payload))
    return head + payload + CRC.pack(zlib.crc32(payload, zlib.crc32(head)))


def read_frame(inp) -> tuple[bytes, bytes]:
    """One return-path message: (tag, payload), checked.  EOFError at the end."""
    head = read_exactly(inp, SECTION.size)
    tag, length = SECTION.unpack(head)
    if tag not in MESSAGES or length > MESSAGES[tag]:
        raise StreamError(f"unexpected message (length {length})", tag)
    payload = read_exactly(inp, length)
    (crc,) = CRC.unpack(read_exactly(inp, CRC.size))
    if zlib.crc32(payload, zlib.crc32(head)) != crc:
        raise StreamError("checksum mismatch", tag)
    return tag, payload
