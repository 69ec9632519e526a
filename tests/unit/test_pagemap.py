"""PageMap against a naive per-page model (hypothesis), and its edge cases."""
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmfilter.policy.pagemap import PageMap

PAGES = 64
P = 4096


def naive_ranges(shared: list) -> list:
    out, start = [], None
    for i, s in enumerate(shared + [False]):
        if s and start is None:
            start = i
        elif not s and start is not None:
            out.append((start * P, i * P))
            start = None
    return out


updates = st.lists(st.tuples(st.integers(0, PAGES), st.integers(0, PAGES), st.booleans()),
                   max_size=80)


@settings(max_examples=400)
@given(updates)
def test_matches_per_page_model(ops):
    pm = PageMap()
    model = [False] * PAGES
    for a, b, shared in ops:
        lo, hi = min(a, b), max(a, b)
        pm.update(lo * P, hi * P, shared)
        for i in range(lo, hi):
            model[i] = shared
        ranges = pm.ranges()
        assert ranges == naive_ranges(model)  # sorted, disjoint, coalesced
        assert pm.shared_bytes == sum(model) * P
        for i in (0, a % PAGES, b % PAGES, PAGES - 1):
            assert pm.is_shared(i * P) == model[i]


def test_starts_all_private():
    pm = PageMap()
    assert pm.ranges() == [] and pm.shared_bytes == 0 and pm.tracking
    assert PageMap(tracking=False).snapshot()["tracking"] is False


def test_adjacent_ranges_coalesce_and_split():
    pm = PageMap()
    pm.set_shared(0, P)
    pm.set_shared(P, 2 * P)
    assert pm.ranges() == [(0, 2 * P)]
    pm.set_private(P // 2 * 2, P)  # [4096, 4096) is empty: no-op
    pm.set_private(P // 2, P + P // 2)
    assert pm.ranges() == [(0, P // 2), (P + P // 2, 2 * P)]
    assert pm.snapshot()["shared"] == [[0, P // 2], [P + P // 2, 2 * P]]


def test_terabytes_cost_one_range():
    pm = PageMap()
    pm.set_shared(0, 1 << 40)
    pm.set_private(1 << 39, (1 << 39) + P)
    assert len(pm) == 2
    assert pm.shared_bytes == (1 << 40) - P
