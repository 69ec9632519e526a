/*
 * memcheck.S - a guest that detects, by itself, a lost or stale page and a
 * lost register after a snapshot restore or a live migration (real mode,
 * 1..8 vCPUs, works in the default 1 MiB of guest memory).
 *
 * Contract (docs/contracts.md, "Guest images"): flat binary at 0x7C00, real
 * mode, CS=DS=ES=SS=0, SI = vCPU index, every vCPU starts here; 0xE9 console,
 * 0xF4 debug exit, 0xF5 power button (IN reads 1 once pressed).
 *
 * Memory layout (physical):
 *   0x00000-0x0007F  IVT[0..31] -> fault (any exception: report and exit 3)
 *   0x6E00-0x7BFF    stacks, 512 bytes per vCPU: SP = 0x7C00 - index*512
 *   0x7C00-...       this image: code, then the per-vCPU tables (gens, xmm_slots)
 *   0x20000 + i*0x10000, 64 KiB (16 pages): vCPU i's region, reached through
 *                    FS = 0x2000 + i*0x1000 (DS/ES stay 0, for puts)
 *
 * vCPU 0 first: if CPUID 0x40000001 EAX bit 17 is set, WRMSR
 * MSR_KVM_MIGRATION_CONTROL <- 1 (READY) and remember it; print
 * "memcheck: N vCPUs" (N = CPUID.01H:EBX[23:16]).  Every vCPU then enables
 * SSE (CR4.OSFXSR|OSXMMEXCPT, CR0.EM=0, CR0.MP=1) and keeps a generation G,
 * starting at 1, in four copies: gens[i] (memory), EBP, EDI and XMM1 dword 0.
 * Each round, printing nothing:
 *   (a) every dword k of the region must hold pattern(G-1, k) (not in round 1);
 *   (b) every dword is rewritten with pattern(G, k) - (a) and (b) are one pass;
 *   (c) the four copies of G must agree, and FS, SP, DS/ES/SS and SI (against
 *       CPUID.01H:EBX[31:24]) must still be what this vCPU set;
 *   (d) G += 1 in every copy;
 *   (e) IN port 0xF5; on 1 go to the final check.
 * Final check: the region against the last generation written, the copies of
 * G, and (vCPU 0, if it wrote READY) RDMSR 0x4b564d08 == 0:1.  Then `lock incw
 * done`; vCPU 0 waits for done == N, prints "memcheck: ok, generation G"
 * (G = the last generation written = rounds completed, vCPU 0's, decimal)
 * and exits through 0xF4 with 0.  Other vCPUs halt.
 *
 * Failures (any vCPU, any time) print one line and exit through 0xF4 with 3:
 *   "memcheck: vCPU i page mismatch"      a dword of the region is wrong
 *   "memcheck: vCPU i register mismatch"  a copy of G, FS, SP, a segment or SI
 *   "memcheck: vCPU i MSR mismatch"       READY was lost
 *   "memcheck: vCPU i unexpected exception"
 * More than 8 vCPUs: "memcheck: at most 8 vCPUs", exit 2.
 *
 * pattern(G, k) = (G << 17) | (i << 14) | k, for dword index k (0..16383,
 * bits 0-13), vCPU index i (0..7, bits 14-16), G mod 2^15 (bits 17-31).  The
 * fields do not overlap, so every dword of every region of every generation
 * (within 32768 of each other) holds a different value: a page copied from
 * another page (bits 10-13 differ), from another vCPU's region (bits 14-16),
 * or left from an older generation (bits 17-31) is caught, and so is a page of
 * zeros.  The OR is also an add, so the loop only increments.
 *
 * SSE on this host (kvm_pvm, every real-mode instruction emulated): KVM's
 * emulator has no MOVD (66 0F 6E/7E) - it stops the VM with a KVM internal
 * error (emulation failure), not a #UD - but does emulate MOVDQU (F3 0F 6F/7F).
 * So XMM1 is loaded and read through a 16-byte memory slot per vCPU.
 *
 * Cost: about 7 emulated instructions per dword, 16384 dwords per round.
 *
 * Disassemble: objdump -D -b binary -m i8086 --adjust-vma=0x7c00 memcheck.bin
 */
#include "contract.inc"

    .set MAX_VCPUS, 8
    .set REGION_SEG, 0x2000         /* 0x20000 >> 4; + index * 0x1000 */
    .set PATTERN_G, 17              /* pattern(G, k): G's shift */
    .set PATTERN_I, 14              /*                the index's shift */
    .set CR0_MP, 1 << 1
    .set CR0_EM, 1 << 2
    .set CR4_OSFXSR, 1 << 9
    .set CR4_OSXMMEXCPT, 1 << 10

_start:
    cli
    cld
    xor     %ax, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    movzwl  %si, %esi           /* the index, also for 32-bit addressing */
    cmp     $MAX_VCPUS, %si     /* no table slot, no region: vCPU 0 says so */
    jae     park
    mov     %si, %ax            /* a 512-byte stack per vCPU, below 0x7C00 */
    shl     $9, %ax
    mov     $0x7c00, %sp
    sub     %ax, %sp

    xor     %di, %di            /* IVT[0..31] = 0000:fault (no BIOS here) */
    mov     $32, %cx
1:  movw    $fault, %ax
    stosw
    xor     %ax, %ax
    stosw
    loop    1b

    mov     %cr0, %eax          /* SSE, for the XMM1 copy of G */
    and     $~CR0_EM, %eax
    or      $CR0_MP, %eax
    mov     %eax, %cr0
    mov     %cr4, %eax
    or      $(CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
    mov     %eax, %cr4

    mov     %si, %ax            /* FS = this vCPU's region */
    shl     $12, %ax
    add     $REGION_SEG, %ax
    mov     %ax, %fs

    test    %si, %si
    jnz     start_rounds
    ANNOUNCE_READY 1f           /* vCPU 0: READY if migration control exists */
    movb    $1, wrote_ready
1:  mov     $1, %eax
    cpuid
    shr     $16, %ebx
    and     $0xff, %bx
    jnz     2f
    inc     %bx                 /* 0: a host that does not set it, 1 vCPU */
2:  mov     %bx, ncpus
    mov     $m_banner, %si
    call    puts
    mov     ncpus, %ax
    call    putdec
    mov     $m_vcpus, %si
    call    puts
    xor     %esi, %esi
    cmpw    $MAX_VCPUS, ncpus
    jbe     start_rounds
    mov     $m_too_many, %si
    call    puts
    mov     $2, %al
    outb    %al, $DEBUG_EXIT

start_rounds:
    mov     $1, %edi            /* G = 1 in all four copies */
    mov     %edi, %ebp
    mov     %edi, gens(,%esi,4)
    call    set_xmm1

round:
    mov     gens(,%esi,4), %edx
    call    pattern_base        /* EDX = pattern(G, 0) */
    mov     %edx, %eax
    sub     $1 << PATTERN_G, %eax   /* EAX = pattern(G-1, 0) */
    cmpl    $1, gens(,%esi,4)
    je      1f
    call    check_and_fill      /* (a) + (b) */
    jmp     2f
1:  call    fill                /* round 1: nothing written yet */
2:  call    check_regs          /* (c) */
    incl    gens(,%esi,4)       /* (d) */
    inc     %ebp
    inc     %edi
    call    set_xmm1
    inb     $POWER_BUTTON, %al  /* (e) */
    cmp     $1, %al
    jne     round

/* ---- the power button was pressed: check once more, then report ---------- */
    mov     gens(,%esi,4), %edx
    dec     %edx                /* the last generation written */
    call    pattern_base
    mov     %edx, %eax
    call    check
    call    check_regs
    test    %si, %si
    jnz     1f
    cmpb    $1, wrote_ready
    jne     1f
    mov     $MSR_KVM_MIGRATION_CONTROL, %ecx
    rdmsr
    cmp     $1, %eax
    jne     msr_mismatch
    test    %edx, %edx
    jnz     msr_mismatch
1:  lock incw done
    test    %si, %si
    jnz     park
2:  pause                       /* vCPU 0: wait for every vCPU's checks */
    mov     done, %ax
    cmp     ncpus, %ax
    jb      2b
    mov     $m_ok, %si
    call    puts
    mov     gens, %eax
    dec     %eax
    call    putdec32
    call    newline
    xor     %al, %al
    outb    %al, $DEBUG_EXIT
park:
    hlt
    jmp     park

/* ---- the checks ---------------------------------------------------------- */

/* EDX = pattern(EDX, 0) = (EDX << 17) | (index << 14).  Clobbers ECX. */
pattern_base:
    shl     $PATTERN_G, %edx
    mov     %esi, %ecx
    shl     $PATTERN_I, %ecx
    or      %ecx, %edx
    ret

/* Each dword of FS:0..FFFF must be EAX + its index; then write EDX + index.
 * BX walks the 64 KiB and wraps to 0 at the end. */
check_and_fill:
    xor     %bx, %bx
1:  cmp     %eax, %fs:(%bx)
    jne     page_mismatch
    mov     %edx, %fs:(%bx)
    inc     %eax
    inc     %edx
    add     $4, %bx
    jnz     1b
    ret

/* Write EDX + dword index to every dword of the region. */
fill:
    xor     %bx, %bx
1:  mov     %edx, %fs:(%bx)
    inc     %edx
    add     $4, %bx
    jnz     1b
    ret

/* Each dword of the region must be EAX + its index. */
check:
    xor     %bx, %bx
1:  cmp     %eax, %fs:(%bx)
    jne     page_mismatch
    inc     %eax
    add     $4, %bx
    jnz     1b
    ret

/* The copies of G agree, and the registers this vCPU set up are intact. */
check_regs:
    mov     gens(,%esi,4), %eax
    cmp     %eax, %ebp
    jne     reg_mismatch
    cmp     %eax, %edi
    jne     reg_mismatch
    mov     %si, %bx
    shl     $4, %bx
    movdqu  %xmm1, xmm_slots(%bx)   /* no MOVD here: see the header */
    cmp     %eax, xmm_slots(%bx)
    jne     reg_mismatch
    mov     %si, %ax            /* FS still the region */
    shl     $12, %ax
    add     $REGION_SEG, %ax
    mov     %fs, %cx
    cmp     %ax, %cx
    jne     reg_mismatch
    mov     %si, %ax            /* SP: this vCPU's stack, one return address */
    shl     $9, %ax
    neg     %ax
    add     $0x7c00 - 2, %ax
    cmp     %ax, %sp
    jne     reg_mismatch
    mov     %ds, %ax
    mov     %es, %cx
    or      %cx, %ax
    mov     %ss, %cx
    or      %cx, %ax
    jnz     reg_mismatch
    mov     $1, %eax            /* SI is still this vCPU's index */
    cpuid
    shr     $24, %ebx
    cmp     %ebx, %esi
    jne     reg_mismatch
    ret

/* XMM1 dword 0 = EDI (G), through this vCPU's 16-byte slot. */
set_xmm1:
    mov     %si, %bx
    shl     $4, %bx
    mov     %edi, xmm_slots(%bx)
    movdqu  xmm_slots(%bx), %xmm1
    ret

/* ---- failures: "memcheck: vCPU <SI><reason>", exit 3 --------------------- */
page_mismatch:
    mov     $m_page, %di
    jmp     fail
reg_mismatch:
    mov     $m_reg, %di
    jmp     fail
msr_mismatch:
    mov     $m_msr, %di
    jmp     fail
fault:
    mov     $m_fault, %di
fail:
    xor     %ax, %ax            /* the fault may come from anywhere */
    mov     %ax, %ds
    mov     %ax, %es
    cld
    push    %di
    push    %si
    mov     $m_vcpu, %si
    call    puts
    pop     %ax
    call    putdec
    pop     %si
    call    puts
    mov     $3, %al
    outb    %al, $DEBUG_EXIT
    jmp     park

/* EAX as unsigned decimal.  Clobbers EAX, EBX, CX, EDX. */
putdec32:
    mov     $10, %ebx
    xor     %cx, %cx
1:  xor     %edx, %edx
    div     %ebx
    push    %dx
    inc     %cx
    test    %eax, %eax
    jnz     1b
2:  pop     %ax
    add     $'0', %al
    call    putc
    loop    2b
    ret

#include "console.inc"

/* ---- data (in the image) ------------------------------------------------- */
    .p2align 4
xmm_slots:   .fill MAX_VCPUS * 16, 1, 0     /* XMM1 goes through here */
gens:        .fill MAX_VCPUS, 4, 0          /* G, the memory copy */
ncpus:       .word 1
done:        .word 0            /* vCPUs that passed the final check */
wrote_ready: .byte 0            /* vCPU 0 wrote READY */

m_banner:    .asciz "memcheck: "
m_vcpus:     .asciz " vCPUs\n"
m_too_many:  .asciz "memcheck: at most 8 vCPUs\n"
m_ok:        .asciz "memcheck: ok, generation "
m_vcpu:      .asciz "memcheck: vCPU "
m_page:      .asciz " page mismatch\n"
m_reg:       .asciz " register mismatch\n"
m_msr:       .asciz " MSR mismatch\n"
m_fault:     .asciz " unexpected exception\n"
