"""L4: what to do with one exit - a free function over a decoded exit.

``handle_exit(handlers, vcpu, run)`` decodes the run page, routes the exit to
the MSR, port or hypercall tables, writes the reply back, and returns an
``Outcome`` (Firecracker's shape).  Exits that end the VM pass a ``StopRecord``
to ``handlers.stop``.  It works on any run page, so tests drive it with pages
filled by hand (how the KVM_HC_MAP_GPA_RANGE path is tested on hosts whose KVM
never delivers that exit).
"""
from __future__ import annotations

import logging
from collections import namedtuple
from typing import Callable

from ..base import StrEnum
from ..kvm import exits
from ..kvm import abi
from ..kvm.exits import (HltExit, HypercallExit, HypercallReply, InterruptedExit, IoExit,
                         MsrExit, ShutdownExit, apply, decode)

log = logging.getLogger("kvmfilter.vm")


class Outcome(StrEnum):
    HANDLED = "handled"          # reply written: re-enter the guest
    INTERRUPTED = "interrupted"  # KVM_RUN was kicked: look at what was asked
    HALTED = "halted"            # HLT: this vCPU has nothing to do
    STOPPED = "stopped"          # the VM is stopping (handlers.stop has the reason)


class StopReason(StrEnum):
    """Why a VM stopped: the run report's ``exit.reason``."""
    HLT = "hlt"
    DEBUG_EXIT = "debug_exit"
    SHUTDOWN = "shutdown"
    TIMEOUT = "timeout"
    INTERNAL_ERROR = "internal_error"
    FAIL_ENTRY = "fail_entry"
    UNHANDLED = "unhandled"
    QUIT = "quit"                # the daemon stopped the guest
    INTERRUPTED = "interrupted"  # the VMM was interrupted (Ctrl-C, an exception)


# Reasons that mean the VMM or KVM failed rather than the guest ending.
ERROR_REASONS = frozenset({StopReason.INTERNAL_ERROR, StopReason.FAIL_ENTRY,
                           StopReason.UNHANDLED})


class StopRecord(namedtuple("StopRecord", "reason code detail vcpu", defaults=(0, None, None))):
    """Why the VM stopped (the run report's ``exit``)."""
    __slots__ = ()

    def to_json(self) -> dict:
        return {"reason": self.reason, "code": self.code, "detail": self.detail}


class ExitHandlers:
    """The tables ``handle_exit`` routes to.

    Args:
        msr: MSR index -> ``handler(vcpu, MsrExit) -> MsrReply``.
        ports: a ``PortTable``.
        hypercalls: hypercall nr -> ``handler(vcpu, HypercallExit) -> int`` (RAX).
        stop: called with the ``StopRecord`` of an exit that ends the VM.
    """

    def __init__(self, msr: dict, ports, hypercalls: dict,
                 stop: Callable[[StopRecord], None]):
        self.msr = msr
        self.ports = ports
        self.hypercalls = hypercalls
        self.stop = stop


def handle_exit(handlers: ExitHandlers, vcpu: int, run) -> Outcome:
    """Service the exit in ``run`` (any run page, also a hand-filled one)."""
    ex = decode(run)
    kind = type(ex)
    if kind is MsrExit:
        handler = handlers.msr.get(ex.index)
        if handler is None:
            handlers.stop(StopRecord(StopReason.UNHANDLED, 1,
                                     f"{ex.instruction} of MSR {ex.index:#x} exited to "
                                     "userspace but no handler is registered", vcpu))
            return Outcome.STOPPED
        apply(run, handler(vcpu, ex))
        return Outcome.HANDLED
    if kind is IoExit:
        data = handlers.ports.handle(vcpu, ex)
        if not ex.is_out:
            apply(run, exits.IoInReply(data or b""))
        return Outcome.HANDLED
    if kind is InterruptedExit:
        return Outcome.INTERRUPTED
    if kind is HltExit:
        return Outcome.HALTED
    if kind is HypercallExit:
        handler = handlers.hypercalls.get(ex.nr)
        # KVM ABI: linux/kvm_para.h: an unknown hypercall returns -KVM_ENOSYS.
        apply(run, HypercallReply(-abi.KVM_ENOSYS if handler is None else handler(vcpu, ex)))
        return Outcome.HANDLED
    handlers.stop(stop_record(vcpu, ex))
    return Outcome.STOPPED


def stop_record(vcpu: int, ex) -> StopRecord:
    """The StopRecord for an exit that ends the VM."""
    kind = type(ex)
    if kind is ShutdownExit:
        return StopRecord(StopReason.SHUTDOWN, 1, "triple fault: the vCPU shut down", vcpu)
    if kind is exits.FailEntryExit:
        return StopRecord(StopReason.FAIL_ENTRY, 1, "hardware entry failure reason "
                          f"{ex.hardware_entry_failure_reason:#x} on CPU {ex.cpu}", vcpu)
    if kind is exits.InternalErrorExit:
        return StopRecord(StopReason.INTERNAL_ERROR, 1, f"KVM internal error, suberror "
                          f"{ex.suberror}, data {[hex(d) for d in ex.data]}", vcpu)
    return StopRecord(StopReason.UNHANDLED, 1,
                      f"exit reason {ex.reason} ({ex.name}) is not serviced", vcpu)

