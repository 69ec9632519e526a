/*
 * memcheck64.S - memcheck in 64-bit long mode: a guest that detects, by
 * itself, a lost or stale page and a lost register (general, XMM, segment,
 * and the FS and GS bases) after a snapshot restore or a live migration.
 * Lost paging or mode state (CR0/CR3/CR4/EFER, GDTR) cannot pass silently
 * either: the guest faults (IDT -> exit 3) or triple-faults (exit "shutdown").
 * 1..4 vCPUs; needs guest memory >= 8 MiB (`--memory 8M`).
 *
 * Contract (docs/contracts.md, "Guest images"): flat binary at 0x7C00, real
 * mode, CS=DS=ES=SS=0, SI = vCPU index, every vCPU starts here; 0xE9 console,
 * 0xF4 debug exit, 0xF5 power button (IN reads 1 once pressed).
 *
 * Memory layout (physical = linear: the first 1 GiB is identity-mapped):
 *   0x1000  PML4 (one entry)        0x2000  PDPT (one entry)
 *   0x3000  PD: 512 x 2 MiB pages, 0..1 GiB, present + writable
 *   0x4000 + i*0x40  vCPU i's GS block: +0 G (the memory copy, a qword),
 *                    +8 the vCPU index, +16 the 16-byte XMM1 slot
 *   0x5000  IDT: 32 interrupt gates -> fault64 (report and exit 3)
 *   0x6E00-0x7BFF    stacks, 512 bytes per vCPU: SP = 0x7C00 - index*512
 *   0x7C00-...       this image: code, GDT (null, 0x08 64-bit code, 0x10 data)
 *   0x200000 + i*0x100000, 128 KiB (32 pages): vCPU i's region, only ever
 *                    reached through %fs: (MSR_FS_BASE = its start)
 * vCPU 0 zeroes 0x1000-0x5FFF and builds the tables in real mode, then sets
 * tables_ready; the other vCPUs spin on it, then all enter long mode the
 * same way: LGDT, CR4.PAE|OSFXSR|OSXMMEXCPT, CR3, EFER.LME (WRMSR
 * 0xC0000080), CR0.PG|PE|MP (EM clear), far jump to 0x08, DS/ES/SS = 0x10,
 * LIDT, MSR_FS_BASE (0xC0000100) and MSR_GS_BASE (0xC0000101).
 *
 * vCPU 0 first prints "memcheck64: N vCPUs" (N = CPUID.01H:EBX[23:16]) and,
 * if CPUID 0x40000001 EAX bit 17 is set, WRMSRs MSR_KVM_MIGRATION_CONTROL <- 1
 * (READY), still in real mode.  Every vCPU keeps a generation G, starting at
 * 1, in five copies: %gs:0, R12, R13, RBP and XMM1's low qword.  Each round,
 * printing nothing:
 *   (a) every dword k of the region must hold pattern(G-1, k) (not in round 1);
 *   (b) every dword is rewritten with pattern(G, k) - (a) and (b) are one pass;
 *   (c) the copies of G must agree, and %gs:8, RSI (against CPUID.01H:EBX
 *       [31:24]), RSP, CS/DS/ES/SS and the FS and GS bases (RDMSR) must still
 *       be what this vCPU set;
 *   (d) G += 1 in every copy;
 *   (e) IN port 0xF5; on 1 go to the final check.
 * Final check: the region against the last generation written, (c) again,
 * and (vCPU 0, if it wrote READY) RDMSR 0x4b564d08 == 0:1.  Then `lock incl
 * done`; vCPU 0 waits for done == N, prints "memcheck64: ok, generation G"
 * (G = the last generation written = rounds completed, vCPU 0's, decimal)
 * and exits through 0xF4 with 0.  Other vCPUs halt.
 *
 * Failures (any vCPU, any time) print one line and exit through 0xF4 with 3:
 *   "memcheck64: vCPU i page mismatch"      a dword of the region is wrong
 *   "memcheck64: vCPU i register mismatch"  a copy of G, a segment, a base...
 *   "memcheck64: vCPU i MSR mismatch"       READY was lost
 *   "memcheck64: vCPU i unexpected exception"
 * More than 4 vCPUs: "memcheck64: at most 4 vCPUs", exit 2.  Too little
 * memory is not detected: the region accesses then fail in the host.
 *
 * pattern(G, k) = (G << 17) | (i << 15) | k, for dword index k (0..32767,
 * bits 0-14), vCPU index i (0..3, bits 15-16), G mod 2^15 (bits 17-31).  The
 * fields do not overlap, so every dword of every region of every generation
 * (within 32768 of each other) holds a different value: a page copied from
 * another page (bits 10-14 differ), from another vCPU's region (bits 15-16),
 * or left from an older generation (bits 17-31) is caught, and so is a page of
 * zeros.  The OR is also an add, so the loop only increments - and the loop
 * goes a qword at a time (dwords 2j and 2j+1 together), halving its cost.
 *
 * SSE on this host (kvm_pvm, every CPL0 instruction emulated): KVM's emulator
 * has no MOVD/MOVQ to or from XMM (66 0F 6E/7E: KVM internal error, not #UD),
 * but emulates MOVDQU (F3 0F 6F/7F), so XMM1 goes through %gs:16.
 *
 * Cost: about 7 emulated instructions per qword, 16384 qwords per round.
 *
 * Disassemble: objdump -D -b binary -m i8086 --adjust-vma=0x7c00 memcheck64.bin
 * (the 16-bit start), and with -m i386:x86-64 from long_mode on.
 */
#include "contract.inc"

    .set MAX_VCPUS, 4
    .set PML4, 0x1000
    .set PDPT, 0x2000
    .set PD, 0x3000
    .set GS_BLOCKS, 0x4000          /* + index * GS_BLOCK */
    .set GS_BLOCK, 0x40
    .set IDT, 0x5000
    .set TABLES_END, 0x6000
    .set REGION, 0x200000           /* + index << REGION_SHIFT */
    .set REGION_SHIFT, 20
    .set REGION_SIZE, 0x20000
    .set PATTERN_G, 17              /* pattern(G, k): G's shift */
    .set PATTERN_I, 15              /*                the index's shift */
    .set QWORD_STEP, 0x0000000200000002 /* k += 2 in both halves of a qword */
    .set CODE64, 0x08
    .set DATA, 0x10
    .set MSR_EFER, 0xc0000080
    .set MSR_FS_BASE, 0xc0000100
    .set MSR_GS_BASE, 0xc0000101
    .set EFER_LME, 1 << 8
    .set CR0_PE, 1 << 0
    .set CR0_MP, 1 << 1
    .set CR0_EM, 1 << 2
    .set CR0_PG, 1 << 31
    .set CR4_PAE, 1 << 5
    .set CR4_OSFXSR, 1 << 9
    .set CR4_OSXMMEXCPT, 1 << 10
    .set G_SLOT, 0                  /* the GS block */
    .set INDEX_SLOT, 8
    .set XMM_SLOT, 16

_start:
    cli
    cld
    xor     %ax, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    movzwl  %si, %esi
    cmp     $MAX_VCPUS, %si     /* no GS block, no region: vCPU 0 says so */
    jae     park16
    mov     %si, %ax            /* a 512-byte stack per vCPU, below 0x7C00 */
    shl     $9, %ax
    mov     $0x7c00, %sp
    sub     %ax, %sp
    test    %si, %si
    jz      vcpu0
1:  pause                       /* the others: wait for vCPU 0's tables */
    cmpb    $1, tables_ready
    jne     1b
    jmp     enter_long_mode

vcpu0:
    mov     $1, %eax
    cpuid
    shr     $16, %ebx
    and     $0xff, %bx
    jnz     1f
    inc     %bx                 /* 0: a host that does not set it, 1 vCPU */
1:  mov     %bx, ncpus
    mov     $m_banner, %si
    call    puts
    mov     ncpus, %ax
    call    putdec
    mov     $m_vcpus, %si
    call    puts
    xor     %esi, %esi          /* SI is the index again */
    cmpw    $MAX_VCPUS, ncpus
    jbe     1f
    mov     $m_too_many, %si
    call    puts
    mov     $2, %al
    outb    %al, $DEBUG_EXIT
    jmp     park16
1:  ANNOUNCE_READY 1f           /* READY if migration control exists */
    movb    $1, wrote_ready

1:  mov     $PML4, %di          /* zero the tables, GS blocks and IDT */
    mov     $(TABLES_END - PML4) / 4, %cx
    xor     %eax, %eax
    rep stosl
    movl    $PDPT | 3, PML4     /* present, writable */
    movl    $PD | 3, PDPT
    mov     $PD, %di
    mov     $0x83, %eax         /* present, writable, 2 MiB page */
    mov     $512, %cx
2:  mov     %eax, (%di)
    add     $0x200000, %eax
    add     $8, %di
    loop    2b
    mov     $IDT, %di           /* 32 interrupt gates: CODE64:fault64, P, DPL 0 */
    mov     $32, %cx
3:  movw    $fault64, (%di)
    movw    $CODE64, 2(%di)
    movw    $0x8e00, 4(%di)
    add     $16, %di
    loop    3b
    movb    $1, tables_ready

enter_long_mode:
    lgdtl   gdt_desc
    mov     %cr4, %eax
    or      $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
    mov     %eax, %cr4
    mov     $PML4, %eax
    mov     %eax, %cr3
    mov     $MSR_EFER, %ecx
    rdmsr
    or      $EFER_LME, %eax
    wrmsr
    mov     %cr0, %eax
    and     $~CR0_EM, %eax
    or      $(CR0_PG | CR0_PE | CR0_MP), %eax
    mov     %eax, %cr0          /* PE and PG at once: IA-32e, compatibility */
    ljmp    $CODE64, $long_mode

park16:
    hlt
    jmp     park16

#include "console.inc"

/* ---- 64-bit ------------------------------------------------------------- */
    .code64
long_mode:
    mov     $DATA, %eax
    mov     %eax, %ds
    mov     %eax, %es
    mov     %eax, %ss
    lidt    idt_desc(%rip)
    mov     %esi, %esi          /* RSI = the index (the upper half is undefined) */
    mov     %esi, %eax
    shl     $9, %eax
    mov     $0x7c00, %esp
    sub     %eax, %esp          /* zero-extends: RSP as in real mode */
    mov     $MSR_FS_BASE, %ecx  /* FS base = this vCPU's region */
    call    fs_base
    xor     %edx, %edx
    wrmsr
    mov     $MSR_GS_BASE, %ecx  /* GS base = this vCPU's block */
    call    gs_base
    xor     %edx, %edx
    wrmsr
    mov     %rsi, %gs:INDEX_SLOT
    mov     $1, %r12d           /* G = 1 in all five copies */
    mov     %r12, %r13
    mov     %r12, %rbp
    mov     %r12, %gs:G_SLOT
    call    set_xmm1

round:
    mov     %gs:G_SLOT, %rdx
    dec     %rdx
    call    first_qword
    mov     %rax, %r10
    mov     %gs:G_SLOT, %rdx
    call    first_qword
    mov     %rax, %rdx          /* RDX = dwords 0 and 1 of generation G */
    mov     %r10, %rax          /* RAX = the same of G-1 */
    cmpq    $1, %gs:G_SLOT
    je      1f
    call    check_and_fill      /* (a) + (b) */
    jmp     2f
1:  call    fill                /* round 1: nothing written yet */
2:  call    check_regs          /* (c) */
    incq    %gs:G_SLOT          /* (d) */
    inc     %r12
    inc     %r13
    inc     %rbp
    call    set_xmm1
    inb     $POWER_BUTTON, %al  /* (e) */
    cmp     $1, %al
    jne     round

/* ---- the power button was pressed: check once more, then report ---------- */
    mov     %gs:G_SLOT, %rdx
    dec     %rdx                /* the last generation written */
    call    first_qword
    call    check
    call    check_regs
    test    %esi, %esi
    jnz     1f
    cmpb    $1, wrote_ready(%rip)
    jne     1f
    mov     $MSR_KVM_MIGRATION_CONTROL, %ecx
    rdmsr
    cmp     $1, %eax
    jne     msr_mismatch
    test    %edx, %edx
    jnz     msr_mismatch
1:  lock incl done(%rip)
    test    %esi, %esi
    jnz     park64
2:  pause                       /* vCPU 0: wait for every vCPU's checks */
    mov     done(%rip), %eax
    cmp     ncpus(%rip), %ax
    jb      2b
    mov     $m_ok, %edi
    call    puts64
    mov     %gs:G_SLOT, %rax
    dec     %rax
    call    putdec64
    mov     $m_newline, %edi
    call    puts64
    xor     %al, %al
    outb    %al, $DEBUG_EXIT
park64:
    hlt
    jmp     park64

/* ---- the checks ---------------------------------------------------------- */

/* EDX = pattern(EDX, 0) = (EDX << 17) | (index << 15), zero-extended.
 * Clobbers ECX. */
pattern_base:
    shl     $PATTERN_G, %edx
    mov     %esi, %ecx
    shl     $PATTERN_I, %ecx
    or      %ecx, %edx
    ret

/* RAX = dwords 0 and 1 of generation RDX: pattern(RDX, 0) and, in the high
 * half, pattern(RDX, 1) (no carry: k's field is 0).  Clobbers RCX, RDX. */
first_qword:
    call    pattern_base
    mov     %edx, %eax
    inc     %edx
    shl     $32, %rdx
    or      %rdx, %rax
    ret

/* The region is walked a qword (two dwords) at a time, RBX from -REGION_SIZE
 * up to 0; both dwords' k advance by 2 (R8) per qword, never carrying out of
 * the 15-bit field, so this checks and writes exactly the dword patterns.
 * Each qword must be RAX (+ R8 per qword); then write RDX (+ R8 per qword). */
check_and_fill:
    mov     $QWORD_STEP, %r8
    mov     $-REGION_SIZE, %rbx
1:  cmp     %rax, %fs:REGION_SIZE(%rbx)
    jne     page_mismatch
    mov     %rdx, %fs:REGION_SIZE(%rbx)
    add     %r8, %rax
    add     %r8, %rdx
    add     $8, %rbx
    jnz     1b
    ret

/* Write RDX (+ R8 per qword) to the region. */
fill:
    mov     $QWORD_STEP, %r8
    mov     $-REGION_SIZE, %rbx
1:  mov     %rdx, %fs:REGION_SIZE(%rbx)
    add     %r8, %rdx
    add     $8, %rbx
    jnz     1b
    ret

/* Each qword of the region must be RAX (+ R8 per qword). */
check:
    mov     $QWORD_STEP, %r8
    mov     $-REGION_SIZE, %rbx
1:  cmp     %rax, %fs:REGION_SIZE(%rbx)
    jne     page_mismatch
    add     %r8, %rax
    add     $8, %rbx
    jnz     1b
    ret

/* The copies of G agree, and the state this vCPU set up is intact. */
check_regs:
    mov     %gs:G_SLOT, %rax
    cmp     %rax, %r12
    jne     reg_mismatch
    cmp     %rax, %r13
    jne     reg_mismatch
    cmp     %rax, %rbp
    jne     reg_mismatch
    movdqu  %xmm1, %gs:XMM_SLOT     /* no MOVQ here: see the header */
    cmp     %rax, %gs:XMM_SLOT
    jne     reg_mismatch
    cmp     %rsi, %gs:INDEX_SLOT
    jne     reg_mismatch
    mov     %esi, %eax          /* RSP: this vCPU's stack, one return address */
    shl     $9, %eax
    neg     %rax
    add     $0x7c00 - 8, %rax
    cmp     %rax, %rsp
    jne     reg_mismatch
    mov     %cs, %eax
    cmp     $CODE64, %eax
    jne     reg_mismatch
    mov     %ds, %eax
    cmp     $DATA, %eax
    jne     reg_mismatch
    mov     %es, %eax
    cmp     $DATA, %eax
    jne     reg_mismatch
    mov     %ss, %eax
    cmp     $DATA, %eax
    jne     reg_mismatch
    mov     $MSR_FS_BASE, %ecx
    rdmsr
    shl     $32, %rdx
    or      %rax, %rdx
    call    fs_base
    cmp     %rax, %rdx
    jne     reg_mismatch
    mov     $MSR_GS_BASE, %ecx
    rdmsr
    shl     $32, %rdx
    or      %rax, %rdx
    call    gs_base
    cmp     %rax, %rdx
    jne     reg_mismatch
    mov     $1, %eax            /* RSI is still this vCPU's index */
    cpuid
    shr     $24, %ebx
    cmp     %rbx, %rsi
    jne     reg_mismatch
    ret

/* RAX = this vCPU's region (its FS base) / GS block (its GS base). */
fs_base:
    mov     %esi, %eax
    shl     $REGION_SHIFT, %eax
    add     $REGION, %eax
    ret
gs_base:
    mov     %esi, %eax
    shl     $6, %eax            /* * GS_BLOCK */
    add     $GS_BLOCKS, %eax
    ret

/* XMM1 = R12 (G), through the GS block's slot. */
set_xmm1:
    mov     %r12, %gs:XMM_SLOT
    mov     %r12, %gs:XMM_SLOT + 8
    movdqu  %gs:XMM_SLOT, %xmm1
    ret

/* ---- failures: "memcheck64: vCPU <RSI><reason>", exit 3 ------------------ */
page_mismatch:
    mov     $m_page, %r9d
    jmp     fail
reg_mismatch:
    mov     $m_reg, %r9d
    jmp     fail
msr_mismatch:
    mov     $m_msr, %r9d
    jmp     fail
fault64:
    mov     $m_fault, %r9d
fail:
    cld
    mov     $m_vcpu, %edi
    call    puts64
    mov     %esi, %eax
    call    putdec64
    mov     %r9, %rdi
    call    puts64
    mov     $3, %al
    outb    %al, $DEBUG_EXIT
    jmp     park64

/* The NUL-terminated string at RDI.  Clobbers AL, RDI. */
puts64:
1:  mov     (%rdi), %al
    test    %al, %al
    jz      2f
    outb    %al, $CONSOLE
    inc     %rdi
    jmp     1b
2:  ret

/* RAX as unsigned decimal.  Clobbers RAX, RCX, RDX, R8. */
putdec64:
    mov     $10, %r8d
    xor     %ecx, %ecx
1:  xor     %edx, %edx
    div     %r8
    push    %rdx
    inc     %ecx
    test    %rax, %rax
    jnz     1b
2:  pop     %rax
    add     $'0', %al
    outb    %al, $CONSOLE
    loop    2b
    ret

/* ---- data (in the image) ------------------------------------------------- */
    .p2align 3
gdt:
    .quad   0
    .quad   0x00af9a000000ffff      /* 0x08: 64-bit code (L=1), DPL 0 */
    .quad   0x00cf92000000ffff      /* 0x10: flat data */
gdt_end:
gdt_desc:
    .word   gdt_end - gdt - 1
    .long   gdt
idt_desc:                           /* LIDT in 64-bit mode: a 64-bit base */
    .word   32 * 16 - 1
    .quad   IDT
done:        .long 0            /* vCPUs that passed the final check */
ncpus:       .word 1
tables_ready: .byte 0           /* vCPU 0 built the tables */
wrote_ready: .byte 0            /* vCPU 0 wrote READY */

m_banner:    .asciz "memcheck64: "
m_vcpus:     .asciz " vCPUs\n"
m_too_many:  .asciz "memcheck64: at most 4 vCPUs\n"
m_ok:        .asciz "memcheck64: ok, generation "
m_newline:   .asciz "\n"
m_vcpu:      .asciz "memcheck64: vCPU "
m_page:      .asciz " page mismatch\n"
m_reg:       .asciz " register mismatch\n"
m_msr:       .asciz " MSR mismatch\n"
m_fault:     .asciz " unexpected exception\n"
