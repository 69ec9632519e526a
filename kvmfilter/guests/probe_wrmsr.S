/*
 * probe_wrmsr.S - used by `kvmfilter probe`: one WRMSR 0x4b564d08 <- 1.
 * Contract as conformance.S.  If the WRMSR exits, the VMM sees it; if it
 * completes, the guest exits with code 0; if it faults (#GP, vector 13),
 * with code 13.
 */
    .code16
    .text
    .globl _start
_start:
    cli
    xor     %ax, %ax
    mov     %ax, %ds
    movw    $gp_handler, 13*4
    movw    $0, 13*4+2
    mov     $0x4b564d08, %ecx
    mov     $1, %eax
    xor     %edx, %edx
    wrmsr
    xor     %al, %al
exit:
    mov     $0xf4, %dx
    outb    %al, %dx
    hlt
gp_handler:
    mov     $13, %al
    jmp     exit
