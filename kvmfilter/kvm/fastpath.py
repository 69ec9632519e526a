"""L1: the Python half of the C fast path (``kvmf_run_fast`` in cstubs/kvm_source.c).

Serviced in C, without the GIL, between KVM_RUNs:

- MSR accesses the policy has published a verdict for (``MsrRules``): reads,
  writes of the current value, writes rejected whatever the value - and, when
  no journal must commit first, writes that change the value: C applies them
  and records each in the vCPU's ``TransitionRing`` with a sequence number;
- OUTs to the console port, collected per vCPU and drained in order.

``FastValue`` is the bridge the policy uses (``MigrationControl.attach_value``):
every change of the value, C's or Python's, goes through ``kvmf_change``, and
``drain()`` hands the recorded transitions back in sequence order.
``VcpuFastPath`` is one vCPU's side: live counters (C increments, Python reads;
never reset) and the console buffer.  The memory-ordering argument is written
next to the C code.
"""
from __future__ import annotations

import struct as _struct
from collections import namedtuple

from ._kvm import ffi, lib

NO_PORT = 0x1_0000  # above every I/O port: the C loop collects no console
BUDGET = 4096  # fast exits per return to Python (to drain the console)
CONSOLE_CHUNK = 4096  # console bytes a vCPU collects in C before Python takes them
RING_CAPACITY = 4096  # transitions a vCPU records before Python must take them

FastCounts = namedtuple("FastCounts", "read_ok read_gp write_ok write_gp")
_ENTRY = _struct.Struct("<QQIIII")  # struct kvmf_transition, as the compiler lays it out
DRAIN_BATCH = 4096


class MsrRules:
    """The verdicts for one MSR that C may apply without asking the policy.

    VM-wide: every vCPU's loop reads the same struct.  Written by Python with
    the policy's lock held (``publish``).
    """

    def __init__(self, index: int):
        self.struct = ffi.new("struct kvmf_msr_fast *")
        self.struct.index = index

    def publish(self, value: int, read_gp: bool, write_all_gp: bool, write_gp_mask: int,
                accept_changes: bool = False) -> None:
        """Install the rules and enable them: disabled while they change."""
        s = self.struct
        s.enabled = 0
        s.value = value
        s.read_gp = read_gp
        s.write_all_gp = write_all_gp
        s.write_gp_mask = write_gp_mask
        s.accept_changes = accept_changes
        s.enabled = 1

    @property
    def index(self) -> int:
        return self.struct.index

    @property
    def enabled(self) -> bool:
        return bool(self.struct.enabled)

    def decide(self, write: bool, data: int) -> tuple[int, int]:
        """(verdict, value) as C decides: -1 Python decides, 0 ok, 1 #GP, 2 a
        change C may apply."""
        out = ffi.new("uint64_t *")
        verdict = lib.kvmf_fast_decide(self.struct, write, data, out)
        return verdict, out[0]


class TransitionRing:
    """One vCPU's transitions that the policy has not taken yet (single producer:
    that vCPU's thread; single consumer: the policy, under its lock)."""

    def __init__(self, vcpu: int, capacity: int = RING_CAPACITY):
        if capacity & (capacity - 1):
            raise ValueError("a ring's capacity is a power of two")
        self._entries = ffi.new("struct kvmf_transition[]", capacity)
        self.struct = ffi.new("struct kvmf_ring *", {"vcpu": vcpu, "capacity": capacity,
                                                     "entries": self._entries})


class FastValue:
    """The MSR's value as C holds it, with the transitions C recorded.

    Args:
        rules: the ``MsrRules`` (their ``value`` is the MSR's value).
        rings: vCPU index -> ``TransitionRing``.
    """

    def __init__(self, rules: MsrRules, rings: dict):
        self.rules = rules
        self.rings = rings
        self._ring_ptrs = ffi.new("struct kvmf_ring *[]", [r.struct for r in rings.values()])
        self._last_seq = ffi.new("uint64_t *")
        self._out = ffi.new("struct kvmf_transition[]", DRAIN_BATCH)

    def change(self, vcpu: int, value: int, time: float = 0.0) -> int:
        """Apply a change Python decided: 1 done, 0 it was already so, -1 the ring
        is full (``drain()`` and try again)."""
        return lib.kvmf_change(self.rules.struct, self.rings[vcpu].struct, value,
                               int(time * 1e9))

    def drain(self) -> list[tuple]:
        """Every recorded transition not taken yet, in sequence order, as
        ``(vcpu, old, new, time)`` tuples (``kvmf_drain`` merges the rings)."""
        out = []
        while True:
            n = lib.kvmf_drain(self._ring_ptrs, len(self.rings), self._last_seq, self._out,
                               DRAIN_BATCH)
            if n:
                raw = ffi.buffer(self._out, n * _ENTRY.size)
                out += [(vcpu, old, new, t / 1e9)
                        for _, t, vcpu, old, new, _ in _ENTRY.iter_unpack(raw)]
            if n < DRAIN_BATCH:
                return out

    def load(self, value: int) -> None:
        """A restored value (before any vCPU runs): no transition."""
        self.rules.struct.value = value


class VcpuFastPath:
    """One vCPU's fast path: live counters, the console buffer, its transition ring.

    Args:
        rules: the MSR rules (None: no MSR is serviced in C).
        console_port: the port whose OUTs C collects (None: none).
        ring: where C records the changes it applies (None: it applies none).
    """

    def __init__(self, rules: MsrRules | None, console_port: int | None,
                 ring: TransitionRing | None = None):
        self.rules = rules or MsrRules(0)  # disabled rules: every MSR exit to Python
        self.ring = ring
        self._ring_struct = ring.struct if ring is not None else ffi.NULL
        self.counts = ffi.new("struct kvmf_fast_counts *")
        self._buffer = ffi.new("char[]", CONSOLE_CHUNK)
        self.console = ffi.new("struct kvmf_console *", {
            "port": NO_PORT if console_port is None else console_port,
            "capacity": CONSOLE_CHUNK, "buffer": self._buffer})

    def run(self, vcpu) -> bool:
        """KVM_RUN in C until an exit Python must see (True) or the budget ran out."""
        return vcpu.run_fast(self.rules.struct, self.counts, self.console, self._ring_struct,
                             BUDGET)

    def service(self, run) -> bool:
        """Service the exit in ``run`` (any run page) if C would: True = done."""
        return bool(lib.kvmf_fast_service(run, self.rules.struct, self.counts, self.console,
                                          self._ring_struct))

    def drain_console(self) -> tuple[bytes, int]:
        """The console bytes collected since the last drain, and how many OUT exits."""
        con = self.console
        if not con.length:
            return b"", 0
        data, exits = ffi.buffer(self._buffer, con.length)[:], con.exits
        con.length = con.exits = 0
        return data, exits

    def read_counts(self) -> FastCounts:
        """Accesses serviced in C so far (cumulative; safe from any thread)."""
        c = self.counts
        return FastCounts(c.read_ok, c.read_gp, c.write_ok, c.write_gp)
