/*
 * wrmsr_flood.S - WRMSR KVM_MIGRATION_READY 100,000 times (one transition, the
 * rest change nothing), then exit 0 through port 0xF4.
 */
#include "contract.inc"
_start:
    mov     $MSR_KVM_MIGRATION_CONTROL, %ecx
    mov     $1, %eax
    xor     %edx, %edx
    mov     $100000, %edi
1:  wrmsr
    dec     %edi
    jnz     1b
    xor     %al, %al
    outb    %al, $DEBUG_EXIT
    hlt
