"""The MSR path: what one access to 0x4b564d08 costs, against a C loop.

Every case runs a real-mode guest loop on real KVM and is reported as the
marginal cost per exit, (T(2n) - T(n)) / n, so VM set-up, thread start and
kvmfilter's first 1,024 accesses (logged in Python) cancel out.  Which path
each case takes (BENCHMARKS.md says it too):

- ``wrmsr`` / ``rdmsr``: the same value every time, so after the first access
  the C fast path serves each exit (the policy published that verdict); the
  comparison is C with C, kept to show the fast path costs nothing;
- ``wrmsr_transition``: WRMSR 1, WRMSR 0, ... - every write changes the value,
  the case that matters.  Without a journal the policy lets C apply a valid
  change itself and hands it to the record afterwards; with a journal every
  change goes to Python, which commits it (fsync) before the vCPU re-enters;
- ``c_loop``: ``kvmf_bench_c_loop``, the least a VMM can do per exit (accept
  every write, answer every read with 1), on the same guest and VM set-up;
- ``in_kernel``: the same loop on MSR_KVM_POLL_CONTROL (0x4b564d05), which KVM
  handles without leaving the kernel: the floor.
"""
from __future__ import annotations

import statistics
import tempfile

from ..kvm import abi
from ..kvm.baseline import c_loop
from ..policy.readiness import MSR_KVM_MIGRATION_CONTROL
from ..vm.vmm import RunOptions, Vmm
from .common import interleave, marginal, summarize, timed

MSR_KVM_POLL_CONTROL = abi.MSR_KVM_POLL_CONTROL
WRMSR_OPCODE, RDMSR_OPCODE = "0f30", "0f32"


def msr_loop(msr: int, insn: str, count: int, halt: bool = False) -> bytes:
    """Real-mode guest: ``count`` times RDMSR/WRMSR ``msr`` (EAX=1), then exit 0 (or HLT)."""
    return bytes.fromhex(
        "66b9" + msr.to_bytes(4, "little").hex()      # mov ecx, msr
        + "66b801000000"                               # mov eax, 1
        + "6631d2"                                     # xor edx, edx
        + "66bf" + count.to_bytes(4, "little").hex()   # mov edi, count
        + insn                                         # 1: wrmsr / rdmsr
        + "664f"                                       #    dec edi
        + "75fa"                                       #    jnz 1b
        + ("f4" if halt else "b000e6f4f4"))            # hlt / out 0xf4, 0; hlt


def toggle_loop(count: int) -> bytes:
    """Real-mode guest: ``count`` times (WRMSR 1, WRMSR 0), then exit 0: 2 x count
    writes, every one a change of the value."""
    return bytes.fromhex(
        "66b9" + MSR_KVM_MIGRATION_CONTROL.to_bytes(4, "little").hex()  # mov ecx, msr
        + "6631d2"                                     # xor edx, edx
        + "66bf" + count.to_bytes(4, "little").hex()   # mov edi, count
        + "66b801000000" "0f30"                        # 1: mov eax, 1; wrmsr
        + "6631c0" "0f30"                              #    xor eax, eax; wrmsr
        + "664f" "75f0"                                #    dec edi; jnz 1b
        + "b000e6f4f4")                                # out 0xf4, 0; hlt


class MsrBench:
    def __init__(self, kvm, exits: int, rounds: int):
        self.kvm = kvm
        self.exits = exits
        self.rounds = rounds

    def _vmm_s(self, image: bytes, fast_path: bool = True, journal: str | None = None,
               plain: bool = False) -> float:
        with Vmm(None, RunOptions(timeout=300, fast_path=fast_path, journal=journal,
                                  plain_memory=plain),
                 image=image, label="<bench>") as v:
            result = v.run(self.kvm)
        if result.exit.reason != "debug_exit":
            raise RuntimeError(f"bench guest stopped with {result.exit}")
        return result.elapsed_s

    def _c_loop_s(self, image: bytes, exits: int) -> float:
        # The same VM set-up (filter, CPUID, real mode), vCPU 0 driven by C.
        with Vmm(None, RunOptions(timeout=300), image=image, label="<bench>") as v:
            vcpu = v.prepare(self.kvm)[0]
            n, elapsed = c_loop(vcpu, MSR_KVM_MIGRATION_CONTROL)
        if n != exits:
            raise RuntimeError(f"the C loop serviced {n} exits, expected {exits}")
        return elapsed

    def _report(self, samples: dict, baseline: str, subject: str) -> dict:
        out = {}
        for name, values in samples.items():
            out[name] = summarize([v for v, _ in values], "ns")
            out[name]["cpu_share"] = round(statistics.median(s for _, s in values), 3)
        out["ratio_vs_c"] = out[subject]["median_ns"] / out[baseline]["median_ns"]
        return out

    def round_trip(self, insn: str) -> dict:
        """The same value every time: served by the C fast path after the first."""
        n, trapped = self.exits, MSR_KVM_MIGRATION_CONTROL
        cases = {
            "kvmfilter": marginal(
                lambda k: self._vmm_s(msr_loop(trapped, insn, k)), n),
            "c_loop": marginal(
                lambda k: self._c_loop_s(msr_loop(trapped, insn, k), k), n),
            "in_kernel": marginal(
                lambda k: self._vmm_s(msr_loop(MSR_KVM_POLL_CONTROL, insn, k)), n),
            "kvmfilter_no_fast_path": marginal(
                lambda k: self._vmm_s(msr_loop(trapped, insn, k), fast_path=False),
                max(1000, n // 4)),
            # The whole run per exit, set-up included: what a user's run costs.
            "kvmfilter_whole_run": timed(
                lambda: self._vmm_s(msr_loop(trapped, insn, n)) / n * 1e9),
        }
        out = self._report(interleave(cases, self.rounds), "c_loop", "kvmfilter")
        a, b, c = (out[k]["median_ns"] for k in ("kvmfilter", "c_loop", "in_kernel"))
        out["userspace_overhead_vs_c"] = (a - c) / (b - c) if b > c else None
        out["exits_per_case"] = n
        return out

    def transition(self) -> dict:
        """Every write changes the value: with and without a journal, against C."""
        n = max(1000, self.exits // 4)  # toggles: 2n writes
        journaled = 40  # each commit is an fsync: milliseconds, not microseconds

        def per_write(measure, count):
            sample = marginal(measure, count)
            return lambda: (lambda v: (v[0] / 2, v[1]))(sample())

        with tempfile.TemporaryDirectory(prefix="kvmf-bench-") as tmp:
            def with_journal(k):
                return self._vmm_s(toggle_loop(k), journal=f"{tmp}/j-{k}.db", plain=True)
            cases = {
                "kvmfilter": per_write(lambda k: self._vmm_s(toggle_loop(k), plain=True), n),
                "c_loop": per_write(lambda k: self._c_loop_s(toggle_loop(k), 2 * k), n),
                "kvmfilter_journal": per_write(with_journal, journaled),
            }
            out = self._report(interleave(cases, self.rounds), "c_loop", "kvmfilter")
        out["writes_per_case"] = 2 * n
        out["journaled_writes_per_case"] = 2 * journaled
        return out
