"""Page bitmaps (kvm/bitmap.py, walked in C) against a plain set of pages,
across word edges and partial last words - without KVM."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmfilter.kvm import bitmap
from kvmfilter.kvm.bitmap import RUN_BATCH, PageBitmap

BLOCK = 4096  # 32,768 pages: sets spread over several of these, with edges

NPAGES = 3 * BLOCK * 8 + 77  # three whole blocks and a partial one


def to_bitmap(pages, npages=NPAGES) -> bytes:
    out = bytearray(bitmap.bitmap_size(npages))
    for p in pages:
        out[p // 8] |= 1 << (p % 8)
    return bytes(out)


def to_runs(pages):
    out = []
    for p in sorted(pages):
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


# Runs near block edges are the interesting ones: a run may span two blocks.
edges = st.sampled_from([0, BLOCK * 8 - 3, BLOCK * 8, 2 * BLOCK * 8 - 1, NPAGES - 5])
page_sets = st.sets(st.one_of(st.integers(0, NPAGES - 1),
                              edges.flatmap(lambda e: st.integers(e, min(e + 6, NPAGES - 1)))),
                    max_size=60)


@settings(max_examples=200)
@given(page_sets)
def test_runs_and_count_match_the_set(pages):
    b = to_bitmap(pages)
    assert list(bitmap.runs(b)) == to_runs(pages)
    assert bitmap.count(b) == len(pages)


@settings(max_examples=100)
@given(page_sets, page_sets)
def test_or_into_is_the_set_union(a, b):
    out = bytearray(to_bitmap(a))
    bitmap.or_into(out, to_bitmap(b))
    assert out == to_bitmap(a | b)
    kept = {p for p in b if p < BLOCK * 8}
    out = bytearray(to_bitmap(a))
    bitmap.or_into(out, memoryview(to_bitmap(kept, npages=BLOCK * 8)))  # a shorter view
    assert out == to_bitmap(a | kept)


@settings(max_examples=100)
@given(page_sets, st.lists(st.tuples(st.integers(0, NPAGES - 1), st.integers(1, 5000)),
                           max_size=5),
       st.integers(0, NPAGES - 1), st.integers(0, 70000))
def test_page_bitmap_is_a_set_of_pages(pages, ranges, first, n):
    model = set(pages)
    pb = PageBitmap(NPAGES)
    pb.add_bitmap(to_bitmap(pages))
    for start, length in ranges:
        length = min(length, NPAGES - start)
        pb.add_range(start, length)
        model |= set(range(start, start + length))
    assert pb.to_bytes() == to_bitmap(model)
    n = min(n, NPAGES - first)
    assert list(pb.pages_in(first, n)) == sorted(p for p in model if first <= p < first + n)


def test_a_large_sparse_bitmap():
    # 64 GiB of pages, one run of 8 in the middle.
    npages = 16 << 20
    b = bytearray(bitmap.bitmap_size(npages))
    b[1 << 20] = 0xFF
    assert list(bitmap.runs(bytes(b))) == [((1 << 20) * 8, 8)]
    assert bitmap.count(b) == 8


def test_more_runs_than_one_batch_and_odd_lengths():
    every_other = bytes([0x55]) * (RUN_BATCH // 2 + 7)  # 4 runs a byte, over 2 batches
    assert list(bitmap.runs(every_other)) == [(p, 1) for p in range(0, len(every_other) * 8, 2)]
    assert bitmap.count(every_other) == len(every_other) * 4
    assert list(bitmap.runs(b"\xff" * 3)) == [(0, 24)]  # a partial last word, all set
    assert list(bitmap.runs(b"")) == [] and bitmap.count(b"") == 0


def test_a_longer_bitmap_is_not_ored_into_a_shorter_one():
    with pytest.raises(ValueError):
        PageBitmap(64).add_bitmap(bytes(16))
    with pytest.raises(ValueError):
        bitmap.or_into(bytearray(8), bytes(9))
