/*
 * ready_wait.S - the default guest of `kvmfilter serve`: announce READY, then
 * wait in HLT, costing no CPU, until the power button is pressed.
 *
 * Contract (docs/contracts.md, "Guest images"): flat binary at 0x7C00, real
 * mode, SI = vCPU index; 0xE9 console, 0xF4 debug exit, 0xF5 power button.
 * In a daemon HLT parks the vCPU until the power button (system_powerdown)
 * wakes it; under `kvmfilter run` the first HLT ends the vCPU.
 *
 * vCPU 0: if CPUID 0x40000001 bit 17 (migration control) is set, WRMSR
 * MSR_KVM_MIGRATION_CONTROL <- 1 (READY) and print "ready"; then loop: HLT,
 * read port 0xF5, and on 1 revoke readiness (as Linux does on shutdown),
 * print "powerdown" and exit through 0xF4 with code 0.  Without bit 17 it
 * prints that and waits the same way.  Other vCPUs only wait in HLT.
 */
#include "contract.inc"

_start:
    cli
    FLAT_SEGMENTS
    test    %si, %si
    jnz     park
    ANNOUNCE_READY no_feature
    mov     $m_ready, %si
    call    puts
    movb    $1, advertised
    jmp     wait

no_feature:
    mov     $m_no_feature, %si
    call    puts

wait:
    hlt
    mov     $POWER_BUTTON, %dx
    inb     %dx, %al
    cmp     $1, %al
    jne     wait
    cmpb    $1, advertised
    jne     1f
    xor     %eax, %eax
    xor     %edx, %edx
    mov     $MSR_KVM_MIGRATION_CONTROL, %ecx
    wrmsr                       /* not ready any more: we are going away */
1:  mov     $m_powerdown, %si
    call    puts
    xor     %al, %al
    mov     $DEBUG_EXIT, %dx
    outb    %al, %dx
park:
    hlt
    jmp     park

#include "console.inc"

advertised:   .byte 0
m_ready:      .asciz "ready\n"
m_powerdown:  .asciz "powerdown\n"
m_no_feature: .asciz "migration control is not advertised\n"
