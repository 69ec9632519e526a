/*
 * rdmsr_then_spin.S - WRMSR 1, then 2,000 x RDMSR, then spin forever: the
 * host must report all 2,001 accesses while the vCPU is still running.
 */
#include "contract.inc"
_start:
    mov     $MSR_KVM_MIGRATION_CONTROL, %ecx
    mov     $1, %eax
    xor     %edx, %edx
    wrmsr
    mov     $2000, %edi
1:  rdmsr
    dec     %edi
    jnz     1b
    jmp     .
