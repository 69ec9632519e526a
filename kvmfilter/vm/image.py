"""L4: the guest-image contract (docs/contracts.md, "Guest images").

A flat binary loaded at guest-physical 0x7C00 and run in 16-bit real mode with
CS=DS=ES=SS=0, IP=SP=0x7C00, EFLAGS=0x2, general registers 0 except SI = the
vCPU index.  It must end below 0xA0000.  (A <=510-byte image with the 0x55AA
signature therefore also boots as a boot sector in QEMU.)

``IMAGE`` on the command line is a path or ``bundled:NAME``.  A path must be a
regular file: it is opened without blocking, so a FIFO or a device is refused
instead of hanging before the timeout starts.
"""
from __future__ import annotations

import os
import stat
from typing import Optional

from ..base import BadInput

LOAD_ADDRESS = 0x7C00
IMAGE_LIMIT = 0xA0000  # the image must end below the legacy video hole
MAX_IMAGE_SIZE = IMAGE_LIMIT - LOAD_ADDRESS
BUNDLED_PREFIX = "bundled:"
GUESTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "guests")
# Guests shipped in kvmfilter/guests/ (built from their .S sources) for users.
BUNDLED_GUESTS = ("conformance", "hello", "readiness_cycle", "ready_wait", "memcheck",
                  "memcheck64", "dirty_pages")
DEFAULT_GUEST = "conformance"


class ImageError(BadInput):
    """The guest image breaks the image contract, or cannot be read."""


def validate_image(image: bytes) -> None:
    if not image:
        raise ImageError("the image is empty")
    if len(image) > MAX_IMAGE_SIZE:
        raise ImageError(f"the image is {len(image)} bytes; at most {MAX_IMAGE_SIZE} "
                         f"fit between {LOAD_ADDRESS:#x} and {IMAGE_LIMIT:#x}")


def bundled_guest(name: str) -> bytes:
    """A guest image shipped in kvmfilter/guests/ (built from its .S source)."""
    with open(os.path.join(GUESTS_DIR, f"{name}.bin"), "rb") as f:
        return f.read()


def bundled_names() -> list[str]:
    """Every ``bundled:NAME`` that exists (for help text and shell completion)."""
    return [BUNDLED_PREFIX + g for g in BUNDLED_GUESTS
            if os.path.exists(os.path.join(GUESTS_DIR, f"{g}.bin"))]


def read_regular_file(path: str, limit: int, what: str) -> bytes:
    """At most ``limit`` bytes of the regular file ``path``, never blocking on
    a FIFO or device.

    Raises:
        BadInput: missing, unreadable, not a regular file, or over ``limit``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise BadInput(f"{path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadInput(f"{path}: not a regular file (a {what} must be one)")
        if st.st_size > limit:
            raise BadInput(f"{path}: {st.st_size} bytes; a {what} is at most {limit}")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise BadInput(f"{path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def load_image(path: Optional[str]) -> tuple[bytes, str]:
    """The image bytes and its report label; ``None`` -> the bundled default.

    Raises:
        ImageError: missing, unreadable, not a regular file, empty or oversized.
    """
    if path is None:
        path = BUNDLED_PREFIX + DEFAULT_GUEST
    if path.startswith(BUNDLED_PREFIX):
        name = path[len(BUNDLED_PREFIX):]
        if BUNDLED_PREFIX + name not in bundled_names():
            raise ImageError(f"{path}: no such bundled guest (there are: "
                             f"{', '.join(bundled_names())})")
        return bundled_guest(name), f"<bundled:{name}>"
    try:
        image = read_regular_file(path, MAX_IMAGE_SIZE, "guest image")
    except BadInput as exc:
        message = str(exc)
        if "is at most" in message:
            message += " (it must fit between 0x7C00 and 0xA0000)"
        raise ImageError(message) from None
    try:
        validate_image(image)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None
    return image, path


def reset_real_mode(vcpu, index: int) -> None:
    """The contract's initial registers on ``vcpu`` (a ``kvm.ioctls.Vcpu``)."""
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        seg.base = 0
        seg.selector = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    for name in ("rax", "rbx", "rcx", "rdx", "rdi", "rbp", "r8", "r9", "r10", "r11",
                 "r12", "r13", "r14", "r15"):
        setattr(regs, name, 0)
    regs.rsi = index
    regs.rip = LOAD_ADDRESS
    regs.rsp = LOAD_ADDRESS
    regs.rflags = 0x2
    vcpu.set_regs(regs)
