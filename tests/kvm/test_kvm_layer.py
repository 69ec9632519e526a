"""L1 against the real kernel: the ioctls, and KVM's own MSR-filter validation
(the kernel selftests' invalid-flag sweeps, in Python)."""
import errno

import pytest

from kvmfilter.kvm._kvm import lib
from kvmfilter.kvm.ioctls import KvmError
from kvmfilter.kvm.msr_filter import READ, WRITE, MsrFilter, MsrFilterError, MsrRange


def test_api_version_and_mmap_size(kvm):
    assert kvm.get_api_version() == 12
    assert kvm.get_vcpu_mmap_size() >= 4096


def test_supported_cpuid_has_the_kvm_leaves(kvm):
    entries = {e.function: e for e in kvm.get_supported_cpuid()}
    assert entries[0x40000000].eax >= 0x40000001
    assert (entries[0x40000000].ebx, entries[0x40000000].ecx) == (0x4B4D564B, 0x564B4D56)
    assert 0x40000001 in entries


@pytest.fixture
def vm(kvm, require_cap):
    require_cap(lib.KVM_CAP_X86_MSR_FILTER, "KVM_CAP_X86_MSR_FILTER")
    with kvm.create_vm() as vm:
        yield vm


def test_valid_filters_are_accepted(vm):
    vm.set_msr_filter(MsrFilter.deny_only({0x4B564D08: READ | WRITE}))
    vm.set_msr_filter(MsrFilter(False, tuple(MsrRange.deny(0x100 + i, READ) for i in range(16))))
    vm.set_msr_filter(MsrFilter(False, (MsrRange.deny(0x800, WRITE),)))  # x2APIC: no effect


@pytest.mark.parametrize("bit", range(1, 32))
def test_kernel_rejects_undefined_filter_flags(vm, bit):
    with pytest.raises(KvmError) as exc:
        vm.set_msr_filter_unchecked(1 << bit, [(READ, 1, 0x10, bytes(8))])
    assert exc.value.errno == errno.EINVAL
    assert exc.value.ioctl == "KVM_X86_SET_MSR_FILTER"


@pytest.mark.parametrize("flags", [0] + [1 << b for b in range(2, 32)])
def test_kernel_rejects_bad_range_flags(vm, flags):
    with pytest.raises(KvmError) as exc:
        vm.set_msr_filter_unchecked(0, [(flags, 1, 0x10, bytes(8))])
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(MsrFilterError):  # and the checked form says so first
        MsrFilter(False, (MsrRange(0x10, 1, flags, bytes(8)),)).validate()


def test_kernel_rejects_an_oversized_bitmap(vm):
    n = 0x600 * 8 + 1
    with pytest.raises(KvmError) as exc:
        vm.set_msr_filter_unchecked(0, [(READ, n, 0, bytes(0x608))])
    assert exc.value.errno == errno.EINVAL


def test_kernel_rejects_default_deny_with_only_empty_ranges(vm):
    with pytest.raises(KvmError) as exc:
        vm.set_msr_filter_unchecked(lib.KVM_MSR_FILTER_DEFAULT_DENY, [(READ, 0, 0, bytes(8))])
    assert exc.value.errno == errno.EINVAL


def test_null_bitmap_is_efault(vm):
    with pytest.raises(KvmError) as exc:
        vm.set_msr_filter_unchecked(0, [(READ, 1, 0x10, None)])
    assert exc.value.errno == errno.EFAULT


def test_enable_cap_rejects_unknown_exit_reasons(kvm, require_cap):
    require_cap(lib.KVM_CAP_X86_USER_SPACE_MSR, "KVM_CAP_X86_USER_SPACE_MSR")
    with kvm.create_vm() as vm:
        with pytest.raises(KvmError) as exc:
            vm.enable_cap(lib.KVM_CAP_X86_USER_SPACE_MSR, 1 << 3)
        assert exc.value.errno == errno.EINVAL
        vm.enable_cap(lib.KVM_CAP_X86_USER_SPACE_MSR, lib.KVM_MSR_EXIT_REASON_FILTER)


def test_regs_round_trip(kvm):
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        regs = vcpu.get_regs()
        regs.rsi = 7
        regs.rip = 0x7C00
        vcpu.set_regs(regs)
        again = vcpu.get_regs()
        assert (again.rsi, again.rip) == (7, 0x7C00)
        sregs = vcpu.get_sregs()
        sregs.cs.base = 0
        sregs.cs.selector = 0
        vcpu.set_sregs(sregs)
        assert vcpu.get_sregs().cs.selector == 0


def test_fds_are_released(kvm):
    import os
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with kvm.create_vm() as vm, vm.create_vcpu(0):
            pass
    assert len(os.listdir("/proc/self/fd")) == before
