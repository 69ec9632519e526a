/*
 * port_flood.S - OUT a garbage byte to every port 0x0000-0xFFFF except the
 * console (0xE9) and debug exit (0xF4), then IN from 0x80 and check it reads
 * all-ones.  Exit code 0 when it did, 1 when not.  The VMM must count every
 * unknown port and never stop on one.
 */
    .code16
    .text
    .globl _start
_start:
    xor     %dx, %dx
next:
    cmp     $0xe9, %dx
    je      skip
    cmp     $0xf4, %dx
    je      skip
    mov     %dl, %al
    xor     $0x5a, %al
    outb    %al, %dx
skip:
    inc     %dx
    jnz     next
    mov     $0x80, %dx
    inb     %dx, %al
    cmp     $0xff, %al
    mov     $0, %al
    je      report
    mov     $1, %al
report:
    mov     $0xf4, %dx
    outb    %al, %dx
    hlt
