/* hlt.S - HLT at once (every vCPU). */
#include "contract.inc"
_start:
    hlt
