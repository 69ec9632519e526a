"""Start-up, vCPU scaling and the page map."""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
import tracemalloc

from ..policy.pagemap import PageMap
from ..policy.readiness import MSR_KVM_MIGRATION_CONTROL
from ..vm.vmm import RunOptions, Vmm
from .common import interleave, kvmfilter_command, marginal, summarize
from .msr import WRMSR_OPCODE, msr_loop


def startup(rounds: int) -> dict:
    """`kvmfilter run` of the bundled guest, process start to exit, and its parts."""
    run_cmd = kvmfilter_command() + ["run", "--json"]
    # kvmfilter exits without tearing the interpreter down (__main__._exit);
    # the parts do too, so they add up.
    cases = {
        "interpreter": [sys.executable, "-c", "import os; os._exit(0)"],
        "imports": [sys.executable, "-c", "import os, kvmfilter.cli, kvmfilter.vm.vmm; "
                    "os._exit(0)"],
        "kvmfilter_run": run_cmd,
    }
    samples: dict = {name: [] for name in cases}
    guest = []
    for _ in range(rounds * 2):
        for name, cmd in cases.items():
            started = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            samples[name].append(time.perf_counter() - started)
            if name == "kvmfilter_run":
                if p.returncode != 0:
                    raise RuntimeError(f"kvmfilter run failed: {p.stderr.strip()}")
                guest.append(json.loads(p.stdout)["elapsed_s"])
    out = {name: summarize(s, "s") for name, s in samples.items()}
    total = out["kvmfilter_run"]["median_s"]
    interp = out["interpreter"]["median_s"]
    imports = out["imports"]["median_s"] - interp
    run = statistics.median(guest)
    out["parts_s"] = {"interpreter": interp, "imports": imports, "guest_run": run,
                      "vm_setup_and_report": total - interp - imports - run}
    return out


def vcpu_scaling(kvm, exits: int, rounds: int) -> dict:
    """1, 2 and 4 vCPUs each looping WRMSR: exits per second over all vCPUs, and
    the CPU share each case got (2 vCPUs on a 2-core host need both cores).

    Judged on the marginal cost, (T(2n) - T(n)) / n as the MSR cases: the
    first 1,024 accesses of a run are logged in Python, one vCPU at a time
    under the GIL, and with set-up and thread start they would be counted as
    if they were the exit path.  The whole run's figure is reported beside it.
    """
    n = max(2000, exits // 2)
    whole: dict = {k: [] for k in (1, 2, 4)}

    def case(vcpus):
        def run(count):
            image = msr_loop(MSR_KVM_MIGRATION_CONTROL, WRMSR_OPCODE, count, halt=True)
            with Vmm(None, RunOptions(timeout=300, vcpus=vcpus), image=image,
                     label="<bench>") as v:
                result = v.run(kvm)
            if result.exit.reason != "hlt":
                raise RuntimeError(f"scaling guest stopped with {result.exit}")
            if count == 2 * n:
                whole[vcpus].append(result.elapsed_s / (vcpus * count) * 1e9)
            return result.elapsed_s / vcpus  # per exit of all vCPUs together
        return marginal(run, n)

    samples = interleave({k: case(k) for k in (1, 2, 4)}, rounds)
    out: dict = {}
    for k, values in samples.items():
        name = f"{k}_vcpus"
        out[name] = summarize([v for v, _ in values], "ns")
        out[name]["median_exits_per_s"] = 1e9 / out[name]["median_ns"]
        out[name]["cpu_share"] = round(statistics.median(s for _, s in values), 3)
        out[name]["whole_run_ns"] = statistics.median(whole[k])
    one = out["1_vcpus"]["median_exits_per_s"]
    out["speedup_2_vs_1"] = out["2_vcpus"]["median_exits_per_s"] / one
    # Round by round too: the target is judged missed only if the rounds bear it out.
    out["speedup_2_vs_1_rounds"] = [round(a / b, 3) if b > 0 else None
                                    for (a, _), (b, _) in zip(samples[1], samples[2])]
    out["speedup_4_vs_1"] = out["4_vcpus"]["median_exits_per_s"] / one
    out["speedup_2_vs_1_whole_run"] = (out["1_vcpus"]["whole_run_ns"]
                                       / out["2_vcpus"]["whole_run_ns"])
    out["exits_per_vcpu"] = n
    out["host_cpus"] = os.cpu_count()
    return out


def page_map(updates: int = 1_000_000, rounds: int = 3) -> dict:
    """10^6 random range updates over 1 TiB: time, and peak memory in ranges."""
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
