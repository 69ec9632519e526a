/* print_index.S - each vCPU prints '0' + SI (its index, per the contract), then HLT. */
#include "contract.inc"
_start:
    mov     %si, %ax
    add     $'0', %al
    outb    %al, $CONSOLE
    hlt
