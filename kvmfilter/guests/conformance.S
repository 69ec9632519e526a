/*
 * conformance.S - the migration-control conformance guest (the bundled default).
 *
 * Contract (docs/contracts.md, "Guest images"): flat binary loaded at 0x7C00, 16-bit
 * real mode, CS=DS=ES=SS=0, SP=0x7C00, SI = vCPU index.  Port 0xE9: console;
 * port 0xF4: exit with the number of failed checks.  CPUID.01H:EBX[23:16] is
 * the number of vCPUs (kvmfilter sets it, as hardware does).
 *
 * vCPU 0 prints TAP to the console.  It checks the KVM signature (CPUID
 * 0x40000000), reads KVM_CPUID_FEATURES (0x40000001) and, when bit 17
 * (KVM_FEATURE_MIGRATION_CONTROL) is set, walks the protocol on
 * MSR_KVM_MIGRATION_CONTROL (0x4b564d08):
 *   initial RDMSR; WRMSR READY; readback; WRMSR with a reserved bit in the low
 *   and in the high dword (each must #GP); value unchanged; WRMSR 0 (revoke)
 *   and readback; WRMSR READY again and readback.
 * When bit 17 is clear it checks that RDMSR and WRMSR both #GP.
 * When bit 16 (KVM_FEATURE_HC_MAP_GPA_RANGE) is set it declares the page at
 * 0x10000 shared with one KVM_HC_MAP_GPA_RANGE, issued with VMMCALL (never
 * VMCALL: it can hang KVM_RUN on kvm_pvm hosts); a #UD there (how our hosts
 * answer VMMCALL in real mode) is reported as a TAP SKIP, not a failure.
 * Other vCPUs wait their turn (one at a time, so readbacks are not raced),
 * then revoke and re-announce (or check the #GPs), and halt; vCPU 0 waits for
 * them all and reports one more check.
 * Last it prints "# guest saw N #GP" so the host can cross-check its verdicts,
 * and exits through port 0xF4 with the number of failed checks.
 *
 * Faults: #GP (vector 13) is taken by gp_handler through the IVT; it skips the
 * 2-byte RDMSR (0F 32) / WRMSR (0F 30) that faulted and sets `faulted`.
 * #UD (vector 6) is taken by ud_handler; it skips the 3-byte VMMCALL (0F 01 D9)
 * and sets `faulted`.
 *
 * Build: make guests.  Disassemble:
 *   objdump -D -b binary -m i8086 --adjust-vma=0x7c00 conformance.bin
 */
#include "contract.inc"

/* Clear `pass` unless the last access did (not) fault / returned \v. */
.macro EXPECT_NOFAULT
    cmpb    $0, faulted
    je      9f
    movb    $0, pass
9:
.endm
.macro EXPECT_FAULT
    cmpb    $1, faulted
    je      9f
    movb    $0, pass
9:
.endm
.macro EXPECT_VALUE v
    cmp     $\v, %eax
    jne     8f
    test    %edx, %edx
    jz      9f
8:  movb    $0, pass
9:
.endm
.macro REPORT name
    mov     $\name, %si
    call    tap
.endm
.macro WRITE lo, hi
    mov     $\lo, %eax
    mov     $\hi, %edx
    call    wr
.endm

_start:
    cli
    xor     %ax, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    mov     %si, %ax            /* a 256-byte stack per vCPU, below 0x7C00 */
    shl     $8, %ax
    mov     $0x7c00, %sp
    sub     %ax, %sp
    test    %si, %si
    jnz     ap_main

    movw    $gp_handler, 13*4   /* IVT[13] = 0000:gp_handler */
    movw    $0, 13*4+2
    movw    $ud_handler, 6*4    /* IVT[6] = 0000:ud_handler */
    movw    $0, 6*4+2
    call    detect
    cmpb    $0, advertised
    je      no_feature

/* ---- bit 17 set: walk the protocol ---------------------------------------- */
    mov     $9, %ax
    call    plan
    mov     sig_ok, %al
    mov     %al, pass
    REPORT    t_signature

    call    rd
    EXPECT_NOFAULT
    cmp     $1, %eax
    jbe     1f
    movb    $0, pass
1:  mov     %ax, initial
    REPORT    t_initial
    mov     $d_initial, %si
    call    puts
    mov     initial, %ax
    call    putdec
    call    newline

    WRITE   1, 0
    EXPECT_NOFAULT
    REPORT    t_write_ready

    call    rd
    EXPECT_NOFAULT
    EXPECT_VALUE 1
    REPORT    t_read_ready

    WRITE   2, 0
    EXPECT_FAULT
    REPORT    t_reserved_low

    WRITE   1, 1
    EXPECT_FAULT
    REPORT    t_reserved_high

    call    rd
    EXPECT_VALUE 1
    REPORT    t_unchanged

    WRITE   0, 0
    EXPECT_NOFAULT
    call    rd
    EXPECT_NOFAULT
    EXPECT_VALUE 0
    REPORT    t_revoke

    WRITE   1, 0
    EXPECT_NOFAULT
    call    rd
    EXPECT_NOFAULT
    EXPECT_VALUE 1
    REPORT    t_ready_again
    call    map_gpa_range
    jmp     other_vcpus

/* ---- bit 17 clear: the MSR must not exist -------------------------------- */
no_feature:
    mov     $4, %ax
    call    plan
    mov     sig_ok, %al
    mov     %al, pass
    REPORT    t_signature
    call    rd
    EXPECT_FAULT
    REPORT    t_nf_read
    WRITE   1, 0
    EXPECT_FAULT
    REPORT    t_nf_write_ready
    WRITE   0, 0
    EXPECT_FAULT
    REPORT    t_nf_write_zero
    call    map_gpa_range

/* ---- let the other vCPUs take their turns, then report ------------------- */
other_vcpus:
    cmpw    $1, ncpus
    jbe     finish
    movw    $1, turn
1:  pause
    mov     turn, %ax
    cmp     ncpus, %ax
    jb      1b
    cmpw    $0, ap_failures
    je      2f
    movb    $0, pass
2:  REPORT    t_other_vcpus

finish:
    mov     $d_gp, %si
    call    puts
    mov     gp_total, %ax
    call    putdec
    mov     $d_gp_end, %si
    call    puts
    mov     failures, %al
    mov     $DEBUG_EXIT, %dx
    outb    %al, %dx
    hlt

/* ---- vCPUs 1..N-1 -------------------------------------------------------- */
ap_main:
1:  pause
    cmp     turn, %si
    jne     1b
    call    detect
    movb    $1, pass
    cmpb    $0, advertised
    je      2f
    WRITE   0, 0
    EXPECT_NOFAULT
    call    rd
    EXPECT_VALUE 0
    WRITE   1, 0
    EXPECT_NOFAULT
    call    rd
    EXPECT_VALUE 1
    jmp     3f
2:  call    rd
    EXPECT_FAULT
    WRITE   1, 0
    EXPECT_FAULT
3:  cmpb    $0, pass
    jne     4f
    lock incw ap_failures
4:  lock incw turn
5:  hlt
    jmp     5b

/* ---- helpers ------------------------------------------------------------- */

/* CPUID: sig_ok, advertised (leaf 0x40000001 EAX bit 17), ncpus (>= 1). */
detect:
    movb    $0, sig_ok
    mov     $0x40000000, %eax
    cpuid
    cmp     $0x4b4d564b, %ebx
    jne     1f
    cmp     $0x564b4d56, %ecx
    jne     1f
    cmp     $0x4d, %edx
    jne     1f
    movb    $1, sig_ok
1:  mov     $0x40000001, %eax
    cpuid
    bt      $17, %eax
    setc    advertised
    bt      $16, %eax
    setc    map_gpa
    mov     $1, %eax
    cpuid
    shr     $16, %ebx
    and     $0xff, %bx
    jnz     2f
    inc     %bx
2:  mov     %bx, ncpus
    ret

/* RDMSR MSR_KVM_MIGRATION_CONTROL -> EDX:EAX (all ones if it faulted). */
rd:
    movb    $0, faulted
    mov     $MSR_KVM_MIGRATION_CONTROL, %ecx
    mov     $-1, %eax
    mov     $-1, %edx
    rdmsr
    ret

/* WRMSR MSR_KVM_MIGRATION_CONTROL <- EDX:EAX. */
wr:
    movb    $0, faulted
    mov     $MSR_KVM_MIGRATION_CONTROL, %ecx
    wrmsr
    ret

/* When CPUID bit 16 is set: KVM_HC_MAP_GPA_RANGE(gpa 0x10000, 1 page, attrs 0 =
 * decrypted, 4K hint) with VMMCALL; it must return RAX = 0.  #UD -> TAP SKIP. */
map_gpa_range:
    cmpb    $0, map_gpa
    je      2f
    movb    $0, faulted
    mov     $12, %eax
    mov     $0x10000, %ebx
    mov     $1, %ecx
    xor     %edx, %edx
    vmmcall
    cmpb    $0, faulted
    jne     1f
    test    %eax, %eax
    jz      3f
    movb    $0, pass
3:  mov     $t_map_gpa, %si
    jmp     tap
1:  mov     $t_map_gpa_ud, %si
    jmp     tap
2:  ret

/* #UD: skip the 3-byte VMMCALL that faulted. */
ud_handler:
    push    %bp
    mov     %sp, %bp
    addw    $3, 2(%bp)
    movb    $1, faulted
    pop     %bp
    iret

/* #GP: skip the 2-byte RDMSR/WRMSR that faulted (the pushed IP points at it). */
gp_handler:
    push    %bp
    mov     %sp, %bp
    addw    $2, 2(%bp)
    movb    $1, faulted
    lock incw gp_total
    pop     %bp
    iret

/* "1..N\n", N = AX (+1 with KVM_HC_MAP_GPA_RANGE, +1 when there are other vCPUs). */
plan:
    cmpb    $0, map_gpa
    je      1f
    inc     %ax
1:  cmpw    $1, ncpus
    jbe     2f
    inc     %ax
2:  push    %ax
    mov     $d_plan, %si
    call    puts
    pop     %ax
    call    putdec
    jmp     newline

/* "ok N - <SI>\n" or "not ok N - <SI>\n" from `pass`; then pass = 1. */
tap:
    push    %si
    cmpb    $0, pass
    jne     1f
    incb    failures
    mov     $d_not, %si
    call    puts
1:  mov     $d_ok, %si
    call    puts
    incw    testno
    mov     testno, %ax
    call    putdec
    mov     $d_dash, %si
    call    puts
    pop     %si
    call    puts
    movb    $1, pass
    jmp     newline

#include "console.inc"

/* ---- data (in the image: the whole of RAM is writable) ------------------- */
    .p2align 1
turn:        .word 0            /* which vCPU may touch the MSR */
ncpus:       .word 1
ap_failures: .word 0
gp_total:    .word 0            /* #GPs taken, all vCPUs */
testno:      .word 0
initial:     .word 0
failures:    .byte 0
pass:        .byte 1
faulted:     .byte 0
advertised:  .byte 0
map_gpa:     .byte 0
sig_ok:      .byte 0

d_plan:           .asciz "1.."
d_not:            .asciz "not "
d_ok:             .asciz "ok "
d_dash:           .asciz " - "
d_initial:        .asciz "# initial value "
d_gp:             .asciz "# guest saw "
d_gp_end:         .asciz " #GP\n"
t_signature:      .asciz "CPUID 0x40000000 has the KVMKVMKVM signature"
t_initial:        .asciz "initial RDMSR 0x4b564d08 does not fault and reads 0 or 1"
t_write_ready:    .asciz "WRMSR KVM_MIGRATION_READY is accepted"
t_read_ready:     .asciz "RDMSR reads back 1"
t_reserved_low:   .asciz "WRMSR with reserved bit 1 raises #GP"
t_reserved_high:  .asciz "WRMSR with reserved bit 32 raises #GP"
t_unchanged:      .asciz "the value is unchanged after the faulting writes"
t_revoke:         .asciz "WRMSR 0 (revoke) is accepted and reads back 0"
t_ready_again:    .asciz "WRMSR KVM_MIGRATION_READY again reads back 1"
t_nf_read:        .asciz "without CPUID bit 17, RDMSR 0x4b564d08 raises #GP"
t_nf_write_ready: .asciz "without CPUID bit 17, WRMSR READY raises #GP"
t_nf_write_zero:  .asciz "without CPUID bit 17, WRMSR 0 raises #GP"
t_map_gpa:        .asciz "KVM_HC_MAP_GPA_RANGE (VMMCALL) declared 0x10000 shared and returned 0"
t_map_gpa_ud:     .asciz "KVM_HC_MAP_GPA_RANGE (VMMCALL) # SKIP the host raised #UD: the hypercall never reached the VMM"
t_other_vcpus:    .asciz "every other vCPU revoked and re-announced (or faulted) as expected"
