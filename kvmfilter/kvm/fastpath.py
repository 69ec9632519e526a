"""L1: the Python half of the C fast path (``kvmf_run_fast`` in cstubs/kvm_source.c).

Two things are serviced in C, without the GIL, between KVM_RUNs:

- MSR accesses the policy has published a verdict for (``MsrRules``): reads,
  writes of the current value, writes rejected whatever the value.  Every
  write that would change the value still comes to Python.
- OUTs to the console port, collected per vCPU and drained in order.

``VcpuFastPath`` holds one vCPU's side: its counters, which C increments and
Python reads live (never reset, so a query sees accesses the moment they
happen), and its console buffer.  The memory-ordering argument is written
next to the C code.
"""
from __future__ import annotations

from collections import namedtuple

from ._kvm import ffi, lib

NO_PORT = 0x1_0000  # above every I/O port: the C loop collects no console
BUDGET = 4096  # fast exits per return to Python (to drain the console)
CONSOLE_CHUNK = 4096  # console bytes a vCPU collects in C before Python takes them

FastCounts = namedtuple("FastCounts", "read_ok read_gp write_ok write_gp")


class MsrRules:
    """The verdicts for one MSR that C may apply without asking the policy.

    VM-wide: every vCPU's loop reads the same struct.  Written by Python with
    the policy's lock held (``publish``, ``set_value``).
    """

    def __init__(self, index: int):
        self.struct = ffi.new("struct kvmf_msr_fast *")
        self.struct.index = index

    def publish(self, value: int, read_gp: bool, write_all_gp: bool,
                write_gp_mask: int) -> None:
        """Install the rules and enable them: disabled while they change."""
        s = self.struct
        s.enabled = 0
        s.value = value
        s.read_gp = read_gp
        s.write_all_gp = write_all_gp
        s.write_gp_mask = write_gp_mask
        s.enabled = 1

    def set_value(self, value: int) -> None:
        self.struct.value = value

    @property
    def index(self) -> int:
        return self.struct.index

    @property
    def enabled(self) -> bool:
        return bool(self.struct.enabled)

    def decide(self, write: bool, data: int) -> tuple[int, int]:
        """(verdict, value) as C decides: -1 Python decides, 0 ok, 1 #GP."""
        out = ffi.new("uint64_t *")
        verdict = lib.kvmf_fast_decide(self.struct, write, data, out)
        return verdict, out[0]


class VcpuFastPath:
    """One vCPU's fast path: live counters and the console buffer.

    Args:
        rules: the MSR rules (None: no MSR is serviced in C).
        console_port: the port whose OUTs C collects (None: none).
    """

    def __init__(self, rules: MsrRules | None, console_port: int | None):
        self.rules = rules or MsrRules(0)  # disabled rules: every MSR exit to Python
        self.counts = ffi.new("struct kvmf_fast_counts *")
        self._buffer = ffi.new("char[]", CONSOLE_CHUNK)
        self.console = ffi.new("struct kvmf_console *", {
            "port": NO_PORT if console_port is None else console_port,
            "capacity": CONSOLE_CHUNK, "buffer": self._buffer})

    def run(self, vcpu) -> bool:
        """KVM_RUN in C until an exit Python must see (True) or the budget ran out."""
        return vcpu.run_fast(self.rules.struct, self.counts, self.console, BUDGET)

    def service(self, run) -> bool:
        """Service the exit in ``run`` (any run page) if C would: True = done."""
        return bool(lib.kvmf_fast_service(run, self.rules.struct, self.counts, self.console))

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
