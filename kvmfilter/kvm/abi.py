"""L0: the kernel's numbers that code above this package needs, by name.

Each value comes from the compiler (the cffi module built against the installed
<linux/kvm.h>, <asm/kvm_para.h>, <linux/kvm_para.h>), never typed by hand.
Only ``kvmfilter.kvm`` imports the cffi module; everything else imports these.
docs/kvm-abi.md says where each comes from.
"""
from ._kvm import lib

# Capabilities (api.rst, KVM_CHECK_EXTENSION)
KVM_CAP_IMMEDIATE_EXIT = lib.KVM_CAP_IMMEDIATE_EXIT
KVM_CAP_X86_USER_SPACE_MSR = lib.KVM_CAP_X86_USER_SPACE_MSR
KVM_CAP_X86_MSR_FILTER = lib.KVM_CAP_X86_MSR_FILTER
KVM_CAP_EXIT_HYPERCALL = lib.KVM_CAP_EXIT_HYPERCALL

# User-space MSR exits (api.rst, KVM_CAP_X86_USER_SPACE_MSR)
KVM_MSR_EXIT_REASON_INVAL = lib.KVM_MSR_EXIT_REASON_INVAL
KVM_MSR_EXIT_REASON_UNKNOWN = lib.KVM_MSR_EXIT_REASON_UNKNOWN
KVM_MSR_EXIT_REASON_FILTER = lib.KVM_MSR_EXIT_REASON_FILTER

# Memory slots
KVM_MEM_LOG_DIRTY_PAGES = lib.KVM_MEM_LOG_DIRTY_PAGES

# Paravirtual features, MSRs and the hypercall (asm/kvm_para.h, linux/kvm_para.h)
KVM_FEATURE_HC_MAP_GPA_RANGE = lib.KVM_FEATURE_HC_MAP_GPA_RANGE
KVM_FEATURE_MIGRATION_CONTROL = lib.KVM_FEATURE_MIGRATION_CONTROL
MSR_KVM_MIGRATION_CONTROL = lib.MSR_KVM_MIGRATION_CONTROL
MSR_KVM_POLL_CONTROL = lib.MSR_KVM_POLL_CONTROL
KVM_HC_MAP_GPA_RANGE = lib.KVM_HC_MAP_GPA_RANGE
KVM_MAP_GPA_RANGE_PAGE_SZ_4K = lib.KVM_MAP_GPA_RANGE_PAGE_SZ_4K
KVM_MAP_GPA_RANGE_PAGE_SZ_2M = lib.KVM_MAP_GPA_RANGE_PAGE_SZ_2M
KVM_MAP_GPA_RANGE_PAGE_SZ_1G = lib.KVM_MAP_GPA_RANGE_PAGE_SZ_1G
KVM_MAP_GPA_RANGE_ENCRYPTED = lib.KVM_MAP_GPA_RANGE_ENCRYPTED
KVM_ENOSYS = lib.KVM_ENOSYS
KVM_EINVAL = lib.KVM_EINVAL
