"""MigrationControl: the READY-bit policy and the readiness record, no KVM."""
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmfilter.policy.readiness import (ACCESS_LOG_LIMIT, HISTORY_LIMIT, MigrationControl, Op,
                                        rfc3339)
from kvmfilter.policy.readiness import VerdictName

RDMSR, WRMSR = Op.RDMSR, Op.WRMSR
OK, GP = VerdictName.OK, VerdictName.GP

u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)


class FakeClock:
    def __init__(self):
        self.t = 1_700_000_000.0

    def __call__(self):
        self.t += 1.0
        return self.t


def test_initial_value_models_the_memory():
    assert MigrationControl().value == 0  # encrypted memory (default): msr.rst says 0
    assert MigrationControl(encrypted_memory=False).value == 1


def test_protocol_walk():
    mc = MigrationControl(clock=FakeClock())
    assert mc.access(0, RDMSR) .value == 0
    assert not mc.access(0, WRMSR, 1).gp
    assert mc.ready
    assert mc.access(0, WRMSR, 2).gp
    assert mc.access(0, WRMSR, 1 << 32 | 1).gp
    assert mc.value == 1  # unchanged by the faulting writes
    assert not mc.access(1, WRMSR, 0).gp  # revoke, from another vCPU
    assert not mc.ready and mc.last_changed_by == 1
    assert mc.access(0, RDMSR).value == 0
    mc.access(0, WRMSR, 1)
    assert [(t.vcpu, t.old, t.new) for t in mc.transitions()] == [(0, 0, 1), (1, 1, 0), (0, 0, 1)]
    assert mc.verdicts == {OK: 5, GP: 2}
    assert mc.per_vcpu == {0: {RDMSR: 2, WRMSR: 4}, 1: {RDMSR: 0, WRMSR: 1}}
    snap = mc.snapshot()
    assert snap["accesses"][0] == {"vcpu": 0, "op": "rdmsr", "data": 0, "verdict": "ok"}
    assert snap["accesses"][2] == {"vcpu": 0, "op": "wrmsr", "data": 2, "verdict": "gp"}
    assert snap["transitions"][0]["from"] == 0 and snap["transitions"][0]["to"] == 1
    assert (snap["transitions_total"], snap["transitions_omitted"]) == (3, 0)


def test_not_advertised_every_access_faults():
    mc = MigrationControl(advertised=False)
    for op, data in ((RDMSR, 0), (WRMSR, 0), (WRMSR, 1), (WRMSR, 2)):
        assert mc.access(0, op, data).gp
    assert mc.value == 0 and not mc.ready and mc.transitions() == []
    assert mc.snapshot()["accesses"][0]["data"] == 0  # a faulting read returned nothing
    assert "bit 17" in mc.blocked_reasons()[0]


def test_not_advertised_plain_memory_is_still_not_ready():
    mc = MigrationControl(advertised=False, encrypted_memory=False)
    assert mc.value == 1 and not mc.ready


def test_same_value_write_is_not_a_transition():
    mc = MigrationControl(encrypted_memory=False)
    mc.access(0, WRMSR, 1)
    assert mc.transitions() == [] and mc.accesses_total == 1


def test_bad_op_is_a_bug():
    for advertised in (True, False):
        mc = MigrationControl(advertised=advertised)
        with pytest.raises(ValueError):
            mc.access(0, "cpuid", 0)
        assert mc.accesses_total == 0


def test_access_log_is_capped_but_counted():
    mc = MigrationControl()
    for i in range(ACCESS_LOG_LIMIT + 500):
        mc.access(0, WRMSR, i & 1)
    assert len(mc.accesses) == ACCESS_LOG_LIMIT
    assert mc.accesses_total == ACCESS_LOG_LIMIT + 500
    assert mc.transitions_total == ACCESS_LOG_LIMIT + 499  # 0 -> 0 first is no change


def test_listeners_see_every_transition_in_order_before_access_returns():
    mc = MigrationControl()
    seen = []
    mc.add_listener(lambda t: seen.append((t.old, t.new)))
    mc.access(0, WRMSR, 1)
    assert seen == [(0, 1)]  # already there when access() returned
    mc.access(0, WRMSR, 1)
    mc.access(0, WRMSR, 0)
    assert seen == [(0, 1), (1, 0)]


def test_threads_lose_no_transition():
    mc = MigrationControl()
    seen = []
    mc.add_listener(seen.append)

    def writer(vcpu):
        for i in range(2000):
            mc.access(vcpu, WRMSR, (i + vcpu) & 1)

    threads = [threading.Thread(target=writer, args=(v,)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert mc.accesses_total == 8000
    assert len(seen) == mc.transitions_total > HISTORY_LIMIT
    prev = 0
    for t in seen:  # each "from" is the previous "to"
        assert t.old == prev and t.new != t.old
        prev = t.new
    assert prev == mc.value
    assert mc.transitions() == seen[-HISTORY_LIMIT:]  # memory keeps the most recent


def test_rfc3339():
    assert rfc3339(0) == "1970-01-01T00:00:00.000000Z"


# --- the rule as written (msr.rst + the review), against the implementation ---

def rule(advertised: bool, value: int, op: str, data: int):
    """(gp, value after) straight from the text."""
    if not advertised:
        return True, value  # "present only if CPUID advertises bit 17"
    if op == RDMSR:
        return False, value
    if data & ~1:  # "#GP when data & ~READY is non-zero"
        return True, value
    return False, data  # "0 and 1 accepted, last write wins"


ops = st.lists(st.tuples(st.integers(0, 7), st.sampled_from([RDMSR, WRMSR]),
                         st.one_of(st.sampled_from([0, 1, 2, 3, 1 << 32, 1 << 63]), u64)),
               max_size=60)


@settings(max_examples=300)
@given(advertised=st.booleans(), encrypted=st.booleans(), accesses=ops)
def test_policy_matches_the_written_rule(advertised, encrypted, accesses):
    mc = MigrationControl(advertised=advertised, encrypted_memory=encrypted)
    value = 0 if encrypted else 1
    changes = []
    for vcpu, op, data in accesses:
        gp, after = rule(advertised, value, op, data)
        verdict = mc.access(vcpu, op, data)
        assert verdict.gp == gp
        if op == RDMSR and not gp:
            assert verdict.value == value
        if after != value:
            changes.append((vcpu, value, after))
        value = after
        assert mc.value == value
    assert [(t.vcpu, t.old, t.new) for t in mc.transitions()] == changes
    assert mc.ready == (advertised and value == 1)
    assert mc.accesses_total == len(accesses)


def test_a_failing_recorder_leaves_everything_unchanged():
    mc = MigrationControl()
    heard = []
    mc.add_listener(heard.append)

    def full_disk(t):
        raise OSError(28, "No space left on device")

    mc.add_recorder(full_disk)
    with pytest.raises(OSError):
        mc.access(0, WRMSR, 1)
    assert mc.value == 0 and mc.transitions() == [] and heard == []
    assert mc.access(0, RDMSR).value == 0  # accesses that change nothing still work
    assert mc.access(0, WRMSR, 0).gp is False


def test_recorders_run_before_listeners_and_see_the_old_value():
    mc = MigrationControl()
    order = []
    mc.add_listener(lambda t: order.append(("listener", mc.value)))
    mc.add_recorder(lambda t: order.append(("recorder", mc.value)))
    mc.access(0, WRMSR, 1)
    assert order == [("recorder", 0), ("listener", 1)]


def test_history_is_bounded_and_the_report_says_so():
    mc = MigrationControl(clock=FakeClock())
    for i in range(3 * HISTORY_LIMIT + 1):
        mc.access(0, WRMSR, (i + 1) & 1)
    snap = mc.snapshot()
    assert snap["transitions_total"] == 3 * HISTORY_LIMIT + 1
    assert len(snap["transitions"]) == HISTORY_LIMIT
    assert snap["transitions_omitted"] == 2 * HISTORY_LIMIT + 1
    assert snap["transitions"][-1]["to"] == mc.value == 1


def test_state_round_trip_continues_the_record():
    mc = MigrationControl(clock=FakeClock())
    for data in (1, 0, 2, 1):
        mc.access(1, WRMSR, data)
    mc.access(0, RDMSR)
    state = mc.export_state()
    import json
    copy = MigrationControl.from_state(json.loads(json.dumps(state)))
    assert copy.export_state() == state
    assert (copy.value, copy.ready, copy.since, copy.last_changed_by) == (1, True, mc.since, 1)
    assert copy.transitions() == mc.transitions()
    assert copy.snapshot() == mc.snapshot()
    assert copy.access(0, RDMSR).value == 1  # reads what was written before the copy
    assert copy.access(0, WRMSR, 0).value == 0 and copy.transitions_total == 4


@pytest.mark.parametrize("damage", [
    lambda s: s.pop("value"),
    lambda s: s.update(value=2),
    lambda s: s.update(history=[[0, 0]]),
    lambda s: s.update(accesses=[{"op": "nop"}]),
])
def test_malformed_state_is_refused(damage):
    from kvmfilter.base import BadInput
    state = MigrationControl().export_state()
    damage(state)
    with pytest.raises(BadInput):
        MigrationControl.from_state(state)
