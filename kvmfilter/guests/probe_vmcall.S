/*
 * probe_vmcall.S - KVM_HC_MAP_GPA_RANGE with VMCALL (0F 01 C1), the Intel
 * form.  On kvm_pvm hosts KVM_RUN spins on it until a signal (docs/host-kvm.md), so
 * the probe runs it with a short timeout.
 */
#define HYPERCALL vmcall
#include "probe_hypercall.inc"
