"""Page bitmaps in KVM's dirty-log layout (bit i of little-endian 64-bit words
= page i), at a cost that follows the pages set, not the memory size.

A 64 GiB guest has a 2 MiB bitmap; one pass of a regular expression over it
takes 40 ms and turning it into an int 3 ms, per use.  Everything here first
skips the all-zero 4 KiB blocks (512 ``memcmp``s for 64 GiB) and works only on
the rest.
"""
from __future__ import annotations

import re
import threading
from typing import Iterator

BLOCK = 4096  # bytes of bitmap per block: 32,768 pages, 128 MiB of guest memory
_ZERO_BLOCK = bytes(BLOCK)
_NONZERO = re.compile(rb"[^\x00]+")
_SPAN = 64  # bitmap bytes turned into one int at a time (bit operations stay cheap)


def bitmap_size(npages: int) -> int:
    """Bytes of a page bitmap in KVM's layout (64-bit words, bit i = page i)."""
    return (npages + 63) // 64 * 8


def nonzero_blocks(bitmap) -> Iterator[int]:
    """The offsets of the blocks of ``bitmap`` that have a bit set, in order."""
    # Slices of bytes/bytearray compare with memcmp (a memoryview would
    # compare element by element, 20 times slower).
    for offset in range(0, len(bitmap), BLOCK):
        block = bitmap[offset:offset + BLOCK]
        if block != _ZERO_BLOCK[:len(block)]:
            yield offset


def runs(bitmap) -> Iterator[tuple[int, int]]:
    """(first page, number of pages) for every run of set bits, in order."""
    pending_start = pending_len = 0
    for block in nonzero_blocks(bitmap):
        for m in _NONZERO.finditer(bitmap, block, min(block + BLOCK, len(bitmap))):
            for offset in range(m.start(), m.end(), _SPAN):
                chunk = bitmap[offset:min(offset + _SPAN, m.end())]
                bits = int.from_bytes(chunk, "little")
                base = offset * 8
                while bits:
                    low = (bits & -bits).bit_length() - 1  # first set bit
                    bits >>= low
                    ones = (~bits & (bits + 1)).bit_length() - 1  # set bits that follow
                    start = base + low
                    if pending_len and pending_start + pending_len == start:
                        pending_len += ones  # a run that continues across spans
                    else:
                        if pending_len:
                            yield pending_start, pending_len
                        pending_start, pending_len = start, ones
                    bits >>= ones
                    base = start + ones
    if pending_len:
        yield pending_start, pending_len


def count(bitmap) -> int:
    """Set bits (pages) in ``bitmap``."""
    return sum(int.from_bytes(bitmap[b:b + BLOCK], "little").bit_count()
               for b in nonzero_blocks(bitmap))


def union(a, b) -> bytes:
    """``a | b``, as long as the longer."""
    if len(a) < len(b):
        a, b = b, a
    out = bytearray(a)
    _or_into(out, b)
    return bytes(out)


def _or_into(out: bytearray, other) -> None:
    for block in nonzero_blocks(other):
        end = min(block + BLOCK, len(other))
        word = int.from_bytes(out[block:end], "little") | int.from_bytes(other[block:end],
                                                                         "little")
        out[block:end] = word.to_bytes(end - block, "little")


class PageBitmap:
    """A thread-safe set of pages (``npages`` of them), stored as KVM's layout."""

    def __init__(self, npages: int):
        self.npages = npages
        self._bits = bytearray(bitmap_size(npages))
        self._lock = threading.Lock()

    def add_bitmap(self, bitmap) -> None:
        """Add every page set in ``bitmap`` (KVM's layout, the same size)."""
        with self._lock:
            _or_into(self._bits, bitmap)

    def add_range(self, first: int, n: int) -> None:
        """Add pages ``first`` .. ``first + n - 1``."""
        if n <= 0:
            return
        lo, hi = first // 8, (first + n - 1) // 8 + 1
        with self._lock:
            word = int.from_bytes(self._bits[lo:hi], "little")
            word |= ((1 << n) - 1) << (first - lo * 8)
            self._bits[lo:hi] = word.to_bytes(hi - lo, "little")

    def pages_in(self, first: int, n: int) -> Iterator[int]:
        """The pages of ``first`` .. ``first + n - 1`` that are in the set."""
        if n <= 0:
            return
        lo, hi = first // 8, (first + n - 1) // 8 + 1
        with self._lock:
            chunk = bytes(self._bits[lo:hi])
        for start, length in runs(chunk):
            for page in range(start + lo * 8, start + lo * 8 + length):
                if first <= page < first + n:
                    yield page

    def to_bytes(self) -> bytes:
        with self._lock:
            return bytes(self._bits)
