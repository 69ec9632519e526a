/*
 * readiness_cycle.S - a guest that stays alive and changes its migration
 * readiness over time, for `kvmfilter serve` and for watching transitions live.
 *
 * Contract (docs/contracts.md, "Guest images"): flat binary at 0x7C00, real mode,
 * SI = vCPU index; 0xE9 console, 0xF4 debug exit.  kvmfilter extension: port
 * 0xF5 (power button) reads 1 once a powerdown was requested (`system_powerdown`
 * on the daemon's socket), 0 before.
 *
 * vCPU 0 loops: WRMSR READY, work, WRMSR 0 (revoke), work, ...  Before each
 * write it reads port 0xF5; on 1 it revokes readiness (as Linux does when it
 * shuts down), prints "powerdown", and exits through 0xF4 with code 0.
 * Every cycle prints "cycle N" to the console.  "work" is a busy loop of
 * WORK iterations (about 0.1-0.2 s under KVM's real-mode emulator).
 * Other vCPUs halt.  If MIGRATION_CONTROL is not advertised (CPUID
 * 0x40000001 bit 17 clear) it prints that and exits with code 1.
 */
#include "contract.inc"
    .set WORK, 100000

_start:
    cli
    FLAT_SEGMENTS
    test    %si, %si
    jnz     park
    mov     $0x40000001, %eax
    cpuid
    bt      $17, %eax
    jc      cycle
    mov     $m_no_feature, %si
    call    puts
    mov     $1, %al
    jmp     exit

cycle:
    incw    cycles
    mov     $m_cycle, %si
    call    puts
    mov     cycles, %ax
    call    putdec
    mov     $'\n', %al
    call    putc
    mov     $1, %eax
    call    announce            /* READY */
    call    work
    xor     %eax, %eax
    call    announce            /* revoke */
    call    work
    jmp     cycle

/* Check the power button, then WRMSR MSR_KVM_MIGRATION_CONTROL <- EAX. */
announce:
    push    %eax
    mov     $POWER_BUTTON, %dx
    inb     %dx, %al
    cmp     $1, %al
    je      powerdown
    pop     %eax
    xor     %edx, %edx
    mov     $MSR_KVM_MIGRATION_CONTROL, %ecx
    wrmsr
    ret

powerdown:
    xor     %eax, %eax
    xor     %edx, %edx
    mov     $MSR_KVM_MIGRATION_CONTROL, %ecx
    wrmsr                       /* not ready any more: we are going away */
    mov     $m_powerdown, %si
    call    puts
    xor     %al, %al
exit:
    mov     $DEBUG_EXIT, %dx
    outb    %al, %dx
park:
    hlt
    jmp     park

work:
    mov     $WORK, %ecx
1:  dec     %ecx
    jnz     1b
    ret

#include "console.inc"

    .p2align 1
cycles:       .word 0
m_cycle:      .asciz "cycle "
m_powerdown:  .asciz "powerdown\n"
m_no_feature: .asciz "migration control is not advertised\n"
