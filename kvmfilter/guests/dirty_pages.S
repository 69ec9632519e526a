/*
 * dirty_pages.S - the benchmark guest for snapshots and live migration: it
 * dirties 128 pages as fast as it can until the power button is pressed.
 * It is also a boot sector (exactly 512 bytes, 0x55 0xAA at 510), so the same
 * binary boots in QEMU from a raw floppy or disk image for comparison.
 *
 * Contract (docs/contracts.md, "Guest images"): flat binary at 0x7C00, real
 * mode; 0xE9 console, 0xF4 debug exit, 0xF5 power button (IN reads 1 once
 * pressed).  Under SeaBIOS only CS:IP = 0000:7C00 (or 07C0:0000) and DL are
 * known, so this guest sets CS, DS, ES, SS and SP itself and ignores SI: every
 * vCPU behaves as vCPU 0 (run it with one).
 *
 * Start: if CPUID 0x40000000 has the KVM signature and 0x40000001 EAX bit 17
 * is set (kvmfilter sets it, QEMU does not), WRMSR MSR_KVM_MIGRATION_CONTROL
 * <- 1 (READY).  Print "dirty_pages: running" (QEMU: -debugcon shows 0xE9).
 * Then, forever: round += 1; write the round counter (a dword) at offset 0 of
 * each of the 128 pages 0x10000, 0x11000, ..., 0x8F000 (512 KiB: inside a
 * 1 MiB kvmfilter guest and inside QEMU's free conventional memory, below
 * the EBDA); IN port 0xF5, and on exactly 1 (QEMU, with no device there,
 * reads 0xFF) print "dirty_pages: powerdown" and OUT 0 to port 0xF4.
 *
 * Memory: 0x7C00-0x7DFF this sector (code, strings, signature); stack below
 * 0x7C00; 0x10000-0x8FFFF the dirtied pages.  EBP = the round counter.
 *
 * Disassemble: objdump -D -b binary -m i8086 --adjust-vma=0x7c00 dirty_pages.bin
 */
#include "contract.inc"

    .set FIRST_SEG, 0x1000          /* 0x10000 >> 4 */
    .set END_SEG, 0x9000            /* 0x90000 >> 4: 128 pages */
    .set PAGE_SEG, 0x100            /* 4 KiB in paragraphs */

_start:
    cli
    ljmp    $0, $1f             /* CS = 0 even if a BIOS came in as 07C0:0000 */
1:  FLAT_SEGMENTS
    cld

    mov     $0x40000000, %eax   /* a KVM hypervisor leaf, before leaf 0x40000001 */
    cpuid
    cmp     $0x4b4d564b, %ebx   /* "KVMKVMKVM\0\0\0" */
    jne     2f
    cmp     $0x40000001, %eax   /* the highest hypervisor leaf */
    jb      2f
    ANNOUNCE_READY 2f
2:  mov     $m_running, %si
    call    puts
    xor     %ebp, %ebp

round:
    inc     %ebp
    mov     $FIRST_SEG, %ax
1:  mov     %ax, %es            /* ES:0 = the next page */
    mov     %ebp, %es:0
    add     $PAGE_SEG, %ax
    cmp     $END_SEG, %ax
    jb      1b
    inb     $POWER_BUTTON, %al
    cmp     $1, %al
    jne     round

    xor     %ax, %ax            /* ES = DS for puts */
    mov     %ax, %es
    mov     $m_powerdown, %si
    call    puts
    xor     %al, %al
    outb    %al, $DEBUG_EXIT
3:  hlt                         /* QEMU without isa-debug-exit: stay here */
    jmp     3b

#include "console.inc"

m_running:   .asciz "dirty_pages: running\n"
m_powerdown: .asciz "dirty_pages: powerdown\n"

    .org    510                 /* the boot signature; the build fails if the code grows past it */
    .byte   0x55, 0xaa
