/*
 * vmcall.S - prints "spin\n", then VMCALL with RAX = KVM_HC_MAP_GPA_RANGE.
 * On kvm_pvm hosts KVM_RUN spins in the kernel on this forever (host-kvm.md);
 * the VMM must interrupt it and report "timeout".  Elsewhere the hypercall
 * exits or returns; the guest then exits with code 3 so the test still sees
 * a definite outcome.
 */
    .code16
    .text
    .globl _start
_start:
    mov     $0xe9, %dx
    mov     $'s', %al
    outb    %al, %dx
    mov     $'p', %al
    outb    %al, %dx
    mov     $'i', %al
    outb    %al, %dx
    mov     $'n', %al
    outb    %al, %dx
    mov     $'\n', %al
    outb    %al, %dx
    mov     $12, %eax
    xor     %ebx, %ebx
    mov     $1, %ecx
    xor     %edx, %edx
    vmcall
    mov     $3, %al
    mov     $0xf4, %dx
    outb    %al, %dx
    hlt
