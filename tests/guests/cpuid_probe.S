/*
 * cpuid_probe.S - prints one console byte: CPUID 0x40000001.EAX bits 23:16, so
 * the host can check which PV feature bits the guest was offered (bit 0 of
 * the byte = KVM_FEATURE_HC_MAP_GPA_RANGE, bit 1 = KVM_FEATURE_MIGRATION_CONTROL).
 * Then HLT.
 */
#include "contract.inc"
_start:
    mov     $0x40000001, %eax
    cpuid
    shr     $16, %eax
    outb    %al, $CONSOLE
    hlt
