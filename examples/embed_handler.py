#!/usr/bin/env python3
"""A complete minimal VMM that embeds kvmfilter's migration-control policy.

It is written the way a VMM that does *not* use kvmfilter's KVM layer would be:
nothing but the standard library (fcntl.ioctl, mmap, struct, ctypes) talks to
/dev/kvm.  From kvmfilter it takes only the pure policy, ``MigrationControl``,
and hands it every exit for MSR 0x4b564d08.  The lines that matter are marked
"kvmfilter:".

    sudo python3 examples/embed_handler.py [IMAGE] [--timeout S]

Runs IMAGE (default: kvmfilter's bundled conformance guest) on one vCPU in real
mode, prints the guest's console and a JSON summary of the readiness record,
and exits with the guest's debug-exit code (1 on a timeout or a bad exit).
"""
import argparse
import ctypes
import fcntl
import json
import mmap
import os
import signal
import struct
import sys
from importlib import resources

from kvmfilter.policy import MSR_KVM_MIGRATION_CONTROL, MigrationControl  # kvmfilter:

# ---- the KVM ABI, by hand (linux/kvm.h, asm/kvm.h, asm-generic/ioctl.h) ----
KVMIO = 0xAE


def _IO(nr):
    return (KVMIO << 8) | nr


def _IOW(nr, size):
    return (1 << 30) | (size << 16) | (KVMIO << 8) | nr


def _IOR(nr, size):
    return (2 << 30) | (size << 16) | (KVMIO << 8) | nr


def _IOWR(nr, size):
    return (3 << 30) | (size << 16) | (KVMIO << 8) | nr


SIZEOF_REGS, SIZEOF_SREGS, SIZEOF_CPUID2, SIZEOF_CPUID_ENTRY = 144, 312, 8, 40
SIZEOF_REGION, SIZEOF_ENABLE_CAP, SIZEOF_MSR_FILTER = 32, 104, 392

KVM_GET_API_VERSION = _IO(0x00)
KVM_CREATE_VM = _IO(0x01)
KVM_GET_VCPU_MMAP_SIZE = _IO(0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(0x05, SIZEOF_CPUID2)
KVM_CREATE_VCPU = _IO(0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(0x46, SIZEOF_REGION)
KVM_RUN = _IO(0x80)
KVM_GET_REGS = _IOR(0x81, SIZEOF_REGS)
KVM_SET_REGS = _IOW(0x82, SIZEOF_REGS)
KVM_GET_SREGS = _IOR(0x83, SIZEOF_SREGS)
KVM_SET_SREGS = _IOW(0x84, SIZEOF_SREGS)
KVM_SET_CPUID2 = _IOW(0x90, SIZEOF_CPUID2)
KVM_ENABLE_CAP = _IOW(0xA3, SIZEOF_ENABLE_CAP)
KVM_X86_SET_MSR_FILTER = _IOW(0xC6, SIZEOF_MSR_FILTER)

KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_MSR_EXIT_REASON_FILTER = 1 << 2
KVM_MSR_FILTER_READ, KVM_MSR_FILTER_WRITE = 1, 2
KVM_EXIT_IO, KVM_EXIT_HLT, KVM_EXIT_SHUTDOWN = 2, 5, 8
KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR = 29, 30
KVM_FEATURE_MIGRATION_CONTROL = 17

# struct kvm_run offsets
RUN_EXIT_REASON = 8
RUN_IO = 32         # u8 direction, u8 size, u16 port, u32 count, u64 data_offset
RUN_MSR_ERROR = 32  # u8 error; u32 reason @40; u32 index @44; u64 data @48
RUN_MSR_INDEX, RUN_MSR_DATA = 44, 48

LOAD, MEMORY = 0x7C00, 1 << 20


def ioctl(fd, request, arg=0, mutate=False):
    return fcntl.ioctl(fd, request, arg, mutate) if mutate else fcntl.ioctl(fd, request, arg)


def address_of(buffer) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class Timeout(Exception):
    pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image", nargs="?")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--plain-memory", action="store_true")
    args = ap.parse_args()
    if args.image:
        image = open(args.image, "rb").read()
    else:
        image = resources.files("kvmfilter.guests").joinpath("conformance.bin").read_bytes()

    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    assert ioctl(kvm, KVM_GET_API_VERSION) == 12
    vm = ioctl(kvm, KVM_CREATE_VM)

    memory = mmap.mmap(-1, MEMORY)
    memory[LOAD:LOAD + len(image)] = image
    ioctl(vm, KVM_SET_USER_MEMORY_REGION,
          struct.pack("<IIQQQ", 0, 0, 0, MEMORY, address_of(memory)))

    # Trap MSR 0x4b564d08: FILTER exits first, then a DEFAULT_ALLOW filter with
    # one denying range (bitmap bit 0 = 0) for reads and writes.
    ioctl(vm, KVM_ENABLE_CAP, struct.pack("<II4Q64x", KVM_CAP_X86_USER_SPACE_MSR, 0,
                                          KVM_MSR_EXIT_REASON_FILTER, 0, 0, 0))
    bitmap = bytearray(8)  # LIFETIME: KVM copies it during the ioctl
    msr_filter = bytearray(SIZEOF_MSR_FILTER)
    struct.pack_into("<IIIxxxxQ", msr_filter, 8, KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE,
                     1, MSR_KVM_MIGRATION_CONTROL, address_of(bitmap))
    ioctl(vm, KVM_X86_SET_MSR_FILTER, bytes(msr_filter))

    vcpu = ioctl(vm, KVM_CREATE_VCPU, 0)
    run = mmap.mmap(vcpu, ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE), mmap.MAP_SHARED,
                    mmap.PROT_READ | mmap.PROT_WRITE)

    # CPUID: KVM's table, with KVM_FEATURE_MIGRATION_CONTROL added to 0x40000001.EAX,
    # and leaf 1 EBX[23:16] (logical CPUs) = 1, EBX[31:24] (APIC ID) = 0, as the
    # guest contract asks (it tells the conformance guest how many vCPUs to wait for).
    nent = 128
    cpuid = bytearray(struct.pack("<II", nent, 0) + bytes(nent * SIZEOF_CPUID_ENTRY))
    ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid, True)
    for i in range(struct.unpack_from("<I", cpuid, 0)[0]):
        off = 8 + i * SIZEOF_CPUID_ENTRY
        function = struct.unpack_from("<I", cpuid, off)[0]
        if function == 0x40000001:
            eax = struct.unpack_from("<I", cpuid, off + 12)[0]
            struct.pack_into("<I", cpuid, off + 12, eax | 1 << KVM_FEATURE_MIGRATION_CONTROL)
        elif function == 1:
            ebx = struct.unpack_from("<I", cpuid, off + 16)[0]
            struct.pack_into("<I", cpuid, off + 16, (ebx & 0xFFFF) | 1 << 16)
    ioctl(vcpu, KVM_SET_CPUID2, cpuid, True)  # > 1024 bytes: must be a mutable buffer

    # Real mode at 0000:7C00, SP=0x7C00, SI=0 (the vCPU index).
    sregs = bytearray(SIZEOF_SREGS)
    ioctl(vcpu, KVM_GET_SREGS, sregs, True)
    for seg in range(6):  # cs ds es fs gs ss: base @0, selector @12, 24 bytes each
        struct.pack_into("<Q", sregs, seg * 24, 0)
        struct.pack_into("<H", sregs, seg * 24 + 12, 0)
    ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
    regs = [0] * 18
    regs[6], regs[16], regs[17] = LOAD, LOAD, 0x2  # rsp, rip, rflags
    ioctl(vcpu, KVM_SET_REGS, struct.pack("<18Q", *regs))

    control = MigrationControl(advertised=True,  # kvmfilter: the policy and its record
                               encrypted_memory=not args.plain_memory)

    def on_alarm(signum, frame):
        raise Timeout()

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, args.timeout)
    console, status = bytearray(), None
    try:
        while status is None:
            ioctl(vcpu, KVM_RUN)
            reason = struct.unpack_from("<I", run, RUN_EXIT_REASON)[0]
            if reason in (KVM_EXIT_X86_WRMSR, KVM_EXIT_X86_RDMSR):
                index = struct.unpack_from("<I", run, RUN_MSR_INDEX)[0]
                if index != MSR_KVM_MIGRATION_CONTROL:
                    run[RUN_MSR_ERROR] = 1  # not ours: #GP
                    continue
                op = "wrmsr" if reason == KVM_EXIT_X86_WRMSR else "rdmsr"
                data = struct.unpack_from("<Q", run, RUN_MSR_DATA)[0]
                verdict = control.access(0, op, data)  # kvmfilter: decide and record
                run[RUN_MSR_ERROR] = 1 if verdict.gp else 0  # 1 = inject #GP
                if op == "rdmsr" and not verdict.gp:
                    struct.pack_into("<Q", run, RUN_MSR_DATA, verdict.value)
            elif reason == KVM_EXIT_IO:
                direction, size, port, count, offset = struct.unpack_from("<BBHIQ", run, RUN_IO)
                payload = run[offset:offset + size * count]
                if direction == 1 and port == 0xE9:
                    console += payload
                elif direction == 1 and port == 0xF4:
                    status = payload[0]
                elif direction == 0:
                    run[offset:offset + size * count] = b"\xff" * (size * count)
            elif reason == KVM_EXIT_HLT:
                status = 0
            else:
                print(f"unexpected exit reason {reason}", file=sys.stderr)
                status = 1
    except Timeout:
        print(f"timeout after {args.timeout:g} s", file=sys.stderr)
        status = 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)

    sys.stdout.write(console.decode("utf-8", "replace"))
    print(json.dumps({"exit_code": status, "ready": control.ready, "value": control.value,
                      "accesses_total": control.accesses_total,
                      "verdicts": control.verdicts,
                      "transitions": [t.to_json() for t in control.transitions()]}))
    run.close()
    for fd in (vcpu, vm, kvm):
        os.close(fd)
    memory.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
