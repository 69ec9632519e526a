/*
 * triple_fault.S - enters 32-bit protected mode with an empty IDT and raises
 * #UD: #UD cannot be delivered -> #GP -> #DF -> triple fault.  The VMM must
 * report exit.reason "shutdown".  (In real mode KVM does not check the IVT
 * limit, so protected mode is the reliable way to triple-fault.)
 */
    .code16
    .text
    .globl _start
_start:
    cli
    lgdt    gdt_desc
    mov     %cr0, %eax
    or      $1, %eax
    mov     %eax, %cr0
    ljmp    $0x08, $pm32
    .code32
pm32:
    mov     $0x10, %ax
    mov     %ax, %ds
    lidt    idt_desc
    ud2
    hlt

    .p2align 3
gdt:
    .quad   0
    .quad   0x00cf9a000000ffff      /* 0x08: flat 32-bit code */
    .quad   0x00cf92000000ffff      /* 0x10: flat 32-bit data */
gdt_desc:
    .word   gdt_desc - gdt - 1
    .long   gdt
idt_desc:
    .word   0                       /* limit 0: no vector can be delivered */
    .long   0
