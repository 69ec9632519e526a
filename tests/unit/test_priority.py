"""The migration threads' priority raise, without KVM (the KVM test checks a
real migration's threads)."""
import os
import threading

import pytest

from kvmfilter.migrate import priority


def nice():
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a priority needs CAP_SYS_NICE (root)")
def test_raised_for_the_block_and_restored_after_it_even_on_an_error():
    before = nice()
    with pytest.raises(RuntimeError):
        with priority.raised():
            assert nice() == max(-20, before - priority.RAISE)
            raise RuntimeError("the job failed")
    assert nice() == before


def test_without_the_capability_the_block_runs_at_the_usual_priority(monkeypatch):
    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")

    before = nice()
    monkeypatch.setattr(priority.os, "setpriority", refuse)
    ran = []
    with priority.raised():
        ran.append(nice())
    assert ran == [before] and nice() == before
