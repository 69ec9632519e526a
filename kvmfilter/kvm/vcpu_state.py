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


def struct_sizes() -> dict[str, int]:
    """The sizes of the structs a CpuState holds, as this build sees them."""
    return {ctype: ffi.sizeof(ctype) for ctype in STRUCTS.values()}


def capture(vcpu, msr_indices, kvm) -> CpuState:
    """The state of a vCPU that is outside KVM_RUN.

    Order (Firecracker's save_state): MP state first (KVM_GET_MP_STATE may
    change other state as it accepts pending events), vCPU events last (the
    GET ioctls before it may change what it reports).
    """
    blobs = {"mp_state": vcpu.get_mp_state(),
             "regs": vcpu.get_regs_bytes(), "sregs": vcpu.get_sregs_bytes()}
    if kvm.check_extension(lib.KVM_CAP_XSAVE):
        blobs["xsave"] = vcpu.get_xsave(kvm.check_extension(lib.KVM_CAP_XSAVE2))
    else:
        blobs["fpu"] = vcpu.get_fpu()
    if kvm.check_extension(lib.KVM_CAP_XCRS):
        blobs["xcrs"] = vcpu.get_xcrs()
    blobs["debugregs"] = vcpu.get_debugregs()
    msrs = vcpu.get_msrs(msr_indices)
    blobs["events"] = vcpu.get_vcpu_events()
    return CpuState(blobs, msrs)


def clock_for_restore(data: bytes) -> bytes:
    """``struct kvm_clock_data`` from KVM_GET_CLOCK, made ready for KVM_SET_CLOCK.

    Flags cleared, as QEMU does: the guest's clock continues from where it
    stopped rather than jumping by the time the VM spent saved (api.rst: of the
    flags only KVM_CLOCK_REALTIME has an effect on KVM_SET_CLOCK).
    """
    clock = ffi.new("struct kvm_clock_data *")
    ffi.memmove(clock, data, ffi.sizeof(clock[0]))
    clock.flags = 0
    return bytes(ffi.buffer(clock))


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

    Order (QEMU's kvm_arch_put_registers): special registers first (EFER and
    the MSRs checked against CR4/EFER), then registers, extended state, MSRs
    (the TSC deadline last: the caller orders them), vCPU events after
    KVM_SET_REGS (which clears pending exceptions), MP state, debug registers.
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
    # Only the MSRs that differ from the new vCPU's: some (the async-PF ones
    # without an in-kernel LAPIC, say) read fine but refuse every write.
    current = dict(vcpu.get_msrs([index for index, _ in state.msrs]))
    changed = [(i, v) for i, v in state.msrs if current.get(i) != v]
    if changed:
        done = vcpu.set_msrs(changed)
        if done != len(changed):
            index, value = changed[done]
            raise ValueError(f"KVM refused MSR {index:#x} = {value:#x} "
                             f"({done} of {len(changed)} changed MSRs restored)")
    vcpu.set_vcpu_events(b["events"])
    vcpu.set_mp_state(b["mp_state"])
    if "debugregs" in b:
        vcpu.set_debugregs(b["debugregs"])


def describe(blobs: dict) -> dict:
    """What a person wants to know of a saved vCPU: where it is, in which mode."""
    out: dict = {}
    if ffi.sizeof("struct kvm_regs") == len(blobs.get("regs", b"")):
        regs = ffi.new("struct kvm_regs *")
        ffi.memmove(regs, blobs["regs"], len(blobs["regs"]))
        out["rip"] = regs.rip
        out["rsp"] = regs.rsp
        out["rflags"] = regs.rflags
    if ffi.sizeof("struct kvm_sregs") == len(blobs.get("sregs", b"")):
        sregs = ffi.new("struct kvm_sregs *")
        ffi.memmove(sregs, blobs["sregs"], len(blobs["sregs"]))
        long_mode = bool(sregs.efer & (1 << 10)) and bool(sregs.cr0 & (1 << 31))
        out["mode"] = ("long" if long_mode and sregs.cs.l else
                       "compatibility" if long_mode else
                       "protected" if sregs.cr0 & 1 else "real")
        out.update({"cr0": sregs.cr0, "cr3": sregs.cr3, "cr4": sregs.cr4,
                    "efer": sregs.efer, "cs": {"selector": sregs.cs.selector,
                                               "base": sregs.cs.base},
                    "fs_base": sregs.fs.base, "gs_base": sregs.gs.base})
    return out
