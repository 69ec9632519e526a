/*
 * msr_flood_per_vcpu.S - every vCPU: 30,000 x (WRMSR READY, RDMSR), then one
 * WRMSR 0 (revoke) and one WRMSR 1 (announce), then HLT.  The host counts
 * 60,002 accesses and 2 writes that may change the value per vCPU.
 */
#include "contract.inc"
_start:
    mov     $MSR_KVM_MIGRATION_CONTROL, %ecx
    xor     %edx, %edx
    mov     $30000, %edi
1:  mov     $1, %eax
    wrmsr
    rdmsr
    dec     %edi
    jnz     1b
    xor     %eax, %eax
    wrmsr
    mov     $1, %eax
    wrmsr
    hlt
