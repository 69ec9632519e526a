"""L1: one vCPU's architectural state, captured and restored as KVM's structs.

``capture(vcpu, msr_indices)`` returns a ``CpuState``: named blobs (the raw
bytes of ``struct kvm_regs``, ``kvm_sregs``, ``kvm_xsave`` ...) and the MSRs.
``restore(vcpu, state)`` applies them in the order QEMU and Firecracker use
(docs/migration.md, "Restoring a vCPU", cites both).  The caller guarantees the
vCPU is outside KVM_RUN with no access in flight (kvmfilter parks it first).

The CPUID table is not part of it: the VM sets CPUID on every vCPU when it
creates them, from the configuration the snapshot carries.
"""
from __future__ import annotations

from collections import namedtuple

from ._kvm import ffi, lib

# Blob name -> the struct whose bytes it holds (XSAVE may be larger: XSAVE2).
STRUCTS = {
    "regs": "struct kvm_regs",
    "sregs": "struct kvm_sregs",
    "fpu": "struct kvm_fpu",
    "xsave": "struct kvm_xsave",
    "xcrs": "struct kvm_xcrs",
    "events": "struct kvm_vcpu_events",
    "debugregs": "struct kvm_debugregs",
    "mp_state": "struct kvm_mp_state",
}


class CpuState(namedtuple("CpuState", "blobs msrs")):
    """``blobs``: name -> bytes (see STRUCTS); ``msrs``: [(index, value)]."""
    __slots__ = ()


def capture(vcpu, msr_indices, kvm) -> CpuState:
    """The state of a vCPU that is outside KVM_RUN."""
    blobs = {"regs": vcpu.get_regs_bytes(), "sregs": vcpu.get_sregs_bytes()}
    if kvm.check_extension(lib.KVM_CAP_XSAVE):
        blobs["xsave"] = vcpu.get_xsave(kvm.check_extension(lib.KVM_CAP_XSAVE2))
    else:
        blobs["fpu"] = vcpu.get_fpu()
    if kvm.check_extension(lib.KVM_CAP_XCRS):
        blobs["xcrs"] = vcpu.get_xcrs()
    blobs["events"] = vcpu.get_vcpu_events()
    blobs["debugregs"] = vcpu.get_debugregs()
    blobs["mp_state"] = vcpu.get_mp_state()
    return CpuState(blobs, vcpu.get_msrs(msr_indices))


def check(state: CpuState) -> None:
    """Raise ValueError unless every blob is known and has its struct's size."""
    for name, blob in state.blobs.items():
        ctype = STRUCTS.get(name)
        if ctype is None:
            raise ValueError(f"unknown vCPU state part {name!r}")
        size = ffi.sizeof(ctype)
        if len(blob) != size and not (name == "xsave" and len(blob) > size):
            raise ValueError(f"vCPU state part {name!r} is {len(blob)} bytes; "
                             f"{ctype} is {size} here")
    for part in ("regs", "sregs", "events", "mp_state"):
        if part not in state.blobs:
            raise ValueError(f"vCPU state lacks {part!r}")


def restore(vcpu, state: CpuState) -> None:
    """Apply ``state`` to a vCPU that has its CPUID and has not run.

    Order: special registers before MSRs (EFER, and MSRs whose validity
    depends on CR4/EFER, are checked against them); registers and extended
    state in between; pending events after everything they could be
    overwritten by; MP state and debug registers last.
    """
    check(state)
    b = state.blobs
    vcpu.set_sregs_bytes(b["sregs"])
    vcpu.set_regs_bytes(b["regs"])
    if "xsave" in b:
        vcpu.set_xsave(b["xsave"])
    elif "fpu" in b:
        vcpu.set_fpu(b["fpu"])
    if "xcrs" in b:
        vcpu.set_xcrs(b["xcrs"])
    if state.msrs:
        done = vcpu.set_msrs(state.msrs)
        if done != len(state.msrs):
            index, value = state.msrs[done]
            raise ValueError(f"KVM refused MSR {index:#x} = {value:#x} "
                             f"({done} of {len(state.msrs)} MSRs restored)")
    vcpu.set_vcpu_events(b["events"])
    vcpu.set_mp_state(b["mp_state"])
    if "debugregs" in b:
        vcpu.set_debugregs(b["debugregs"])
