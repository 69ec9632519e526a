"""L3: the MSR_KVM_MIGRATION_CONTROL policy and the readiness record.

Pure: no cffi, no file descriptors, importable without /dev/kvm.  This is what
a custom VMM embeds: hand it every access to MSR 0x4b564d08 as
``control.access(vcpu, op, data)`` and apply the verdict (``gp`` -> inject #GP,
else complete the access; for RDMSR the guest reads ``verdict.value``).

The rules (Documentation/virt/kvm/x86/msr.rst, MSR_KVM_MIGRATION_CONTROL, and
the review of the 2021 SEV live-migration series):
- the MSR exists only if CPUID 0x40000001.EAX bit 17 is advertised; if not,
  every RDMSR and WRMSR gets #GP;
- WRMSR with any bit but bit 0 (KVM_MIGRATION_READY) set gets #GP, value unchanged;
- WRMSR 0 or 1 is accepted; the value is VM-wide and the last write wins;
- RDMSR returns the value; it starts at 0 for a VM with encrypted memory,
  1 for one without.
"""
from __future__ import annotations

import logging
import threading
import time
from array import array
from collections import namedtuple

log = logging.getLogger("kvmfilter.migration")

MSR_KVM_MIGRATION_CONTROL = 0x4B56_4D08  # asm/kvm_para.h
KVM_MIGRATION_READY = 1 << 0  # asm/kvm_para.h
KVM_FEATURE_MIGRATION_CONTROL = 17  # asm/kvm_para.h: CPUID 0x40000001.EAX bit

RDMSR = "rdmsr"
WRMSR = "wrmsr"
OK = "ok"
GP = "gp"

ACCESS_LOG_LIMIT = 1024  # run report: the first 1024 accesses, in order


def rfc3339(t: float) -> str:
    """Seconds since the epoch -> RFC 3339 UTC with microseconds."""
    seconds = int(t // 1)
    micros = int(round((t - seconds) * 1e6))
    if micros == 1_000_000:
        seconds, micros = seconds + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"


class Verdict(namedtuple("Verdict", "gp value")):
    """What to do with one access.  ``value``: the MSR value after it (for
    RDMSR, what the guest reads)."""
    __slots__ = ()

    @property
    def name(self) -> str:
        return GP if self.gp else OK


class Transition(namedtuple("Transition", "vcpu old new time")):
    """A change of the value; ``time`` in seconds since the epoch."""
    __slots__ = ()

    def to_json(self) -> dict:
        return {"vcpu": self.vcpu, "from": self.old, "to": self.new,
                "time": rfc3339(self.time)}


class MigrationControl:
    """The VM-wide migration-control MSR and its record.  Thread-safe.

    Args:
        advertised: CPUID 0x40000001.EAX bit 17 is set for the guest.
        encrypted_memory: the VM models encrypted memory (initial value 0);
            False models a plain VM (initial value 1).
        clock: seconds since the epoch (tests pass a fake one).
    """

    def __init__(self, advertised: bool = True, encrypted_memory: bool = True,
                 clock=time.time):
        self.advertised = advertised
        self.encrypted_memory = encrypted_memory
        self.initial_value = 0 if encrypted_memory else KVM_MIGRATION_READY
        self._value = self.initial_value
        self._clock = clock
        self._lock = threading.Lock()
        self._recorders: list = []  # callables taking a Transition, before the change
        self._listeners: list = []  # callables taking a Transition, after it
        self.since = clock()  # when the value last changed (or the VM was created)
        self.accesses: list[dict] = []
        self.accesses_total = 0
        self.verdicts = {OK: 0, GP: 0}
        self.per_vcpu: dict[int, dict[str, int]] = {}
        # Transitions, kept compactly: a guest may toggle the MSR millions of times.
        self._t_vcpu = array("I")
        self._t_old = array("B")
        self._t_new = array("B")
        self._t_time = array("d")

    # -- the policy -----------------------------------------------------------

    def decide(self, op: str, data: int, value: int) -> Verdict:
        """The rule alone: no state, no record.  ``value`` is the current value."""
        if op != WRMSR and op != RDMSR:
            raise ValueError(f"op must be {RDMSR!r} or {WRMSR!r}, not {op!r}")
        if not self.advertised:
            return Verdict(True, value)
        if op == RDMSR:
            return Verdict(False, value)
        if data & ~KVM_MIGRATION_READY:
            return Verdict(True, value)
        return Verdict(False, data)

    def access(self, vcpu: int, op: str, data: int = 0) -> Verdict:
        """Decide one guest access, record it, and notify listeners of a change.

        A change goes first to the recorders (the journal): if one raises, the
        exception propagates and nothing changed - the VMM must not complete
        the guest's write.  Then the value changes and the listeners run.  All
        of it before this returns, so before the vCPU re-enters the guest.
        """
        with self._lock:
            old = self._value
            verdict = self.decide(op, data, old)
            transition = None
            if op == WRMSR and not verdict.gp and verdict.value != old:
                transition = Transition(vcpu, old, verdict.value, self._clock())
                for recorder in self._recorders:
                    recorder(transition)
            self.accesses_total += 1
            self.verdicts[verdict.name] += 1
            counts = self.per_vcpu.get(vcpu)
            if counts is None:
                counts = self.per_vcpu[vcpu] = {RDMSR: 0, WRMSR: 0}
            counts[op] += 1
            if len(self.accesses) < ACCESS_LOG_LIMIT:
                self.accesses.append({"vcpu": vcpu, "op": op,
                                      "data": data if op == WRMSR
                                      else 0 if verdict.gp else verdict.value,
                                      "verdict": verdict.name})
            if transition is not None:
                self._transition(transition)
            return verdict

    def _transition(self, t: Transition) -> None:
        self._value = t.new
        self.since = t.time
        self._t_vcpu.append(t.vcpu)
        self._t_old.append(t.old)
        self._t_new.append(t.new)
        self._t_time.append(t.time)
        log.info("migration_readiness_changed",
                 extra={"vcpu": t.vcpu, "from": t.old, "to": t.new, "ready": bool(t.new)})
        for listener in self._listeners:
            listener(t)

    # -- the fast path ----------------------------------------------------------

    @property
    def lock(self) -> threading.Lock:
        """Held while deciding and while notifying listeners."""
        return self._lock

    def fast_rules(self) -> dict:
        """The verdicts that change nothing, as rules a VMM may apply without
        calling ``access()`` (kvmfilter's C run loop does).  Call with ``lock``
        held; keep ``value`` current with a listener.  Writes that would change
        the value are never covered: those must come to ``access()``.
        """
        return {"value": self._value,
                "read_gp": not self.advertised,
                "write_all_gp": not self.advertised,
                "write_gp_mask": ~KVM_MIGRATION_READY & 0xFFFF_FFFF_FFFF_FFFF}

    def record_bulk(self, vcpu: int, op: str, verdict: str, count: int) -> None:
        """Count ``count`` accesses a VMM serviced itself with ``fast_rules()``."""
        if count <= 0:
            return
        with self._lock:
            self.accesses_total += count
            self.verdicts[verdict] += count
            counts = self.per_vcpu.get(vcpu)
            if counts is None:
                counts = self.per_vcpu[vcpu] = {RDMSR: 0, WRMSR: 0}
            counts[op] += count

    # -- observers ------------------------------------------------------------

    def add_recorder(self, recorder) -> None:
        """Call ``recorder(transition)`` before every change, in order, under the
        lock; if it raises, the change does not happen (a journal's commit)."""
        self._recorders.append(recorder)

    def add_listener(self, listener) -> None:
        """Call ``listener(transition)`` after every change, in order, under the lock."""
        self._listeners.append(listener)

    @property
    def last_changed_by(self) -> int | None:
        """The vCPU whose write made the last change (None: no change yet)."""
        return self._t_vcpu[-1] if self._t_vcpu else None

    @property
    def value(self) -> int:
        return self._value

    @property
    def ready(self) -> bool:
        """The guest has announced it may be live-migrated (and could say so)."""
        return self.advertised and bool(self._value & KVM_MIGRATION_READY)

    @property
    def transitions_total(self) -> int:
        return len(self._t_new)

    def transitions(self) -> list[Transition]:
        with self._lock:
            return [Transition(*row) for row in
                    zip(self._t_vcpu, self._t_old, self._t_new, self._t_time)]

    def blocked_reasons(self) -> list[str]:
        """Why the guest may not be live-migrated now; empty when it may."""
        reasons = []
        if not self.advertised:
            reasons.append("The guest was not offered migration control (CPUID "
                           "0x40000001 bit 17 is clear), so it cannot announce that "
                           "it is ready; start the VM without --no-migration-control.")
        elif not self.ready:
            reasons.append("The guest has not announced that it is ready for live "
                           "migration (MSR_KVM_MIGRATION_CONTROL is 0); wait for it "
                           "to write KVM_MIGRATION_READY.")
        return reasons

    def snapshot(self) -> dict:
        """The run report's ``migration`` section (design.md)."""
        transitions = [t.to_json() for t in self.transitions()]
        with self._lock:
            return {
                "advertised": self.advertised,
                "value": self._value,
                "ready": self.ready,
                "initial_value": self.initial_value,
                "accesses": list(self.accesses),
                "accesses_total": self.accesses_total,
                "verdicts": dict(self.verdicts),
                "per_vcpu": {str(v): dict(c) for v, c in sorted(self.per_vcpu.items())},
                "transitions": transitions,
                "since": rfc3339(self.since),
                "blocked_reasons": self.blocked_reasons(),
            }
