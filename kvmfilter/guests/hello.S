/*
 * hello.S - the smallest useful kvmfilter guest.
 *
 * Contract (docs/contracts.md, "Guest images"): flat binary loaded at 0x7C00, 16-bit
 * real mode, CS=DS=ES=SS=0, SP=0x7C00, SI = vCPU index.
 * Ports: 0xE9 console (one byte per OUT), 0xF4 debug exit (code = value).
 * What it does: vCPU 0 prints "hello from kvmfilter\n" and exits with code 0;
 * any other vCPU halts at once.
 *
 * Build: make guests (gcc -m32 -c, ld -Ttext 0x7c00, objcopy -O binary).
 * Disassemble: objdump -D -b binary -m i8086 --adjust-vma=0x7c00 hello.bin
 */
    .code16
    .text
    .globl _start
_start:
    test    %si, %si
    jnz     park
    mov     $message, %si
    mov     $0xe9, %dx
print:
    lodsb
    test    %al, %al
    jz      done
    outb    %al, %dx
    jmp     print
done:
    xor     %al, %al
    mov     $0xf4, %dx
    outb    %al, %dx
park:
    hlt
    jmp     park

message:
    .asciz  "hello from kvmfilter\n"
