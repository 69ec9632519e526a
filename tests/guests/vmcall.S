/*
 * vmcall.S - prints "spin\n", then VMCALL with RAX = KVM_HC_MAP_GPA_RANGE.
 * On kvm_pvm hosts KVM_RUN spins in the kernel on this forever (docs/host-kvm.md);
 * the VMM must interrupt it and report "timeout".  Where VMCALL completes
 * instead (answered by KVM or the VMM), the guest spins in "jmp ." - also
 * only a timeout ends it, so the test means the same on every host.
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
1:  jmp     1b                  /* returned (a host that completes VMCALL): spin */
