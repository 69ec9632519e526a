"""The ABI as the compiler sees it: sizes and offsets kvmfilter depends on."""
from kvmfilter.kvm._kvm import ffi, lib


def test_kvm_msr_filter_is_392_bytes():
    # rust-vmm asserts the same: 4 flags + pad + 16 ranges of 24 bytes.
    assert ffi.sizeof("struct kvm_msr_filter") == 392
    assert ffi.sizeof("struct kvm_msr_filter_range") == 24


def test_msr_arm_of_kvm_run():
    # api.rst: run->msr = {u8 error @32; u32 reason @40; u32 index @44; u64 data @48}
    base = ffi.offsetof("struct kvm_run", "msr")
    assert base == 32
    assert base + ffi.offsetof("kvmf_run_msr", "error") == 32
    assert base + ffi.offsetof("kvmf_run_msr", "reason") == 40
    assert base + ffi.offsetof("kvmf_run_msr", "index") == 44
    assert base + ffi.offsetof("kvmf_run_msr", "data") == 48


def test_hypercall_arm_of_kvm_run():
    # api.rst: run->hypercall = {u64 nr @32; u64 args[6] @40; u64 ret @88; u64 flags @96}
    base = ffi.offsetof("struct kvm_run", "hypercall")
    assert base == 32
    assert base + ffi.offsetof("kvmf_run_hypercall", "args") == 40
    assert base + ffi.offsetof("kvmf_run_hypercall", "ret") == 88
    assert lib.KVMF_HYPERCALL_FLAGS_OFFSET == 96


def test_cpuid_entry_is_40_bytes():
    assert ffi.sizeof("struct kvm_cpuid_entry2") == 40


def test_constants_match_kvm_abi_md():
    assert lib.MSR_KVM_MIGRATION_CONTROL == 0x4B56_4D08
    assert lib.KVM_MIGRATION_READY == 1
    assert lib.KVM_FEATURE_MIGRATION_CONTROL == 17
    assert lib.KVM_FEATURE_HC_MAP_GPA_RANGE == 16
    assert lib.KVM_HC_MAP_GPA_RANGE == 12
    assert (lib.KVM_CAP_X86_USER_SPACE_MSR, lib.KVM_CAP_X86_MSR_FILTER,
            lib.KVM_CAP_EXIT_HYPERCALL) == (188, 189, 201)
    assert (lib.KVM_EXIT_X86_RDMSR, lib.KVM_EXIT_X86_WRMSR, lib.KVM_EXIT_HYPERCALL) == (29, 30, 3)
    assert lib.KVM_MSR_EXIT_REASON_FILTER == 4
    assert lib.KVM_EXIT_HYPERCALL_LONG_MODE == 1
    assert (lib.KVM_ENOSYS, lib.KVM_EINVAL) == (1000, 22)
    assert (lib.KVM_MAP_GPA_RANGE_PAGE_SZ_4K, lib.KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
            lib.KVM_MAP_GPA_RANGE_PAGE_SZ_1G, lib.KVM_MAP_GPA_RANGE_ENCRYPTED) == (0, 1, 2, 16)


def test_policy_constants_agree_with_headers():
    # The policy (pure, no cffi) restates three header values; keep them honest.
    from kvmfilter.policy import readiness
    assert readiness.MSR_KVM_MIGRATION_CONTROL == lib.MSR_KVM_MIGRATION_CONTROL
    assert readiness.KVM_MIGRATION_READY == lib.KVM_MIGRATION_READY
    assert readiness.KVM_FEATURE_MIGRATION_CONTROL == lib.KVM_FEATURE_MIGRATION_CONTROL


def test_state_structs_have_the_kernel_sizes():
    # Snapshots store these structs as raw bytes: their sizes are the ABI.
    sizes = {"struct kvm_regs": 144, "struct kvm_sregs": 312, "struct kvm_fpu": 416,
             "struct kvm_xsave": 4096, "struct kvm_xcrs": 392,
             "struct kvm_vcpu_events": 64, "struct kvm_debugregs": 128,
             "struct kvm_mp_state": 4, "struct kvm_clock_data": 48,
             "struct kvm_msr_entry": 16, "struct kvm_dirty_log": 16}
    assert {name: ffi.sizeof(name) for name in sizes} == sizes
    assert ffi.offsetof("struct kvm_dirty_log", "dirty_bitmap") == 8
    assert ffi.offsetof("struct kvm_msr_entry", "data") == 8
