/* spin.S - jmp . forever on every vCPU: only a timeout or a stop ends it. */
#include "contract.inc"
_start:
    jmp     .
