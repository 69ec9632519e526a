/*
 * probe_vmmcall.S - KVM_HC_MAP_GPA_RANGE with VMMCALL (0F 01 D9), the AMD
 * form, which is safe on every host we know: it exits, returns, or raises #UD.
 */
#define HYPERCALL vmmcall
#include "probe_hypercall.inc"
