"""L1: one method per KVM ioctl.  ``Kvm`` -> ``Vm`` -> ``Vcpu``.

Each wrapper calls, checks and returns; there is no policy here.  Errors are
``KvmError`` (an ``OSError``) naming the ioctl.  Every fd and mapping is
released by ``close()`` or the context manager.
"""
from __future__ import annotations

import errno as _errno
import os
from collections import namedtuple
from typing import TYPE_CHECKING

from ._kvm import ffi, lib
from .cpuid import CpuidEntry

if TYPE_CHECKING:
    from typing import Iterable, Sequence

    from .msr_filter import MsrFilter

DEV_KVM = "/dev/kvm"
KVM_API_VERSION = 12


def default_device() -> str:
    """/dev/kvm, unless KVMFILTER_DEV_KVM names another node (tests, containers)."""
    return os.environ.get("KVMFILTER_DEV_KVM") or DEV_KVM

# What to do about each way opening /dev/kvm fails (kvmtool's hints, ours).
_OPEN_HINTS = {
    _errno.ENOENT: "the device node does not exist: is the kvm module loaded "
                   "(modprobe kvm_intel / kvm_amd) and virtualization enabled?",
    _errno.ENODEV: "no KVM backend is available on this host "
                   "(is hardware virtualization enabled, or nested virt on this VM?)",
    _errno.ENXIO: "no KVM backend is available on this host",
    _errno.EACCES: "permission denied: run as root or add this user to the 'kvm' group",
    _errno.EPERM: "operation not permitted: run as root or add this user to the 'kvm' group",
}


class KvmError(OSError):
    """A KVM ioctl (or opening /dev/kvm) failed.

    Attributes:
        errno: the errno the kernel returned.
        ioctl: the name of the failing call, e.g. ``"KVM_X86_SET_MSR_FILTER"``.
        hint: what to do about it, when known.
    """

    def __init__(self, err: int, ioctl: str, hint: str | None = None):
        message = f"{ioctl}: {os.strerror(err)}"
        if hint:
            message += f" ({hint})"
        super().__init__(err, message)
        self.ioctl = ioctl
        self.hint = hint

    def __str__(self) -> str:
        return self.strerror


def _check(result: int, name: str) -> int:
    if result < 0:
        raise KvmError(-result, name)
    return result


class _Fd:
    """An owned file descriptor, closed once."""

    fd: int = -1

    def close(self) -> None:
        if self.fd >= 0:
            lib.kvmf_close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # last resort; close() is the contract
        try:
            self.close()
        except Exception:
            pass


class Kvm(_Fd):
    """The system fd (/dev/kvm)."""

    def __init__(self, path: str | None = None):
        path = path or default_device()
        fd = lib.kvmf_open(path.encode())
        if fd < 0:
            err = -fd
            raise KvmError(err, f"open {path}", _OPEN_HINTS.get(err))
        self.fd = fd
        self.path = path
        self._mmap_size: int | None = None
        # api.rst: applications should refuse to run unless the API version is 12.
        version = lib.kvmf_ioctl_arg(fd, lib.KVM_GET_API_VERSION, 0)
        if version != KVM_API_VERSION:
            self.close()
            if version < 0:
                raise KvmError(-version, f"open {path}", "this is not a KVM device")
            raise KvmError(_errno.EPROTO, f"open {path}",
                           f"KVM API version {version}, kvmfilter needs {KVM_API_VERSION}")

    def get_api_version(self) -> int:
        return _check(lib.kvmf_ioctl_arg(self.fd, lib.KVM_GET_API_VERSION, 0),
                      "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the system fd; 0 means unsupported."""
        return _check(lib.kvmf_ioctl_arg(self.fd, lib.KVM_CHECK_EXTENSION, cap),
                      "KVM_CHECK_EXTENSION")

    def get_vcpu_mmap_size(self) -> int:
        if self._mmap_size is None:
            self._mmap_size = _check(
                lib.kvmf_ioctl_arg(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0),
                "KVM_GET_VCPU_MMAP_SIZE")
        return self._mmap_size

    def get_supported_cpuid(self, max_entries: int = 256) -> list[CpuidEntry]:
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries,
                                                 "entries": max_entries})
        _check(lib.kvmf_ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, cpuid),
               "KVM_GET_SUPPORTED_CPUID")
        return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in cpuid.entries[0:cpuid.nent]]

    def create_vm(self) -> "Vm":
        fd = _check(lib.kvmf_ioctl_arg(self.fd, lib.KVM_CREATE_VM, 0), "KVM_CREATE_VM")
        return Vm(self, fd)


MemorySlot = namedtuple("MemorySlot", "slot guest_phys_addr size userspace_addr")


class GuestMemory:
    """Anonymous host memory to back a guest RAM slot; zero-filled."""

    def __init__(self, size: int):
        ptr = lib.mmap(ffi.NULL, size, lib.PROT_READ | lib.PROT_WRITE,
                       lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_NORESERVE, -1, 0)
        if ptr == lib.kvmf_map_failed():
            raise KvmError(ffi.errno, "mmap guest memory")
        self.ptr = ptr
        self.size = size
        self.address = int(ffi.cast("uintptr_t", ptr))
        self.view = ffi.buffer(ffi.cast("char *", ptr), size)

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"write of {len(data)} bytes at {offset:#x} "
                             f"outside {self.size:#x} bytes of guest memory")
        self.view[offset:offset + len(data)] = data

    def read(self, offset: int, length: int) -> bytes:
        return self.view[offset:offset + length]

    def close(self) -> None:
        if self.ptr is not None:
            self.view = None
            lib.munmap(self.ptr, self.size)
            self.ptr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


class Vm(_Fd):
    """A VM fd (KVM_CREATE_VM)."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (answers for this VM's type)."""
        return _check(lib.kvmf_ioctl_arg(self.fd, lib.KVM_CHECK_EXTENSION, cap),
                      "KVM_CHECK_EXTENSION")

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        req = ffi.new("struct kvm_enable_cap *")
        req.cap = cap
        req.flags = flags
        for i, arg in enumerate(args):
            req.args[i] = arg
        _check(lib.kvmf_ioctl(self.fd, lib.KVM_ENABLE_CAP, req), "KVM_ENABLE_CAP")

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, size: int,
                               userspace_addr: int, flags: int = 0) -> MemorySlot:
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = slot
        region.flags = flags
        region.guest_phys_addr = guest_phys_addr
        region.memory_size = size
        region.userspace_addr = userspace_addr
        _check(lib.kvmf_ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region),
               "KVM_SET_USER_MEMORY_REGION")
        return MemorySlot(slot, guest_phys_addr, size, userspace_addr)

    def create_vcpu(self, vcpu_id: int) -> "Vcpu":
        fd = _check(lib.kvmf_ioctl_arg(self.fd, lib.KVM_CREATE_VCPU, vcpu_id),
                    "KVM_CREATE_VCPU")
        try:
            return Vcpu(self, vcpu_id, fd, self.kvm.get_vcpu_mmap_size())
        except BaseException:
            lib.kvmf_close(fd)
            raise

    def set_msr_filter(self, msr_filter: "MsrFilter") -> None:
        """KVM_X86_SET_MSR_FILTER, after the checks api.rst documents.

        Raises:
            MsrFilterError: the filter breaks a documented rule (checked first).
            KvmError: KVM refused it anyway.
        """
        msr_filter.validate()
        self.set_msr_filter_unchecked(msr_filter.flags, msr_filter.kernel_ranges())

    def set_msr_filter_unchecked(self, flags: int,
                                 ranges: Sequence[tuple[int, int, int, bytes | None]]) -> None:
        """The raw ioctl: ``ranges`` are (flags, nmsrs, base, bitmap) as given to KVM.

        ``bitmap=None`` passes a NULL pointer (KVM answers EFAULT).  Nothing is
        checked here; this is how tests probe KVM's own validation.
        """
        if len(ranges) > len(ffi.new("struct kvm_msr_filter *").ranges):
            raise ValueError("struct kvm_msr_filter holds at most "
                             f"{lib.KVM_MSR_FILTER_MAX_RANGES} ranges")
        kfilter = ffi.new("struct kvm_msr_filter *")
        kfilter.flags = flags
        # LIFETIME: the bitmaps must stay alive until the ioctl returns (KVM copies them).
        keep = []
        for i, (rflags, nmsrs, base, bitmap) in enumerate(ranges):
            kfilter.ranges[i].flags = rflags
            kfilter.ranges[i].nmsrs = nmsrs
            kfilter.ranges[i].base = base
            if bitmap is None:
                kfilter.ranges[i].bitmap = ffi.NULL
            else:
                buf = ffi.new("uint8_t[]", max(len(bitmap), 1))
                ffi.memmove(buf, bitmap, len(bitmap))
                keep.append(buf)
                kfilter.ranges[i].bitmap = buf
        _check(lib.kvmf_ioctl(self.fd, lib.KVM_X86_SET_MSR_FILTER, kfilter),
               "KVM_X86_SET_MSR_FILTER")
        del keep


class Vcpu(_Fd):
    """A vCPU fd with its mmapped ``struct kvm_run`` (``self.run_page``)."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int, mmap_size: int):
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        ptr = lib.mmap(ffi.NULL, mmap_size, lib.PROT_READ | lib.PROT_WRITE,
                       lib.MAP_SHARED, fd, 0)
        if ptr == lib.kvmf_map_failed():
            raise KvmError(ffi.errno, "mmap kvm_run")
        self._run_ptr = ptr
        self._mmap_size = mmap_size
        self.run_page = ffi.cast("struct kvm_run *", ptr)

    def close(self) -> None:
        if getattr(self, "_run_ptr", None) is not None:
            self.run_page = None
            lib.munmap(self._run_ptr, self._mmap_size)
            self._run_ptr = None
        super().close()

    def set_cpuid2(self, entries: Iterable[CpuidEntry]) -> None:
        entries = list(entries)
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries),
                                                 "entries": len(entries)})
        for slot, e in zip(cpuid.entries, entries):
            slot.function, slot.index, slot.flags = e.function, e.index, e.flags
            slot.eax, slot.ebx, slot.ecx, slot.edx = e.eax, e.ebx, e.ecx, e.edx
        _check(lib.kvmf_ioctl(self.fd, lib.KVM_SET_CPUID2, cpuid), "KVM_SET_CPUID2")

    def get_regs(self):
        regs = ffi.new("struct kvm_regs *")
        _check(lib.kvmf_ioctl(self.fd, lib.KVM_GET_REGS, regs), "KVM_GET_REGS")
        return regs

    def set_regs(self, regs) -> None:
        _check(lib.kvmf_ioctl(self.fd, lib.KVM_SET_REGS, regs), "KVM_SET_REGS")

    def get_sregs(self):
        sregs = ffi.new("struct kvm_sregs *")
        _check(lib.kvmf_ioctl(self.fd, lib.KVM_GET_SREGS, sregs), "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs) -> None:
        _check(lib.kvmf_ioctl(self.fd, lib.KVM_SET_SREGS, sregs), "KVM_SET_SREGS")

    def run_fast(self, fast, counts, console, budget: int) -> bool:
        """KVM_RUN in C with the MSR and console fast paths (cstubs/kvm_source.c).

        Returns True when an exit awaits Python in the run page, False when
        ``budget`` fast exits were serviced in C.  EINTR as in ``run()``.
        ``console`` may be ``ffi.NULL``.
        """
        while True:
            r = lib.kvmf_run_fast(self.fd, self.run_page, fast, counts, console, budget)
            if self._settled(r):
                return r != 1

    def run(self) -> None:
        """KVM_RUN.  The GIL is released for the duration of the ioctl.

        EINTR (a kick signal, or ``immediate_exit``) is not an error: KVM then
        reports KVM_EXIT_INTR in the run page.  EAGAIN is retried.
        """
        while not self._settled(lib.kvmf_run(self.fd)):
            pass

    def _settled(self, r: int) -> bool:
        """KVM_RUN's errno policy, in one place: False means "run it again"."""
        if r >= 0:
            return True
        if r == -_errno.EINTR:
            self.run_page.exit_reason = lib.KVM_EXIT_INTR
            return True
        if r == -_errno.EAGAIN:
            return False
        raise KvmError(-r, "KVM_RUN")
