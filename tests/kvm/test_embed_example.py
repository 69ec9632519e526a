"""examples/embed_handler.py: a stdlib-only VMM embedding MigrationControl."""
import importlib.util
import json
import pathlib
import subprocess
import sys

from kvmfilter.kvm._kvm import ffi, lib

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "embed_handler.py"


def load_example():
    spec = importlib.util.spec_from_file_location("embed_handler", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hand_written_abi_matches_the_compiler():
    ex = load_example()
    for name in ("KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_GET_VCPU_MMAP_SIZE",
                 "KVM_GET_SUPPORTED_CPUID", "KVM_CREATE_VCPU", "KVM_SET_USER_MEMORY_REGION",
                 "KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS",
                 "KVM_SET_CPUID2", "KVM_ENABLE_CAP", "KVM_X86_SET_MSR_FILTER",
                 "KVM_CAP_X86_USER_SPACE_MSR", "KVM_MSR_EXIT_REASON_FILTER",
                 "KVM_EXIT_X86_RDMSR", "KVM_EXIT_X86_WRMSR", "KVM_EXIT_IO", "KVM_EXIT_HLT",
                 "KVM_FEATURE_MIGRATION_CONTROL"):
        assert getattr(ex, name) == getattr(lib, name), name
    assert ex.SIZEOF_SREGS == ffi.sizeof("struct kvm_sregs")
    assert ex.SIZEOF_REGS == ffi.sizeof("struct kvm_regs")
    assert ex.RUN_MSR_INDEX == ffi.offsetof("struct kvm_run", "msr") + ffi.offsetof("kvmf_run_msr", "index")
    assert ex.RUN_MSR_DATA == ffi.offsetof("struct kvm_run", "msr") + ffi.offsetof("kvmf_run_msr", "data")


def test_example_runs_the_bundled_guest(kvm):
    p = subprocess.run([sys.executable, str(EXAMPLE), "--timeout", "20"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "not ok" not in p.stdout and "ok 9 - " in p.stdout
    summary = json.loads(lines[-1])
    assert summary["ready"] is True and summary["verdicts"] == {"ok": 8, "gp": 2}
    assert [(t["from"], t["to"]) for t in summary["transitions"]] == [(0, 1), (1, 0), (0, 1)]


def test_example_plain_memory(kvm):
    p = subprocess.run([sys.executable, str(EXAMPLE), "--plain-memory"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "# initial value 1" in p.stdout
