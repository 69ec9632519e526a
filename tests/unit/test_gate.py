"""The migration gate: one answer, the same for an embedder and for kvmfilter's VMM."""
from kvmfilter.policy import (EncryptionStatus, MigrationControl, Op, PageMap,
                              blocked_reasons)
from kvmfilter.policy import gate
from kvmfilter.vm.vmm import RunOptions, Vmm


def codes(*args, **kw):
    return [b.code for b in blocked_reasons(*args, **kw)]


def test_an_embedder_gets_the_cli_answer_for_an_encrypted_guest():
    """After READY, an encrypted-memory guest whose page map nobody tracks is
    still blocked: nothing says which of its pages are shared (it once said [])."""
    mc = MigrationControl(encrypted_memory=True)
    mc.access(0, Op.WRMSR, 1)
    assert mc.ready
    assert mc.blocked_reasons() != []
    assert codes(mc) == [gate.STATUS_UNREPORTED]
    with Vmm(None, RunOptions(), image=b"\xf4") as v:  # kvmfilter's own VMM
        v.control.access(0, Op.WRMSR, 1)
        assert v.blocked_reasons() == mc.blocked_reasons(
            v.page_map, *v.encryption_status)


def test_each_reason_once_and_in_order():
    mc = MigrationControl(encrypted_memory=True)
    pm = PageMap()
    assert codes(mc, pm, EncryptionStatus.ENABLED) == [gate.NOT_READY,
                                                       gate.STATUS_NOT_RECEIVED]
    mc.access(0, Op.WRMSR, 1)
    assert codes(mc, pm, EncryptionStatus.ENABLED) == [gate.STATUS_NOT_RECEIVED]
    pm.update(0x1000, 0x2000, True)
    assert codes(mc, pm, EncryptionStatus.ENABLED) == []
    assert codes(mc, pm, EncryptionStatus.DISABLED) == [gate.STATUS_UNREPORTED]
    text = blocked_reasons(mc, pm, EncryptionStatus.UNAVAILABLE, "mask 0x0")[0].text
    assert "mask 0x0" in text and "--" not in text  # worded for a library user


def test_plain_memory_needs_only_ready():
    mc = MigrationControl(encrypted_memory=False)
    assert codes(mc) == []  # starts at 1 (msr.rst)
    mc.access(0, Op.WRMSR, 0)
    assert codes(mc) == [gate.NOT_READY]


def test_not_offered():
    mc = MigrationControl(advertised=False, encrypted_memory=False)
    assert codes(mc) == [gate.NOT_OFFERED]
    assert "bit 17" in mc.blocked_reasons()[0]
