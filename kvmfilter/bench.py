"""L5: `kvmfilter bench` - what servicing the migration-control MSR costs here.

Every comparison is made inside one run with the cases interleaved over
several rounds (these hosts drift 10-15% between runs), and reported as
median, min and max.  Cases (BENCHMARKS.md explains each):

- wrmsr / rdmsr: a guest loop of WRMSR (RDMSR) 0x4b564d08 serviced by
  (a) kvmfilter's real path, exactly what `kvmfilter run` uses;
  (b) a minimal C loop compiled into the extension (cstubs: kvmf_bench_c_loop);
  (c) the in-kernel floor: the same loop on MSR_KVM_POLL_CONTROL (0x4b564d05),
      which KVM handles without exiting;
  and, for information, kvmfilter with its C fast path switched off.
- startup: `kvmfilter run` of the bundled guest, process start to exit, and parts.
- vcpu_scaling: 1, 2 and 4 vCPUs each looping WRMSR: exits per second.
- page_map: 10^6 random range updates over 1 TiB: time and peak memory.
"""
from __future__ import annotations

import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
import tracemalloc

from .kvm import abi
from .kvm.baseline import c_loop
from .kvm.ioctls import Kvm
from .policy.pagemap import PageMap
from .policy.readiness import MSR_KVM_MIGRATION_CONTROL
from .vm.vmm import RunOptions, Vmm

MSR_KVM_POLL_CONTROL = abi.MSR_KVM_POLL_CONTROL
WRMSR_OPCODE, RDMSR_OPCODE = "0f30", "0f32"

TARGETS = {
    "wrmsr_ratio_vs_c": 1.15,
    "startup_s": 0.150,
    "scaling_2_vs_1": 1.6,
    "page_map_s": 2.0,
}


def msr_loop(msr: int, insn: str, count: int, halt: bool = False) -> bytes:
    """Real-mode guest: `count` times RDMSR/WRMSR `msr` (EAX=1), then exit 0 (or HLT)."""
    return bytes.fromhex(
        "66b9" + msr.to_bytes(4, "little").hex()      # mov ecx, msr
        + "66b801000000"                               # mov eax, 1
        + "6631d2"                                     # xor edx, edx
        + "66bf" + count.to_bytes(4, "little").hex()   # mov edi, count
        + insn                                         # 1: wrmsr / rdmsr
        + "664f"                                       #    dec edi
        + "75fa"                                       #    jnz 1b
        + ("f4" if halt else "b000e6f4f4"))            # hlt / out 0xf4, 0; hlt


def summarize(samples: list[float], unit: str) -> dict:
    return {f"median_{unit}": statistics.median(samples), "min": min(samples),
            "max": max(samples), "samples": len(samples)}


class Bench:
    def __init__(self, kvm: Kvm, seconds: float = 60.0, rounds: int = 5):
        self.kvm = kvm
        self.rounds = rounds
        self.seconds = seconds
        # Exits per MSR case: sized so the MSR part takes about a third of the budget.
        self.exits = max(2000, min(50_000, int(seconds / 60.0 * 20_000)))

    # -- the MSR round trip -------------------------------------------------

    # Each MSR case is timed for n and 2n exits and reported as the marginal
    # cost (T(2n) - T(n)) / n: what one more exit costs, without VM set-up,
    # thread start or kvmfilter's first 1024 accesses (logged in Python, before
    # the fast path is enabled; reported separately as `warmup_ns`).

    def _vmm_s(self, image: bytes, fast_path: bool = True) -> float:
        with Vmm(None, RunOptions(timeout=120, fast_path=fast_path), image=image,
                 label="<bench>") as v:
            result = v.run(self.kvm)
        if result.exit.reason != "debug_exit":
            raise RuntimeError(f"bench guest stopped with {result.exit}")
        return result.elapsed_s

    def _c_loop_s(self, image: bytes, exits: int) -> float:
        # Same VM set-up as (a) - filter, CPUID, real mode - but vCPU 0 is
        # driven by the C loop instead of kvmfilter's machine.
        with Vmm(None, RunOptions(timeout=120), image=image, label="<bench>") as v:
            vcpu = v.prepare(self.kvm)[0]
            n, elapsed = c_loop(vcpu, MSR_KVM_MIGRATION_CONTROL)
        if n != exits:
            raise RuntimeError(f"C loop serviced {n} exits, expected {exits}")
        return elapsed

    def msr_round_trip(self, insn: str) -> dict:
        n = self.exits

        trapped = MSR_KVM_MIGRATION_CONTROL

        def marginal(measure, count):  # measure(count) -> seconds for `count` exits
            return lambda: (measure(2 * count) - measure(count)) / count * 1e9

        def vmm(msr, fast_path=True):
            return lambda count: self._vmm_s(msr_loop(msr, insn, count), fast_path)

        def c_loop(count):
            return self._c_loop_s(msr_loop(trapped, insn, count), count)

        cases = {
            "kvmfilter": marginal(vmm(trapped), n),
            "c_loop": marginal(c_loop, n),
            "in_kernel": marginal(vmm(MSR_KVM_POLL_CONTROL), n),
            "kvmfilter_no_fast_path": marginal(vmm(trapped, fast_path=False), max(1000, n // 4)),
            "kvmfilter_whole_run": lambda: vmm(trapped)(n) / n * 1e9,
        }
        samples = self._interleave(cases)
        out = {name: summarize(s, "ns") for name, s in samples.items()}
        a, b, c = (out[k]["median_ns"] for k in ("kvmfilter", "c_loop", "in_kernel"))
        out["ratio_vs_c"] = a / b
        out["userspace_overhead_vs_c"] = (a - c) / (b - c) if b > c else None
        out["exits_per_case"] = n
        return out

    def _interleave(self, cases: dict) -> dict:
        samples = {name: [] for name in cases}
        for _ in range(self.rounds):
            for name, case in cases.items():
                samples[name].append(case())
        return samples

    # -- start-up -----------------------------------------------------------

    def startup(self) -> dict:
        exe = shutil.which("kvmfilter", path=os.path.dirname(sys.executable))
        run_cmd = [exe, "run", "--json"] if exe else [sys.executable, "-m", "kvmfilter",
                                                     "run", "--json"]
        cases = {
            "interpreter": [sys.executable, "-c", "pass"],
            "imports": [sys.executable, "-c", "import kvmfilter.cli, kvmfilter.vm.vmm"],
            "kvmfilter_run": run_cmd,
        }
        samples = {name: [] for name in cases}
        guest = []
        for _ in range(self.rounds * 2):
            for name, cmd in cases.items():
                started = time.perf_counter()
                p = subprocess.run(cmd, capture_output=True, text=True)
                samples[name].append(time.perf_counter() - started)
                if name == "kvmfilter_run":
                    if p.returncode != 0:
                        raise RuntimeError(f"kvmfilter run failed: {p.stderr.strip()}")
                    import json
                    guest.append(json.loads(p.stdout)["elapsed_s"])
        out = {name: summarize(s, "s") for name, s in samples.items()}
        total = out["kvmfilter_run"]["median_s"]
        interp = out["interpreter"]["median_s"]
        imports = out["imports"]["median_s"] - interp
        run = statistics.median(guest)
        out["parts_s"] = {"interpreter": interp, "imports": imports, "guest_run": run,
                          "vm_setup_and_report": total - interp - imports - run}
        return out

    # -- vCPU scaling -----------------------------------------------------------

    def vcpu_scaling(self) -> dict:
        """Each case: ns per exit over all vCPUs (median_ns ...), and exits/s."""
        n = max(2000, self.exits // 2)
        image = msr_loop(MSR_KVM_MIGRATION_CONTROL, WRMSR_OPCODE, n, halt=True)

        def case(vcpus):
            def run():
                with Vmm(None, RunOptions(timeout=120, vcpus=vcpus), image=image,
                         label="<bench>") as v:
                    result = v.run(self.kvm)
                if result.exit.reason != "hlt":
                    raise RuntimeError(f"scaling guest stopped with {result.exit}")
                return result.elapsed_s / (vcpus * n) * 1e9
            return run

        samples = self._interleave({f"{k}_vcpus": case(k) for k in (1, 2, 4)})
        out = {}
        for name, s in samples.items():
            out[name] = summarize(s, "ns")
            out[name]["median_exits_per_s"] = 1e9 / out[name]["median_ns"]
        one = out["1_vcpus"]["median_exits_per_s"]
        out["speedup_2_vs_1"] = out["2_vcpus"]["median_exits_per_s"] / one
        out["speedup_4_vs_1"] = out["4_vcpus"]["median_exits_per_s"] / one
        out["exits_per_vcpu"] = n
        out["host_cpus"] = os.cpu_count()
        return out

    # -- page map -------------------------------------------------------------

    @staticmethod
    def page_map(updates: int = 1_000_000, rounds: int = 3) -> dict:
        tib, page = 1 << 40, 4096
        rng = random.Random(20261125)
        ops = [(rng.randrange(0, tib // page) * page, rng.randrange(1, 1 << 18) * page,
                rng.random() < 0.5) for _ in range(updates)]
        times = []
        for _ in range(rounds):
            pm = PageMap()
            update = pm.update
            started = time.perf_counter()
            for start, length, shared in ops:
                update(start, start + length, shared)
            times.append(time.perf_counter() - started)
        # Peak memory in a separate pass: tracemalloc slows every allocation.
        pm = PageMap()
        peak_ranges = 0
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for k, (start, length, shared) in enumerate(ops):
            pm.update(start, start + length, shared)
            if k % 1024 == 0:
                peak_ranges = max(peak_ranges, len(pm))
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        out = summarize(times, "s")
        out.update({"updates": updates, "space_bytes": tib, "final_ranges": len(pm),
                    "peak_ranges": peak_ranges, "peak_bytes": peak,
                    "peak_bytes_per_range": peak / max(peak_ranges, 1)})
        return out


def host_info(kvm: Kvm) -> dict:
    from .vm.probe import _backend
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "backend": _backend(),
            "python": platform.python_version(), "api_version": kvm.get_api_version()}


def run_all(kvm: Kvm, seconds: float = 60.0) -> dict:
    bench = Bench(kvm, seconds)
    started = time.monotonic()
    report = {"host": host_info(kvm)}
    report["wrmsr"] = bench.msr_round_trip(WRMSR_OPCODE)
    report["rdmsr"] = bench.msr_round_trip(RDMSR_OPCODE)
    report["startup"] = bench.startup()
    report["vcpu_scaling"] = bench.vcpu_scaling()
    report["page_map"] = bench.page_map()
    report["targets"] = targets(report)
    report["elapsed_s"] = time.monotonic() - started
    return report


def targets(r: dict) -> list[dict]:
    def t(name, value, target, better):
        ok = value <= target if better == "lower" else value >= target
        return {"name": name, "value": value, "target": target, "pass": ok}
    return [
        t("wrmsr ratio a/b (kvmfilter / C loop)", r["wrmsr"]["ratio_vs_c"],
          TARGETS["wrmsr_ratio_vs_c"], "lower"),
        t("kvmfilter run, process start to exit (s)", r["startup"]["kvmfilter_run"]["median_s"],
          TARGETS["startup_s"], "lower"),
        t("2 vCPUs / 1 vCPU exits per second", r["vcpu_scaling"]["speedup_2_vs_1"],
          TARGETS["scaling_2_vs_1"], "higher"),
        t("page map: 10^6 updates over 1 TiB (s)", r["page_map"]["median_s"],
          TARGETS["page_map_s"], "lower"),
    ]


def format_report(r: dict) -> str:
    lines = [f"host: {r['host']['backend']}, kernel {r['host']['kernel']}, "
             f"{r['host']['cpus']} CPUs, Python {r['host']['python']}", ""]
    for op in ("wrmsr", "rdmsr"):
        m = r[op]
        lines.append(f"{op.upper()} 0x4b564d08 round trip, marginal ns per exit "
                     f"(median [min-max] of {m['kvmfilter']['samples']} interleaved rounds, "
                     f"T(2n)-T(n), n = {m['exits_per_case']}):")
        for case in ("kvmfilter", "c_loop", "in_kernel", "kvmfilter_no_fast_path",
                     "kvmfilter_whole_run"):
            s = m[case]
            lines.append(f"  {case:<24} {s['median_ns']:>8.0f}  [{s['min']:.0f}-{s['max']:.0f}]")
        overhead = m["userspace_overhead_vs_c"]
        lines.append(f"  ratio a/b {m['ratio_vs_c']:.3f}; userspace overhead (a-c)/(b-c) "
                     + (f"{overhead:.3f}" if overhead is not None else "n/a"))
    s = r["startup"]
    lines.append("")
    lines.append(f"start-up: kvmfilter run {s['kvmfilter_run']['median_s'] * 1000:.1f} ms "
                 f"[{s['kvmfilter_run']['min'] * 1000:.1f}-{s['kvmfilter_run']['max'] * 1000:.1f}]; "
                 + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in s["parts_s"].items()))
    v = r["vcpu_scaling"]
    lines.append("vCPU scaling (exits/s, all vCPUs): " + ", ".join(
        f"{k.split('_')[0]} vCPU {v[k]['median_exits_per_s']:.0f}"
        for k in ("1_vcpus", "2_vcpus", "4_vcpus"))
        + f"; 2/1 = {v['speedup_2_vs_1']:.2f}, 4/1 = {v['speedup_4_vs_1']:.2f} "
          f"({v['host_cpus']} host CPUs)")
    p = r["page_map"]
    lines.append(f"page map: {p['updates']} updates over 1 TiB in {p['median_s']:.2f} s "
                 f"[{p['min']:.2f}-{p['max']:.2f}]; peak {p['peak_ranges']} ranges, "
                 f"{p['peak_bytes'] / 1024:.0f} KiB ({p['peak_bytes_per_range']:.0f} B/range)")
    lines.append("")
    for t in r["targets"]:
        lines.append(f"{'PASS' if t['pass'] else 'MISS'}  {t['name']}: "
                     f"{t['value']:.3f} (target {t['target']})")
    lines.append(f"(bench took {r['elapsed_s']:.0f} s)")
    return "\n".join(lines)
