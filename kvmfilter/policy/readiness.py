"""L3: the MSR_KVM_MIGRATION_CONTROL policy and the readiness record.

Pure: standard library only, no file descriptors, importable without /dev/kvm.
This is what a custom VMM embeds: hand it every access to MSR 0x4b564d08 as
``control.access(vcpu, op, data)`` and apply the verdict (``gp`` -> inject
#GP, else complete the access; for RDMSR the guest reads ``verdict.value``).

The rules (Documentation/virt/kvm/x86/msr.rst, MSR_KVM_MIGRATION_CONTROL, and
the review of the 2021 SEV live-migration series; docs/kvm-abi.md):
- the MSR exists only if CPUID 0x40000001.EAX bit 17 is advertised; if not,
  every RDMSR and WRMSR gets #GP;
- WRMSR with any bit but bit 0 (KVM_MIGRATION_READY) set gets #GP, value unchanged;
- WRMSR 0 or 1 is accepted; the value is VM-wide and the last write wins;
- RDMSR returns the value; it starts at 0 for a VM with encrypted memory,
  1 for one without.

Memory stays bounded however long a guest runs: the first ``ACCESS_LOG_LIMIT``
accesses and the last ``HISTORY_LIMIT`` transitions are kept, with totals;
a journal (``ReadinessJournal``) keeps every transition.

A VMM with a fast path may keep the value itself (``attach_value``): then
every change, the policy's or the fast path's, goes through that holder, which
records them in order; the policy folds them into its record whenever it is
read (``sync``).  Without a recorder the fast path may apply changes itself
(``fast_rules()["accept_changes"]``): they reach the record, the log and the
listeners late, never out of order and never lost.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque, namedtuple
from typing import Callable, Iterable, Optional

from ..base import BadInput, StrEnum

log = logging.getLogger("kvmfilter.policy")

MSR_KVM_MIGRATION_CONTROL = 0x4B56_4D08  # asm/kvm_para.h
KVM_MIGRATION_READY = 1 << 0  # asm/kvm_para.h
KVM_FEATURE_MIGRATION_CONTROL = 17  # asm/kvm_para.h: CPUID 0x40000001.EAX bit

ACCESS_LOG_LIMIT = 1024  # the run report keeps the first 1024 accesses, in order
HISTORY_LIMIT = 1024  # ... and the last 1024 transitions (the journal has all)


class Op(StrEnum):
    """A guest access to the MSR."""
    RDMSR = "rdmsr"
    WRMSR = "wrmsr"


class VerdictName(StrEnum):
    OK = "ok"
    GP = "gp"


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
    def name(self) -> VerdictName:
        return VerdictName.GP if self.gp else VerdictName.OK


class Transition(namedtuple("Transition", "vcpu old new time")):
    """A change of the value; ``time`` in seconds since the epoch."""
    __slots__ = ()

    def to_json(self) -> dict:
        return {"vcpu": self.vcpu, "from": self.old, "to": self.new,
                "time": rfc3339(self.time)}


# A source of accesses a VMM serviced itself with ``fast_rules()``: returns
# (vcpu, op, verdict, count) rows, cumulative, read live whenever counts are.
CountSource = Callable[[], Iterable[tuple]]


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
        # Re-entrant: a listener may read the record (it runs under the lock).
        self._lock = threading.RLock()
        self._holder = None  # where the value lives when a fast path keeps it
        self._syncing = False
        self._recorders: list = []  # callables taking a Transition, before the change
        self._listeners: list = []  # callables taking a Transition, after it
        self._latest_listeners: list = []  # the same, content with the newest of a batch
        self._count_sources: list[CountSource] = []
        self._since = clock()  # when the value last changed (or the VM was created)
        self.accesses: list[dict] = []
        self._accesses_total = 0
        self._verdicts = {VerdictName.OK: 0, VerdictName.GP: 0}
        self._per_vcpu: dict[int, dict[str, int]] = {}
        self._history: deque[Transition] = deque(maxlen=HISTORY_LIMIT)
        self._transitions_total = 0

    # -- the policy -----------------------------------------------------------

    def decide(self, op: str, data: int, value: int) -> Verdict:
        """The rule alone: no state, no record.  ``value`` is the current value."""
        if op != Op.WRMSR and op != Op.RDMSR:
            raise ValueError(f"op must be {Op.RDMSR!s} or {Op.WRMSR!s}, not {op!r}")
        if not self.advertised:
            return Verdict(True, value)
        if op == Op.RDMSR:
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
        op = op if type(op) is Op else Op(op)
        with self._lock:
            self._sync_locked()
            old = self._value
            verdict = self.decide(op, data, old)
            transition = None
            if op is Op.WRMSR and not verdict.gp and verdict.value != old:
                transition = Transition(vcpu, old, verdict.value, self._clock())
                for recorder in self._recorders:
                    recorder(transition)
            self._count(vcpu, op, verdict.name, 1)
            if len(self.accesses) < ACCESS_LOG_LIMIT:
                self.accesses.append({"vcpu": vcpu, "op": op,
                                      "data": data if op is Op.WRMSR
                                      else 0 if verdict.gp else verdict.value,
                                      "verdict": verdict.name})
            if transition is not None:
                holder = self._holder
                if holder is None:
                    self._transition(transition)
                else:  # through the holder, so it takes its place in the one order
                    if holder.change(vcpu, transition.new, transition.time) < 0:
                        self._sync_locked()  # its record was full: take it, then again
                        holder.change(vcpu, transition.new, transition.time)
                    self._sync_locked()
            return verdict

    def _count(self, vcpu: int, op: Op, verdict: VerdictName, n: int) -> None:
        self._accesses_total += n
        self._verdicts[verdict] += n
        counts = self._per_vcpu.get(vcpu)
        if counts is None:
            counts = self._per_vcpu[vcpu] = {Op.RDMSR: 0, Op.WRMSR: 0}
        counts[op] += n

    def _transition(self, t: Transition) -> None:
        self._value = t.new
        self._since = t.time
        self._history.append(t)
        self._transitions_total += 1
        if log.isEnabledFor(logging.INFO):
            log.info("migration_readiness_changed",
                     extra={"vcpu": t.vcpu, "from": t.old, "to": t.new, "ready": bool(t.new)})
        for listener in self._listeners:
            listener(t)
        for listener in self._latest_listeners:
            listener(t)

    # -- a value a fast path keeps -------------------------------------------------

    def attach_value(self, holder) -> None:
        """Let ``holder`` keep the value (kvmfilter's C fast path does).

        ``holder.change(vcpu, value, time)`` applies a change the policy decided
        (1 done, 0 already so, -1 full: the policy syncs and tries again);
        ``holder.drain()`` returns every change made since the last drain, the
        holder's own included, in order, as ``(vcpu, old, new, time)``;
        ``holder.load(value)`` sets a restored value.
        """
        self._holder = holder

    def sync(self) -> None:
        """Fold the changes the holder recorded into the record (in order)."""
        with self._lock:
            self._sync_locked()

    def _sync_locked(self) -> None:
        if self._holder is None or self._syncing:
            return  # a listener reading the record while a sync runs: it is current
        self._syncing = True
        try:
            changes = self._holder.drain()
            if not changes:
                return
            if self._listeners:
                for change in changes:
                    self._transition(Transition(*change))
                return
            # Nobody needs each change: only the totals, the latest value and
            # the last HISTORY_LIMIT changes matter (a flood folds in one step).
            self._history.extend(Transition(*c) for c in changes[-HISTORY_LIMIT:])
            self._transitions_total += len(changes)
            self._value = changes[-1][2]
            self._since = changes[-1][3]
            last = self._history[-1]
            if log.isEnabledFor(logging.INFO):  # one line per batch: a flood is not a log flood
                log.info("migration_readiness_changed",
                         extra={"vcpu": last.vcpu, "from": last.old, "to": last.new,
                                "ready": bool(last.new), "changes": len(changes)})
            for listener in self._latest_listeners:
                listener(last)
        finally:
            self._syncing = False

    # -- accesses serviced outside access() ------------------------------------

    @property
    def lock(self) -> threading.RLock:
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
                "write_gp_mask": ~KVM_MIGRATION_READY & 0xFFFF_FFFF_FFFF_FFFF,
                # Changes may skip the policy only when nothing must commit first.
                "accept_changes": not self._recorders and self._holder is not None}

    def add_count_source(self, source: CountSource) -> None:
        """Count accesses a VMM serviced itself with ``fast_rules()``.

        ``source()`` returns cumulative (vcpu, op, verdict, count) rows; it is
        read whenever the totals are, so they are live while vCPUs run.
        """
        self._count_sources.append(source)

    def _counted(self) -> tuple[int, dict, dict]:
        """(total, verdicts, per_vcpu) including every count source."""
        with self._lock:
            self._sync_locked()
            total = self._accesses_total
            verdicts = dict(self._verdicts)
            per_vcpu = {v: dict(c) for v, c in self._per_vcpu.items()}
        for source in self._count_sources:
            for vcpu, op, verdict, n in source():
                if n:
                    total += n
                    verdicts[verdict] += n
                    counts = per_vcpu.setdefault(vcpu, {Op.RDMSR: 0, Op.WRMSR: 0})
                    counts[op] += n
        return total, verdicts, per_vcpu

    @property
    def accesses_total(self) -> int:
        return self._counted()[0]

    @property
    def verdicts(self) -> dict:
        return self._counted()[1]

    @property
    def per_vcpu(self) -> dict:
        return self._counted()[2]

    # -- observers ------------------------------------------------------------

    def add_recorder(self, recorder) -> None:
        """Call ``recorder(transition)`` before every change, in order, under the
        lock; if it raises, the change does not happen (a journal's commit)."""
        self._recorders.append(recorder)

    def add_listener(self, listener, latest_only: bool = False) -> None:
        """Call ``listener(transition)`` after every change, in order, under the lock.

        ``latest_only``: the listener needs only the newest state (a throttled
        event, say).  Changes a fast path applied may then reach it as one call
        per batch, with the batch's last transition; ``transitions_total`` has
        them all.
        """
        (self._latest_listeners if latest_only else self._listeners).append(listener)

    def remove_listener(self, listener) -> None:
        with self._lock:
            for listeners in (self._listeners, self._latest_listeners):
                if listener in listeners:
                    listeners.remove(listener)

    @property
    def last_changed_by(self) -> Optional[int]:
        """The vCPU whose write made the last change (None: no change yet)."""
        with self._lock:
            self._sync_locked()
            return self._history[-1].vcpu if self._history else None

    @property
    def value(self) -> int:
        with self._lock:
            self._sync_locked()
            return self._value

    @property
    def since(self) -> float:
        """When the value last changed (or the VM was created), seconds since the epoch."""
        with self._lock:
            self._sync_locked()
            return self._since

    @property
    def ready(self) -> bool:
        """The guest has announced it may be live-migrated (and could say so)."""
        return self.advertised and bool(self.value & KVM_MIGRATION_READY)

    @property
    def transitions_total(self) -> int:
        with self._lock:
            self._sync_locked()
            return self._transitions_total

    def transitions(self) -> list[Transition]:
        """The most recent transitions (at most HISTORY_LIMIT), oldest first."""
        with self._lock:
            self._sync_locked()
            return list(self._history)

    def blocked_reasons(self, page_map=None, encryption_status=None,
                        detail: str = "") -> list[str]:
        """Why the guest may not be live-migrated now; empty when it may.

        The same answer kvmfilter's own VMM gives: see ``gate.blocked_reasons``
        for the arguments (without them, an encrypted-memory VM is blocked:
        nothing says which of its pages are shared).
        """
        from .gate import blocked_reasons
        return [b.text for b in blocked_reasons(self, page_map, encryption_status, detail)]

    def snapshot(self) -> dict:
        """The run report's ``migration`` section (docs/contracts.md)."""
        total, verdicts, per_vcpu = self._counted()
        with self._lock:
            history = [t.to_json() for t in self._history]
            return {
                "advertised": self.advertised,
                "value": self._value,
                "ready": self.advertised and bool(self._value & KVM_MIGRATION_READY),
                "initial_value": self.initial_value,
                "accesses": list(self.accesses),
                "accesses_total": total,
                "verdicts": verdicts,
                "per_vcpu": {str(v): c for v, c in sorted(per_vcpu.items())},
                "transitions": history,
                "transitions_total": self._transitions_total,
                "transitions_omitted": self._transitions_total - len(history),
                "since": rfc3339(self._since),
            }

    # -- carrying the state to another VMM (snapshots, migration) ---------------

    def export_state(self) -> dict:
        """Everything above as plain JSON, counts from every source folded in.

        Take it with the vCPUs parked, so no access races the copy.
        """
        total, verdicts, per_vcpu = self._counted()
        with self._lock:
            return {"advertised": self.advertised,
                    "encrypted_memory": self.encrypted_memory,
                    "initial_value": self.initial_value,
                    "value": self._value,
                    "since": self._since,
                    "accesses": list(self.accesses),
                    "accesses_total": total,
                    "verdicts": verdicts,
                    "per_vcpu": {str(v): c for v, c in per_vcpu.items()},
                    "history": [list(t) for t in self._history],
                    "transitions_total": self._transitions_total}

    @classmethod
    def from_state(cls, state: dict, clock=time.time) -> "MigrationControl":
        """A MigrationControl that continues where ``export_state`` left off."""
        mc = cls(advertised=bool(state.get("advertised")),
                 encrypted_memory=bool(state.get("encrypted_memory")), clock=clock)
        mc.load_state(state)
        return mc

    def load_state(self, state: dict) -> None:
        """Continue where ``export_state`` left off, keeping this object's
        recorders and listeners (a VMM restoring into a VM it wired already).

        Raises:
            BadInput: the state is not one ``export_state`` wrote, or describes
                another kind of VM (advertised / encrypted memory differ).
        """
        try:
            if (bool(state["advertised"]), bool(state["encrypted_memory"])) != \
                    (self.advertised, self.encrypted_memory):
                raise ValueError("advertised/encrypted_memory differ from this VM's")
            value = int(state["value"])
            if value & ~KVM_MIGRATION_READY or int(state["initial_value"]) != self.initial_value:
                raise ValueError("value or initial value out of range")
            since = float(state["since"])
            accesses = [{"vcpu": int(a["vcpu"]), "op": Op(a["op"]), "data": int(a["data"]),
                         "verdict": VerdictName(a["verdict"])}
                        for a in state["accesses"][:ACCESS_LOG_LIMIT]]
            total = int(state["accesses_total"])
            verdicts = {VerdictName.OK: 0, VerdictName.GP: 0}
            verdicts.update({VerdictName(k): int(v) for k, v in state["verdicts"].items()})
            per_vcpu = {int(v): {Op(op): int(n) for op, n in c.items()}
                        for v, c in state["per_vcpu"].items()}
            history = [Transition(int(v), int(o), int(n), float(t))
                       for v, o, n, t in state["history"][-HISTORY_LIMIT:]]
            transitions_total = int(state["transitions_total"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadInput(f"migration-control state is malformed: {exc}") from None
        with self._lock:
            self._value = value
            self._since = since
            self.accesses = accesses
            self._accesses_total = total
            self._verdicts = verdicts
            self._per_vcpu = per_vcpu
            self._history.clear()
            self._history.extend(history)
            self._transitions_total = transitions_total
            if self._holder is not None:
                self._holder.drain()  # anything recorded before belongs to the old state
                self._holder.load(value)

