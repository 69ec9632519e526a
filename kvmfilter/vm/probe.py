"""L4: what this host's KVM advertises, and what actually works, proved by
micro-guests (kvmfilter/guests/probe_*.S).

Advertised = KVM_CHECK_EXTENSION.  Working = a micro-guest produced the exit.
Each feature carries a one-line ``detail`` saying what was seen.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

from ..kvm import abi
from ..kvm.cpuid import with_pv_features
from ..kvm.exits import (ExitName, HypercallExit, HypercallReply, IoExit, MsrExit, apply,
                         decode, exit_name)
from ..kvm.ioctls import Kvm, KvmError, Vm
from ..kvm.kick import kick
from ..kvm.memory import GuestMemory
from ..kvm.msr_filter import WRITE, MsrFilter
from .devices import DEBUG_EXIT_PORT
from .image import LOAD_ADDRESS, bundled_guest, reset_real_mode

MSR = 0x4B56_4D08
MICRO_MEMORY = 1 << 20
VMCALL_TIMEOUT = 0.5  # long enough for a real exit; a spinning KVM_RUN is cut here


@dataclass
class Feature:
    advertised: bool
    working: bool
    detail: str

    def to_json(self) -> dict:
        return {"advertised": self.advertised, "working": self.working, "detail": self.detail}


@dataclass
class MicroOutcome:
    """What the micro-guest did first: an exit record, a debug-exit code, or a timeout."""
    exit: object = None
    code: Optional[int] = None
    timed_out: bool = False


@contextmanager
def _micro_vcpu(kvm: Kvm, image: bytes, setup: Callable[[Vm], None] | None = None,
                pv_features: int = 0):
    """A one-vCPU real-mode VM with ``image`` loaded (the guest-image contract)."""
    with kvm.create_vm() as vm, GuestMemory(MICRO_MEMORY) as memory:
        memory.write(LOAD_ADDRESS, image)
        vm.set_user_memory_region(0, 0, MICRO_MEMORY, memory.address)
        if setup is not None:
            setup(vm)
        with vm.create_vcpu(0) as vcpu:
            cpuid = kvm.get_supported_cpuid()
            if pv_features:
                cpuid = with_pv_features(cpuid, pv_features)
            vcpu.set_cpuid2(cpuid)
            reset_real_mode(vcpu, 0)
            yield vcpu


def run_micro(kvm: Kvm, image: bytes, setup: Callable[[Vm], None] | None = None,
              pv_features: int = 0, timeout: float = 2.0,
              answer: Callable[[object, object], bool] | None = None) -> MicroOutcome:
    """Run a one-vCPU micro-guest until its first exit that is not console output.

    ``answer(run, exit)``, when given, may reply to an exit and return True to
    keep running (e.g. to let the guest see the reply).
    """
    with _micro_vcpu(kvm, image, setup, pv_features) as vcpu:
        timer = threading.Timer(timeout, kick, (vcpu, threading.get_ident()))
        timer.start()
        try:
            return _drive(vcpu, answer)
        finally:
            timer.cancel()
            timer.join()  # a kick already under way must land before we go on
            vcpu.run_page.immediate_exit = 0


def _drive(vcpu, answer) -> MicroOutcome:
    run = vcpu.run_page
    while True:
        vcpu.run()
        ex = decode(run)
        if type(ex) is IoExit:
            if ex.port == DEBUG_EXIT_PORT and ex.is_out:
                return MicroOutcome(code=ex.data[0])
            continue
        if exit_name(run.exit_reason) == ExitName.INTR:
            return MicroOutcome(timed_out=True)
        if answer is not None and answer(run, ex):
            continue
        return MicroOutcome(exit=ex)


def _user_space_msr(kvm: Kvm) -> Feature:
    mask = kvm.check_extension(abi.KVM_CAP_X86_USER_SPACE_MSR)
    if not mask:
        return Feature(False, False, "KVM_CHECK_EXTENSION(KVM_CAP_X86_USER_SPACE_MSR) is 0")
    reasons = abi.KVM_MSR_EXIT_REASON_UNKNOWN | abi.KVM_MSR_EXIT_REASON_INVAL
    out = run_micro(kvm, bundled_guest("probe_wrmsr"),
                    setup=lambda vm: vm.enable_cap(abi.KVM_CAP_X86_USER_SPACE_MSR, reasons))
    ok = type(out.exit) is MsrExit and out.exit.index == MSR
    return Feature(True, ok, _describe(out, "WRMSR 0x4b564d08 with no filter (UNKNOWN reason)"))


def _msr_filter(kvm: Kvm) -> Feature:
    if not kvm.check_extension(abi.KVM_CAP_X86_MSR_FILTER):
        return Feature(False, False, "KVM_CHECK_EXTENSION(KVM_CAP_X86_MSR_FILTER) is 0")

    def setup(vm: Vm) -> None:
        vm.enable_cap(abi.KVM_CAP_X86_USER_SPACE_MSR, abi.KVM_MSR_EXIT_REASON_FILTER)
        vm.set_msr_filter(MsrFilter.deny_only({MSR: WRITE}))

    out = run_micro(kvm, bundled_guest("probe_wrmsr"), setup=setup)
    ok = (type(out.exit) is MsrExit and out.exit.index == MSR
          and out.exit.reason == abi.KVM_MSR_EXIT_REASON_FILTER)
    return Feature(True, ok, _describe(out, "WRMSR 0x4b564d08 denied by a one-MSR filter"))


def _exit_hypercall(kvm: Kvm) -> Feature:
    offered = kvm.check_extension(abi.KVM_CAP_EXIT_HYPERCALL)
    bit = 1 << abi.KVM_HC_MAP_GPA_RANGE
    if not offered & bit:
        return Feature(False, False, f"KVM_CHECK_EXTENSION(KVM_CAP_EXIT_HYPERCALL) is "
                       f"{offered:#x}: no KVM_HC_MAP_GPA_RANGE exit")

    def setup(vm: Vm) -> None:
        vm.enable_cap(abi.KVM_CAP_EXIT_HYPERCALL, bit)

    def answer(run, ex) -> bool:
        # Always write ret (docs/kvm-abi.md, "The hypercall exit"), then stop.
        apply(run, HypercallReply(0))
        return False

    features = 1 << abi.KVM_FEATURE_HC_MAP_GPA_RANGE
    seen = []
    for insn, name in (("probe_vmmcall", "VMMCALL"), ("probe_vmcall", "VMCALL")):
        out = run_micro(kvm, bundled_guest(insn), setup=setup, pv_features=features,
                        timeout=VMCALL_TIMEOUT, answer=answer)
        if type(out.exit) is HypercallExit and out.exit.nr == abi.KVM_HC_MAP_GPA_RANGE:
            return Feature(True, True, f"{name} of KVM_HC_MAP_GPA_RANGE in real mode exited "
                           "to userspace (KVM_EXIT_HYPERCALL)")
        seen.append(f"{name}: {_describe_hypercall(out)}")
    return Feature(True, False, "advertised (mask %#x) but no KVM_EXIT_HYPERCALL arrived: %s"
                   % (offered, "; ".join(seen)))


def _immediate_exit(kvm: Kvm) -> Feature:
    """KVM_RUN with immediate_exit=1 must return EINTR without running the guest."""
    if not kvm.check_extension(abi.KVM_CAP_IMMEDIATE_EXIT):
        return Feature(False, False, "KVM_CHECK_EXTENSION(KVM_CAP_IMMEDIATE_EXIT) is 0")
    with _micro_vcpu(kvm, b"\xeb\xfe") as vcpu:  # jmp . (spins if entered)
        vcpu.run_page.immediate_exit = 1
        vcpu.run()
        reason = vcpu.run_page.exit_reason
        rip = vcpu.get_regs().rip
    ok = exit_name(reason) == ExitName.INTR and rip == LOAD_ADDRESS
    return Feature(True, ok, f"KVM_RUN with immediate_exit=1 returned {exit_name(reason)} "
                   f"at RIP {rip:#x} (needed to stop a vCPU that is about to enter)")


def _describe(out: MicroOutcome, what: str) -> str:
    if out.timed_out:
        return f"{what}: no exit; KVM_RUN had to be interrupted"
    if out.code is not None:
        return f"{what}: " + ("the guest took #GP" if out.code == 13
                              else "the write completed in the kernel, no exit"
                              if out.code == 0 else f"guest exit code {out.code}")
    ex = out.exit
    if type(ex) is MsrExit:
        return (f"{what}: KVM_EXIT_X86_{ex.instruction} arrived "
                f"(index {ex.index:#x}, reason {ex.reason}, data {ex.data:#x})")
    return f"{what}: unexpected exit {ex!r}"


def _describe_hypercall(out: MicroOutcome) -> str:
    if out.timed_out:
        return (f"KVM_RUN spun in the kernel until interrupted after {VMCALL_TIMEOUT:g} s "
                "(kvm_pvm-style backend)")
    if out.code == 6:
        return "the guest took #UD (the instruction is not emulated in real mode here)"
    if out.code is not None and out.code & 0x40:
        return (f"KVM completed the hypercall itself without an exit "
                f"(RAX low bits {out.code & 0xF})")
    return f"unexpected outcome {out!r}"


def probe(kvm: Kvm) -> dict:
    """The probe report (docs/contracts.md, ``kvmfilter probe --json``)."""
    features = {}
    for name, check in (("user_space_msr", _user_space_msr), ("msr_filter", _msr_filter),
                        ("exit_hypercall", _exit_hypercall),
                        ("immediate_exit", _immediate_exit)):
        try:
            features[name] = check(kvm).to_json()
        except KvmError as exc:
            features[name] = Feature(True, False, f"{exc}").to_json()
    needed = ("user_space_msr", "msr_filter", "immediate_exit")
    return {
        "api_version": kvm.get_api_version(),
        "ok": all(features[n]["working"] for n in needed),
        "features": features,
        "backend": _backend(),
    }


def _backend() -> str:
    """Which KVM backend serves /dev/kvm (kvm_intel, kvm_amd, kvm_pvm ...).

    /sys/module lists built-in modules too (with parameters), /proc/modules not.
    """
    import os
    try:
        found = sorted(m for m in os.listdir("/sys/module")
                       if m in ("kvm_intel", "kvm_amd", "kvm_pvm") or m.startswith("kvm_pvm"))
    except OSError:
        return "unknown"
    return ",".join(found) or "unknown"
