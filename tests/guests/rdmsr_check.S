/*
 * rdmsr_check.S - the guest checks what RDMSR returns, long after kvmfilter's
 * access log is full (1,024 accesses) and its C fast path serves the reads.
 *
 * WRMSR 1; 2,000 x RDMSR, each must read 1; WRMSR 0; 2,000 x RDMSR, each must
 * read 0; WRMSR 1; 2,000 x RDMSR, each must read 1.  Exit 0 through port 0xF4
 * when every read was right, 3 at the first wrong one.  (KVM hands a RDMSR
 * exit to userspace with data = 0: a VMM that forgets to write the value back
 * makes the guest read 0, and this guest notices.)
 */
#include "contract.inc"
    .set READS, 2000
_start:
    mov     $1, %ebx
    call    write_then_check
    xor     %ebx, %ebx
    call    write_then_check
    mov     $1, %ebx
    call    write_then_check
    xor     %al, %al
    jmp     exit

/* WRMSR EBX, then READS x RDMSR, each must return EDX:EAX = 0:EBX. */
write_then_check:
    mov     $MSR_KVM_MIGRATION_CONTROL, %ecx
    mov     %ebx, %eax
    xor     %edx, %edx
    wrmsr
    mov     $READS, %edi
1:  rdmsr
    cmp     %ebx, %eax
    jne     wrong
    test    %edx, %edx
    jnz     wrong
    dec     %edi
    jnz     1b
    ret

wrong:
    mov     $3, %al
exit:
    outb    %al, $DEBUG_EXIT
    hlt
