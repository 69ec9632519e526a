"""L1: one method per KVM ioctl.  ``Kvm`` -> ``Vm`` -> ``Vcpu``.

Each wrapper calls, checks and returns; there is no policy here.  Errors are
``KvmError`` (an ``OSError``) naming the ioctl.  Every fd and mapping is
released by ``close()`` or the context manager.

State ioctls (``get_xsave``, ``get_vcpu_events`` ...) move their structs as
raw bytes: the layout is the kernel's ABI, and a snapshot stores it as is.
"""
from __future__ import annotations

import errno as _errno
import os
import threading
from collections import namedtuple
from typing import TYPE_CHECKING

from ..base import KvmfilterError, Unavailable
from ._kvm import ffi, lib
from .cpuid import CpuidEntry

if TYPE_CHECKING:
    from typing import Iterable, Sequence

    from .msr_filter import MsrFilter

DEV_KVM = "/dev/kvm"
KVM_API_VERSION = 12
MAX_IO_MSRS = 256  # arch/x86/kvm/x86.c: KVM_GET/SET_MSRS take fewer entries than this


def default_device() -> str:
    """/dev/kvm, unless KVMFILTER_DEV_KVM names another node (tests, containers)."""
    return os.environ.get("KVMFILTER_DEV_KVM") or DEV_KVM


# What to do about each way opening /dev/kvm fails (kvmtool's hints, ours).
OPEN_HINTS = {
    _errno.ENOENT: "the device node does not exist: is the kvm module loaded "
                   "(modprobe kvm_intel / kvm_amd) and virtualization enabled?",
    _errno.ENODEV: "no KVM backend is available on this host "
                   "(is hardware virtualization enabled, or nested virt on this VM?)",
    _errno.ENXIO: "no KVM backend is available on this host",
    _errno.EACCES: "permission denied: run as root or add this user to the 'kvm' group",
    _errno.EPERM: "operation not permitted: run as root or add this user to the 'kvm' group",
}


class KvmError(KvmfilterError, OSError):
    """A KVM ioctl failed.

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


class KvmUnavailableError(KvmError, Unavailable):
    """/dev/kvm cannot be opened, or is not KVM."""


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

    def _get(self, request: int, ctype: str, name: str) -> bytes:
        """An ioctl that fills a struct: the struct's bytes."""
        buf = ffi.new(ctype)
        _check(lib.kvmf_ioctl(self.fd, request, buf), name)
        return bytes(ffi.buffer(buf))

    def _set(self, request: int, ctype: str, data: bytes, name: str) -> None:
        """An ioctl that reads a struct, from bytes of exactly its size."""
        buf = ffi.new(ctype)
        if len(data) != ffi.sizeof(buf[0]):
            raise ValueError(f"{name}: {len(data)} bytes, struct is {ffi.sizeof(buf[0])}")
        ffi.memmove(buf, data, len(data))
        _check(lib.kvmf_ioctl(self.fd, request, buf), name)


class Kvm(_Fd):
    """The system fd (/dev/kvm)."""

    def __init__(self, path: str | None = None):
        path = path or default_device()
        fd = lib.kvmf_open(path.encode())
        if fd < 0:
            err = -fd
            raise KvmUnavailableError(err, f"open {path}", OPEN_HINTS.get(err))
        self.fd = fd
        self.path = path
        self._mmap_size: int | None = None
        # api.rst: applications should refuse to run unless the API version is 12.
        version = lib.kvmf_ioctl_arg(fd, lib.KVM_GET_API_VERSION, 0)
        if version != KVM_API_VERSION:
            self.close()
            if version < 0:
                raise KvmUnavailableError(-version, f"open {path}", "this is not a KVM device")
            raise KvmUnavailableError(_errno.EPROTO, f"open {path}",
                                      f"KVM API version {version}, kvmfilter needs "
                                      f"{KVM_API_VERSION}")

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

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM lets userspace save and restore.

        KVM ABI: api.rst, KVM_GET_MSR_INDEX_LIST: E2BIG, with nmsrs set to the
        count, when the list does not fit; then ask again with that size.
        """
        count = 64
        while True:
            buf = ffi.new("struct kvm_msr_list *", {"nmsrs": count, "indices": count})
            r = lib.kvmf_ioctl(self.fd, lib.KVM_GET_MSR_INDEX_LIST, buf)
            if r == -_errno.E2BIG and buf.nmsrs > count:
                count = buf.nmsrs
                continue
            _check(r, "KVM_GET_MSR_INDEX_LIST")
            return list(buf.indices[0:buf.nmsrs])

    def create_vm(self) -> "Vm":
        fd = _check(lib.kvmf_ioctl_arg(self.fd, lib.KVM_CREATE_VM, 0), "KVM_CREATE_VM")
        return Vm(self, fd)


MemorySlot = namedtuple("MemorySlot", "slot guest_phys_addr size userspace_addr flags")


class Vm(_Fd):
    """A VM fd (KVM_CREATE_VM)."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self._dirty_buffers: dict = {}
        self._dirty_lock = threading.Lock()

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
        """``flags``: KVM_MEM_LOG_DIRTY_PAGES to track the pages the guest writes."""
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = slot
        region.flags = flags
        region.guest_phys_addr = guest_phys_addr
        region.memory_size = size
        region.userspace_addr = userspace_addr
        _check(lib.kvmf_ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region),
               "KVM_SET_USER_MEMORY_REGION")
        return MemorySlot(slot, guest_phys_addr, size, userspace_addr, flags)

    def get_dirty_log(self, slot: int, npages: int) -> memoryview:
        """KVM_GET_DIRTY_LOG: bit i = page i of ``slot`` was written since the last call.

        Returns a read-only view of a buffer the next call for ``slot``
        overwrites: copy what must outlive it.

        KVM ABI: api.rst, KVM_GET_DIRTY_LOG: the bitmap has one bit per page,
        in 64-bit words; without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 the call
        also clears the log and write-protects those pages again.
        """
        nbytes = (npages + 63) // 64 * 8
        with self._dirty_lock:
            # One buffer per slot, reused and not copied: a 64 GiB slot's 2 MiB
            # bitmap, freshly allocated (page faults) each time, costs more
            # than the ioctl - and the last harvest is on the guest's downtime.
            bitmap = self._dirty_buffers.get(slot)
            if bitmap is None or len(bitmap) != nbytes:
                bitmap = self._dirty_buffers[slot] = ffi.new("char[]", nbytes)
            log = ffi.new("struct kvm_dirty_log *")
            log.slot = slot
            log.dirty_bitmap = bitmap
            _check(lib.kvmf_ioctl(self.fd, lib.KVM_GET_DIRTY_LOG, log), "KVM_GET_DIRTY_LOG")
            return memoryview(ffi.buffer(bitmap, nbytes)).toreadonly()

    def get_clock(self) -> bytes:
        """KVM_GET_CLOCK: ``struct kvm_clock_data`` (kvmclock's view of time)."""
        return self._get(lib.KVM_GET_CLOCK, "struct kvm_clock_data *", "KVM_GET_CLOCK")

    def set_clock(self, data: bytes) -> None:
        self._set(lib.KVM_SET_CLOCK, "struct kvm_clock_data *", data, "KVM_SET_CLOCK")

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
    """A vCPU fd with its mmapped ``struct kvm_run`` (``self.run_page``).

    Who writes the run page: KVM (the exit), ``exits.apply`` (the reply to an
    exit Python handled), the C fast path (the reply to an exit it handled,
    by the same rules), and ``run()`` here, which stores KVM_EXIT_INTR in
    ``exit_reason`` when KVM_RUN returns EINTR (KVM leaves the previous reason
    there when ``immediate_exit`` stops it before entering the guest).
    ``immediate_exit`` itself is written by whoever kicks the vCPU.
    """

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

    # -- registers (cffi structs, for code that edits fields) --------------------

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

    # -- state as raw bytes (snapshots) -------------------------------------------

    def get_fpu(self) -> bytes:
        return self._get(lib.KVM_GET_FPU, "struct kvm_fpu *", "KVM_GET_FPU")

    def set_fpu(self, data: bytes) -> None:
        self._set(lib.KVM_SET_FPU, "struct kvm_fpu *", data, "KVM_SET_FPU")

    def get_xsave(self, size: int = 0) -> bytes:
        """KVM_GET_XSAVE, or KVM_GET_XSAVE2 when ``size`` (KVM_CAP_XSAVE2) exceeds
        ``struct kvm_xsave``.  KVM ABI: api.rst, KVM_GET_XSAVE2."""
        base = ffi.sizeof("struct kvm_xsave")
        if size <= base:
            return self._get(lib.KVM_GET_XSAVE, "struct kvm_xsave *", "KVM_GET_XSAVE")
        buf = ffi.new("char[]", size)
        _check(lib.kvmf_ioctl(self.fd, lib.KVM_GET_XSAVE2, buf), "KVM_GET_XSAVE2")
        return ffi.buffer(buf, size)[:]

    def set_xsave(self, data: bytes) -> None:
        """KVM_SET_XSAVE takes the whole buffer KVM_GET_XSAVE(2) returned."""
        buf = ffi.new("char[]", max(len(data), ffi.sizeof("struct kvm_xsave")))
        ffi.memmove(buf, data, len(data))
        _check(lib.kvmf_ioctl(self.fd, lib.KVM_SET_XSAVE, buf), "KVM_SET_XSAVE")

    def get_xcrs(self) -> bytes:
        return self._get(lib.KVM_GET_XCRS, "struct kvm_xcrs *", "KVM_GET_XCRS")

    def set_xcrs(self, data: bytes) -> None:
        self._set(lib.KVM_SET_XCRS, "struct kvm_xcrs *", data, "KVM_SET_XCRS")

    def get_vcpu_events(self) -> bytes:
        return self._get(lib.KVM_GET_VCPU_EVENTS, "struct kvm_vcpu_events *",
                         "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, data: bytes) -> None:
        self._set(lib.KVM_SET_VCPU_EVENTS, "struct kvm_vcpu_events *", data,
                  "KVM_SET_VCPU_EVENTS")

    def get_debugregs(self) -> bytes:
        return self._get(lib.KVM_GET_DEBUGREGS, "struct kvm_debugregs *", "KVM_GET_DEBUGREGS")

    def set_debugregs(self, data: bytes) -> None:
        self._set(lib.KVM_SET_DEBUGREGS, "struct kvm_debugregs *", data, "KVM_SET_DEBUGREGS")

    def get_mp_state(self) -> bytes:
        return self._get(lib.KVM_GET_MP_STATE, "struct kvm_mp_state *", "KVM_GET_MP_STATE")

    def set_mp_state(self, data: bytes) -> None:
        self._set(lib.KVM_SET_MP_STATE, "struct kvm_mp_state *", data, "KVM_SET_MP_STATE")

    def get_regs_bytes(self) -> bytes:
        return self._get(lib.KVM_GET_REGS, "struct kvm_regs *", "KVM_GET_REGS")

    def set_regs_bytes(self, data: bytes) -> None:
        self._set(lib.KVM_SET_REGS, "struct kvm_regs *", data, "KVM_SET_REGS")

    def get_sregs_bytes(self) -> bytes:
        return self._get(lib.KVM_GET_SREGS, "struct kvm_sregs *", "KVM_GET_SREGS")

    def set_sregs_bytes(self, data: bytes) -> None:
        self._set(lib.KVM_SET_SREGS, "struct kvm_sregs *", data, "KVM_SET_SREGS")

    def get_msrs(self, indices: Sequence[int]) -> list[tuple[int, int]]:
        """KVM_GET_MSRS: ``[(index, value)]`` for the MSRs KVM could read.

        KVM ABI: api.rst, KVM_GET_MSRS returns how many entries it read and
        stops at the first it cannot; that one is skipped and the rest asked
        again, so one MSR the vCPU's model lacks does not hide the others.
        At most MAX_IO_MSRS - 1 entries go in one call (x86.c: E2BIG).
        """
        out: list[tuple[int, int]] = []
        todo = list(indices)
        while todo:
            batch = todo[:MAX_IO_MSRS - 1]
            msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(batch), "entries": len(batch)})
            for entry, index in zip(msrs.entries, batch):
                entry.index = index
            n = _check(lib.kvmf_ioctl(self.fd, lib.KVM_GET_MSRS, msrs), "KVM_GET_MSRS")
            out += [(e.index, e.data) for e in msrs.entries[0:n]]
            todo = todo[n + 1:] if n < len(batch) else todo[n:]
        return out

    def set_msrs(self, entries: Sequence[tuple[int, int]]) -> int:
        """KVM_SET_MSRS: how many of ``entries`` KVM accepted, in order (it
        stops at the first it refuses; QEMU and Firecracker treat that as fatal)."""
        done = 0
        for start in range(0, len(entries), MAX_IO_MSRS - 1):
            batch = entries[start:start + MAX_IO_MSRS - 1]
            msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(batch), "entries": len(batch)})
            for slot, (index, data) in zip(msrs.entries, batch):
                slot.index, slot.data = index, data
            n = _check(lib.kvmf_ioctl(self.fd, lib.KVM_SET_MSRS, msrs), "KVM_SET_MSRS")
            done += n
            if n < len(batch):
                break
        return done

    # -- running --------------------------------------------------------------------

    def prepare_thread(self) -> None:
        """Call on the thread that will run this vCPU, before its first KVM_RUN:
        from then on a kick can interrupt KVM_RUN and nothing else on it."""
        _check(lib.kvmf_vcpu_thread_signals(self.fd), "KVM_SET_SIGNAL_MASK")

    def run_fast(self, fast, counts, console, ring, budget: int) -> bool:
        """KVM_RUN in C with the MSR and console fast paths (cstubs/kvm_source.c).

        Returns True when an exit awaits Python in the run page, False when
        ``budget`` fast exits were serviced in C.  EINTR as in ``run()``.
        ``console`` and ``ring`` may be ``ffi.NULL``.
        """
        while True:
            r = lib.kvmf_run_fast(self.fd, self.run_page, fast, counts, console, ring, budget)
            if self._settled(r):
                return r != 1

    def run(self) -> None:
        """KVM_RUN.  The GIL is released for the duration of the ioctl.

        EINTR (a kick signal, or ``immediate_exit``) is not an error: the run
        page then says KVM_EXIT_INTR.  EAGAIN is retried.
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
