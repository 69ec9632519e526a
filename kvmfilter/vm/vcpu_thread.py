"""L4: one vCPU and the thread that runs it, as an explicit state machine.

    CREATED --start--> RUNNING <--park/unpark--> PARKED
       (launched: the thread exists and waits, before its first KVM_RUN)
                         |  ^
                     HLT |  | wake (serve only: power button, pause, stop)
                         v  |
                        HALTED
    any state --stop, a fatal exit, HLT in `run`--> FINISHED

A PARKED vCPU re-entered KVM_RUN once with ``immediate_exit=1``: KVM completed
the MSR or port access it was servicing and ran no guest instruction, so
nothing is half-done and its state may be saved.  A HALTED vCPU is outside
KVM_RUN with its HLT complete: it counts as parked too.

The ``RunControl`` is shared by a machine's vCPU threads: what they are asked
to do (run, park, stop), one condition variable for every change, and where
each vCPU reports its state.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from ..base import StrEnum
from ..kvm.exits import exit_name
from ..kvm.fastpath import VcpuFastPath
from ..kvm.kick import kick
from .dispatch import ExitHandlers, Outcome, StopReason, StopRecord, handle_exit

log = logging.getLogger("kvmfilter.vm")


class VcpuState(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PARKED = "parked"
    HALTED = "halted"
    FINISHED = "finished"


# States in which a vCPU is outside KVM_RUN with nothing in flight.
AT_REST = frozenset({VcpuState.PARKED, VcpuState.HALTED, VcpuState.FINISHED})


class RunControl:
    """What the machine asks of its vCPU threads, under one condition variable."""

    def __init__(self, hlt_parks: bool = False):
        self.cond = threading.Condition()
        self.park_requested = False
        self.stopping = False
        self.wakeups = 0  # bumped to wake HALTED vCPUs
        self.hlt_parks = hlt_parks  # HLT waits for a wake-up instead of ending the vCPU

    def wake_halted(self) -> None:
        with self.cond:
            self.wakeups += 1
            self.cond.notify_all()


class VcpuThread:
    """Runs one vCPU until the machine stops it; see the module docstring.

    Args:
        vcpu: the ``kvm.ioctls.Vcpu``.
        control: the machine's ``RunControl``.
        handlers: the exit tables (``dispatch.ExitHandlers``).
        fast: this vCPU's C fast path, or None for the pure-Python loop.
        on_console: receives console bytes the C fast path collected.
        on_finished: called once when the thread ends.
    """

    def __init__(self, vcpu, control: RunControl, handlers: ExitHandlers,
                 fast: Optional[VcpuFastPath], on_console: Callable[[bytes], None],
                 on_finished: Callable[["VcpuThread"], None]):
        self.vcpu = vcpu
        self.control = control
        self.handlers = handlers
        self.fast = fast
        self._on_console = on_console
        self._on_finished = on_finished
        self.exits: dict[str, int] = {}
        self.state = VcpuState.CREATED
        self.thread = threading.Thread(target=self._main, name=f"vcpu{vcpu.id}", daemon=True)

    @property
    def id(self) -> int:
        return self.vcpu.id

    def launch(self) -> None:
        """Create the thread now; it waits in CREATED, before its first KVM_RUN,
        until ``start()`` (or a stop).  Idempotent."""
        if self.thread.ident is None:
            self.thread.start()

    def start(self) -> None:
        """Let the thread run the guest (launching it first if need be)."""
        self.launch()
        self._set_state(VcpuState.RUNNING)

    def exit_counts(self) -> dict[str, int]:
        """Exits by name so far, the ones the C fast path serviced included."""
        counts = dict(self.exits)
        if self.fast is not None:
            c = self.fast.read_counts()
            for name, n in (("x86_rdmsr", c.read_ok + c.read_gp),
                            ("x86_wrmsr", c.write_ok + c.write_gp)):
                if n:
                    counts[name] = counts.get(name, 0) + n
        return counts

    def kick(self) -> None:
        """Get this vCPU out of KVM_RUN: now if it is in it, else at its next entry."""
        with self.control.cond:
            if self.state is VcpuState.RUNNING and self.thread.ident is not None:
                kick(self.vcpu, self.thread.ident)

    def _set_state(self, state: VcpuState) -> None:
        with self.control.cond:
            self.state = state
            self.control.cond.notify_all()

    # -- the thread ---------------------------------------------------------------

    def _main(self) -> None:
        try:
            self.vcpu.prepare_thread()
            if self._wait_for_start():
                self._loop()
        except Exception as exc:  # a bug must stop the VM, not vanish with the thread
            from ..policy.journal import JournalError
            if isinstance(exc, JournalError):  # an expected failure: no traceback
                log.error("vcpu_stopped_journal_failed", extra={"vcpu": self.id,
                                                                "error": str(exc)})
            else:
                log.exception("vcpu_thread_failed", extra={"vcpu": self.id})
            self.handlers.stop(StopRecord(StopReason.INTERNAL_ERROR, 1,
                                          f"vCPU {self.id}: {type(exc).__name__}: {exc}",
                                          self.id))
        finally:
            self._set_state(VcpuState.FINISHED)
            self._on_finished(self)

    def _wait_for_start(self) -> bool:
        """Wait while CREATED; False if the machine stopped before ``start()``."""
        control = self.control
        with control.cond:
            while self.state is VcpuState.CREATED and not control.stopping:
                control.cond.wait()
            return not control.stopping

    def _loop(self) -> None:
        control = self.control
        vcpu = self.vcpu
        run = vcpu.run_page
        exits = self.exits
        handlers = self.handlers
        fast = self.fast
        while True:
            if control.stopping:
                return
            if control.park_requested:
                self._park()
                continue
            if fast is not None:
                pending = fast.run(vcpu)
                self._drain(fast)
                if not pending:
                    continue
            else:
                vcpu.run()
            name = exit_name(run.exit_reason)
            exits[name] = exits.get(name, 0) + 1
            outcome = handle_exit(handlers, vcpu.id, run)
            if outcome is Outcome.HANDLED:
                continue
            if outcome is Outcome.INTERRUPTED:
                run.immediate_exit = 0
                continue
            if outcome is Outcome.HALTED and control.hlt_parks:
                self._halt()
                continue
            if outcome is Outcome.HALTED:
                log.debug("vcpu_halted", extra={"vcpu": vcpu.id})
            return

    def _drain(self, fast: VcpuFastPath) -> None:
        """Take what the C loop collected: console bytes (in order) and their exits."""
        data, outs = fast.drain_console()
        if outs:
            self._on_console(data)
            self.exits["io"] = self.exits.get("io", 0) + outs

    def _park(self) -> None:
        run = self.vcpu.run_page
        # KVM ABI: an MSR or port access completes only inside the next KVM_RUN;
        # with immediate_exit=1 that KVM_RUN completes it and returns EINTR
        # before any guest instruction runs (api.rst, immediate_exit).
        run.immediate_exit = 1
        self.vcpu.run()
        control = self.control
        with control.cond:
            self.state = VcpuState.PARKED
            control.cond.notify_all()
            while control.park_requested and not control.stopping:
                control.cond.wait()
            self.state = VcpuState.RUNNING
            control.cond.notify_all()
        run.immediate_exit = 0

    def _halt(self) -> None:
        """HLT in a daemon: wait for a wake-up (power button), a park or a stop.

        The guest's HLT is complete (RIP is past it), so a HALTED vCPU is at
        rest: it may be parked and saved as it is.  It resumes as if woken by
        an interrupt, and the guest looks again at what woke it.
        """
        control = self.control
        with control.cond:
            seen = control.wakeups
            self.state = VcpuState.HALTED
            control.cond.notify_all()
            while control.wakeups == seen and not control.stopping:
                control.cond.wait()
            self.state = VcpuState.RUNNING
            control.cond.notify_all()
