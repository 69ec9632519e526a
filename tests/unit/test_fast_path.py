"""The C fast path replays only verdicts the policy published, agrees with it,
and writes the same replies into the run page that exits.apply would.

The C functions (cstubs/kvm_source.c) are called directly on run pages filled
by hand: no KVM needed.
"""
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmfilter.kvm._kvm import ffi, lib
from kvmfilter.kvm.exits import MsrReply, RunPageBuffer, apply
from kvmfilter.kvm.fastpath import FastValue, MsrRules, TransitionRing, VcpuFastPath
from kvmfilter.policy.readiness import MigrationControl, Op, Transition

MSR = 0x4B564D08
u64 = st.integers(0, (1 << 64) - 1)
data_st = st.one_of(st.sampled_from([0, 1, 2, 3, 1 << 32, 1 << 32 | 1, (1 << 64) - 1]), u64)


def published(mc: MigrationControl, vcpus: int = 1, ring_capacity: int = 4096):
    """The policy wired to a C fast path as the machine wires it: the value kept
    in C, a transition ring per vCPU, the rules published."""
    rules = MsrRules(MSR)
    rings = {v: TransitionRing(v, ring_capacity) for v in range(vcpus)}
    holder = FastValue(rules, rings)
    holder.load(mc.value)
    mc.attach_value(holder)
    with mc.lock:
        rules.publish(**mc.fast_rules())
    rules.rings = rings  # for the tests: VcpuFastPath(rules, None, rules.rings[v])
    return rules


def fast_for(rules, vcpu=0):
    return VcpuFastPath(rules, None, rules.rings[vcpu])


def test_disabled_rules_decide_nothing():
    rules = MsrRules(MSR)
    assert not rules.enabled
    for write in (False, True):
        assert rules.decide(write, 0)[0] == -1


@settings(max_examples=500)
@given(advertised=st.booleans(), encrypted=st.booleans(),
       history=st.lists(st.tuples(st.sampled_from([Op.RDMSR, Op.WRMSR]), data_st), max_size=8),
       op=st.sampled_from([Op.RDMSR, Op.WRMSR]), data=data_st)
def test_c_verdicts_equal_the_policy_and_never_cover_a_transition(
        advertised, encrypted, history, op, data):
    mc = MigrationControl(advertised=advertised, encrypted_memory=encrypted)
    rules = published(mc)
    for h_op, h_data in history:  # the value moves; the listener keeps C current
        mc.access(0, h_op, h_data)
    verdict, value = rules.decide(op == Op.WRMSR, data)
    expected = mc.decide(op, data, mc.value)
    if verdict == -1:
        return  # Python decides: always allowed
    if verdict == 2:  # a change C may apply: exactly the policy's accepted changes
        assert op == Op.WRMSR and not expected.gp and expected.value != mc.value
        assert value == expected.value
        return
    assert verdict == int(expected.gp)
    if op == Op.RDMSR and not expected.gp:
        assert value == expected.value == mc.value
    if op == Op.WRMSR:
        assert expected.value == mc.value, "C called a change no change"


def msr_page(write: bool, data: int, index: int = MSR):
    page = RunPageBuffer()
    run = page.run
    run.exit_reason = lib.KVM_EXIT_X86_WRMSR if write else lib.KVM_EXIT_X86_RDMSR
    run.msr.index = index
    run.msr.data = data
    run.msr.error = 0x5A  # stale: the service must overwrite it
    return page


@settings(max_examples=300)
@given(advertised=st.booleans(), value=st.sampled_from([0, 1]), write=st.booleans(),
       data=data_st)
def test_c_service_writes_what_apply_writes(advertised, value, write, data):
    """The per-access service function on a hand-filled run page: the reply it
    leaves (error, and for RDMSR the value read) is the one exits.apply would
    leave for the policy's verdict.  Dropping C's RDMSR write-back fails here."""
    mc = MigrationControl(advertised=advertised, encrypted_memory=not value)
    fast = fast_for(published(mc))
    verdict = mc.decide(Op.WRMSR if write else Op.RDMSR, data, mc.value)
    page = msr_page(write, data)
    assert fast.service(page.run), "C declined an access it has a rule for"
    expected = msr_page(write, data)
    apply(expected.run, MsrReply(verdict.gp, verdict.value))
    assert (page.run.msr.error, page.run.msr.data) == \
        (expected.run.msr.error, expected.run.msr.data)


def test_rdmsr_reply_is_the_value():
    mc = MigrationControl(encrypted_memory=False)  # value 1
    fast = fast_for(published(mc))
    page = msr_page(False, 0)
    assert fast.service(page.run)
    assert (page.run.msr.error, page.run.msr.data) == (0, 1)
    assert fast.read_counts() == (1, 0, 0, 0)


def test_other_msrs_and_exits_go_to_python():
    mc = MigrationControl()
    fast = fast_for(published(mc))
    assert not fast.service(msr_page(False, 0, index=0x10).run)
    page = RunPageBuffer()
    page.run.exit_reason = lib.KVM_EXIT_HLT
    assert not fast.service(page.run)
    assert fast.read_counts() == (0, 0, 0, 0)


def test_counts_are_cumulative_and_live():
    mc = MigrationControl(encrypted_memory=False)
    fast = fast_for(published(mc))
    for write, data in ((False, 0), (True, 1), (True, 2), (False, 0)):
        assert fast.service(msr_page(write, data).run)
    assert fast.read_counts() == (2, 0, 1, 1)
    assert fast.read_counts() == (2, 0, 1, 1)  # reading does not reset


def test_enabled_rules_service_what_changes_nothing():
    rules = published(MigrationControl(advertised=True, encrypted_memory=False))  # value 1
    assert rules.decide(False, 0) == (0, 1)       # a read: the value
    assert rules.decide(True, 1)[0] == 0          # a write of the current value
    assert rules.decide(True, 2)[0] == 1          # a reserved bit: #GP
    assert rules.decide(True, 1 << 40)[0] == 1
    assert rules.decide(True, 0) == (2, 0)        # a change C may apply (no journal)
    journaled = MigrationControl(encrypted_memory=False)
    journaled.add_recorder(lambda t: None)
    assert published(journaled).decide(True, 0)[0] == -1  # a journal: Python decides
    off = published(MigrationControl(advertised=False))
    assert [off.decide(w, d)[0] for w, d in ((False, 0), (True, 0), (True, 1))] == [1, 1, 1]


def console_out(fast, page, port, data, direction=lib.KVM_EXIT_IO_OUT):
    run = page.run
    run.exit_reason = lib.KVM_EXIT_IO
    run.io.direction, run.io.size, run.io.port = direction, 1, port
    run.io.count, run.io.data_offset = len(data), page.IO_DATA_OFFSET
    ffi.memmove(ffi.cast("char *", run) + page.IO_DATA_OFFSET, data, len(data))
    return fast.service(run)


def test_console_collection_in_c():
    fast = VcpuFastPath(None, 0xE9)
    page = RunPageBuffer()
    assert console_out(fast, page, 0xE9, b"hello")
    assert not console_out(fast, page, 0x80, b"x")                       # another port
    assert not console_out(fast, page, 0xE9, b"x", lib.KVM_EXIT_IO_IN)   # an IN
    assert console_out(fast, page, 0xE9, b"!!!")
    assert fast.drain_console() == (b"hello!!!", 2)
    assert fast.drain_console() == (b"", 0)


def test_no_console_port_collects_nothing():
    """The port table gave 0xE9 to another device: C must leave it to Python."""
    fast = VcpuFastPath(None, None)
    assert not console_out(fast, RunPageBuffer(), 0xE9, b"hello")
    assert fast.drain_console() == (b"", 0)


def test_console_buffer_full_goes_to_python():
    fast = VcpuFastPath(None, 0xE9)
    page = RunPageBuffer()
    assert console_out(fast, page, 0xE9, b"x" * 4000)
    assert not console_out(fast, page, 0xE9, b"y" * 200)  # does not fit in 4096
    assert fast.drain_console() == (b"x" * 4000, 1)


# -- changes applied in C, folded into the record in order ----------------------------

def wrmsr(fast, data):
    page = msr_page(True, data)
    return fast.service(page.run), page


def test_c_applies_a_change_and_the_record_takes_it():
    mc = MigrationControl(encrypted_memory=False)  # value 1
    seen = []
    mc.add_listener(seen.append)
    rules = published(mc)
    fast = fast_for(rules)
    done, page = wrmsr(fast, 0)
    assert done and page.run.msr.error == 0
    assert rules.struct.value == 0  # the value changed in C at once ...
    assert mc.value == 0 and mc.transitions_total == 1  # ... the record on reading
    assert [(t.vcpu, t.old, t.new) for t in seen] == [(0, 1, 0)]
    assert fast.read_counts() == (0, 0, 1, 0)


def test_a_latest_only_listener_hears_once_per_batch_and_every_count_is_kept():
    """The daemon's throttled event needs the newest state only: a flood the C
    path applied reaches it as one call, not one per change."""
    mc = MigrationControl(encrypted_memory=False)
    latest = []
    mc.add_listener(latest.append, latest_only=True)
    fast = fast_for(published(mc))
    for i in range(100):
        assert wrmsr(fast, i & 1)[0]  # 0, 1, 0, ...: 100 changes
    assert mc.transitions_total == 100 and mc.value == 1
    assert [(t.old, t.new) for t in latest] == [(0, 1)]  # the batch's last
    mc.access(0, Op.WRMSR, 0)  # the Python path: heard at once, as every listener
    assert [(t.old, t.new) for t in latest] == [(0, 1), (1, 0)]
    every = []
    mc.add_listener(every.append)  # a listener that needs each change ...
    for i in range(6):
        assert wrmsr(fast, (i + 1) & 1)[0]
    mc.sync()
    assert len(every) == 6 and len(latest) == 2 + 6  # ... and then both hear each
    mc.remove_listener(latest.append)
    mc.remove_listener(every.append)


def test_changes_from_c_and_python_on_several_vcpus_keep_one_order():
    mc = MigrationControl(encrypted_memory=False)
    rules = published(mc, vcpus=3)
    fasts = [fast_for(rules, v) for v in range(3)]
    expected_chain = []
    value = 1
    for i in range(300):
        vcpu, data = i % 3, (i // 2) & 1
        if i % 5 == 0:  # the Python path (as for the first 1,024 accesses)
            mc.access(vcpu, Op.WRMSR, data)
        else:
            assert wrmsr(fasts[vcpu], data)[0]
        if data != value:
            expected_chain.append((vcpu, value, data))
            value = data
    got = [(t.vcpu, t.old, t.new) for t in mc.transitions()]
    assert got == expected_chain and mc.value == value
    times = [t.time for t in mc.transitions()]
    assert times == sorted(times)


def test_a_full_ring_sends_the_change_to_python():
    mc = MigrationControl(encrypted_memory=False)
    rules = published(mc, ring_capacity=4)
    fast = fast_for(rules)
    for data in (0, 1, 0, 1):  # four changes fill the ring: nobody read the record
        assert wrmsr(fast, data)[0]
    done, _ = wrmsr(fast, 0)
    assert not done  # full: C declined, nothing changed
    before = rules.struct.value
    assert before == 1
    mc.access(0, Op.WRMSR, before ^ 1)  # Python drains, then changes
    assert rules.struct.value == before ^ 1
    chain = [(t.old, t.new) for t in mc.transitions()]
    assert all(b[0] == a[1] for a, b in zip(chain, chain[1:])) and chain[-1][1] == before ^ 1


def test_a_journal_sees_every_change_before_it_happens():
    mc = MigrationControl(encrypted_memory=False)
    journal = []
    mc.add_recorder(journal.append)
    rules = published(mc)
    fast = fast_for(rules)
    assert not wrmsr(fast, 0)[0]  # C may not apply it: the journal commits first
    mc.access(0, Op.WRMSR, 0)
    assert [(t.old, t.new) for t in journal] == [(1, 0)] and rules.struct.value == 0
    assert mc.transitions() == [Transition(0, 1, 0, journal[0].time)]


def test_the_drain_reads_transitions_as_the_compiler_lays_them_out():
    from kvmfilter.kvm import fastpath
    t = "struct kvmf_transition"
    assert fastpath._ENTRY.size == ffi.sizeof(t)
    offsets = [ffi.offsetof(t, f) for f in ("seq", "time_ns", "vcpu", "old_value",
                                            "new_value")]
    assert offsets == [0, 8, 16, 20, 24]  # "<QQIII" + padding


def test_a_flood_applied_in_c_is_one_info_line_per_batch(caplog):
    """At --log-level info every Python-path change is logged; changes C applied
    are logged once per fold, with their count - a guest toggling 100,000 times
    a second must not turn into as many log lines (it made a daemon take 6 s
    to stop)."""
    import logging
    mc = MigrationControl(encrypted_memory=False)
    fast = fast_for(published(mc))
    with caplog.at_level(logging.INFO, logger="kvmfilter"):
        for i in range(50):
            assert wrmsr(fast, i & 1)[0]
        mc.sync()
    lines = [r for r in caplog.records if r.getMessage() == "migration_readiness_changed"]
    assert len(lines) == 1 and lines[0].changes == 50 and lines[0].to == 1
    assert mc.transitions_total == 50
