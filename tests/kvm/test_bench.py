"""`kvmfilter bench` machinery on real KVM, at a tiny size.

These check that every case runs and reports the documented keys - not how
fast anything is (timings belong to `kvmfilter bench`, not to tests).
"""
from kvmfilter import bench
from kvmfilter.policy.readiness import MSR_KVM_MIGRATION_CONTROL


def test_msr_cases_run_and_report(kvm):
    b = bench.Bench(kvm, seconds=5, rounds=1)
    for insn in (bench.WRMSR_OPCODE, bench.RDMSR_OPCODE):
        out = b.msr_round_trip(insn)
        for case in ("kvmfilter", "c_loop", "in_kernel", "kvmfilter_no_fast_path"):
            assert set(out[case]) == {"median_ns", "min", "max", "samples"}


def test_c_loop_services_exactly_the_guest_loop(kvm):
    b = bench.Bench(kvm, seconds=5, rounds=1)
    image = bench.msr_loop(MSR_KVM_MIGRATION_CONTROL, bench.WRMSR_OPCODE, 1234)
    assert b._c_loop_s(image, 1234) > 0  # raises unless exactly 1234 exits were serviced


def test_vcpu_scaling_reports_speedups(kvm):
    out = bench.Bench(kvm, seconds=5, rounds=1).vcpu_scaling()
    assert {"1_vcpus", "2_vcpus", "4_vcpus", "speedup_2_vs_1", "speedup_4_vs_1"} <= set(out)
    for case in ("1_vcpus", "2_vcpus", "4_vcpus"):
        assert {"median_ns", "min", "max", "median_exits_per_s"} <= set(out[case])


def test_page_map_case_reports_memory():
    out = bench.Bench.page_map(updates=20_000, rounds=1)
    assert out["updates"] == 20_000 and out["peak_ranges"] >= out["final_ranges"] > 0
    assert out["peak_bytes"] > 0


def test_targets_are_judged():
    fake = {"wrmsr": {"ratio_vs_c": 1.2}, "startup": {"kvmfilter_run": {"median_s": 0.1}},
            "vcpu_scaling": {"speedup_2_vs_1": 1.7}, "page_map": {"median_s": 3.0}}
    verdicts = [t["pass"] for t in bench.targets(fake)]
    assert verdicts == [False, True, True, False]
