/*
 * toggle.S - toggle readiness as fast as the host allows: WRMSR 1, WRMSR 0,
 * forever (every write a transition).  Only a stop ends it.
 */
#include "contract.inc"
_start:
    mov     $MSR_KVM_MIGRATION_CONTROL, %ecx
    xor     %edx, %edx
1:  mov     $1, %eax
    wrmsr
    xor     %eax, %eax
    wrmsr
    jmp     1b
