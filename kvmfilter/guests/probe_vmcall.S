/*
 * probe_vmcall.S - used by `kvmfilter probe`: KVM_HC_MAP_GPA_RANGE (RAX=12)
 * for one encrypted 4 KiB page at 0x10000, issued with VMCALL (0F 01 C1), the Intel form.
 * On kvm_pvm hosts KVM_RUN spins on it until a signal (host-kvm.md), so
 * the probe runs it with a short timeout.
 * Exit codes: #UD (vector 6) -> 6; the hypercall returned without exiting to
 * the VMM -> 0x40 | (low 4 bits of RAX), so the VMM can tell "KVM answered
 * it itself" from "it reached us".
 */
    .code16
    .text
    .globl _start
_start:
    cli
    xor     %ax, %ax
    mov     %ax, %ds
    movw    $ud_handler, 6*4
    movw    $0, 6*4+2
    mov     $12, %eax
    mov     $0x10000, %ebx
    mov     $1, %ecx
    mov     $0x10, %edx
    vmcall
    and     $0x0f, %al
    or      $0x40, %al
exit:
    mov     $0xf4, %dx
    outb    %al, %dx
    hlt
ud_handler:
    mov     $6, %al
    jmp     exit
