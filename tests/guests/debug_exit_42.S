/* debug_exit_42.S - stop the VM through port 0xF4 with exit code 42. */
#include "contract.inc"
_start:
    mov     $42, %al
    outb    %al, $DEBUG_EXIT
    hlt
