"""cffi API-mode builder for kvmfilter._kvm (L0).

The cdef (cstubs/kvm_cdef.h) declares names only; the C compiler checks every
constant and struct layout against the installed <linux/kvm.h> and
<asm/kvm_para.h>.  Used by setup.py (``cffi_modules``) at install time.
"""
import os
import shutil
import subprocess
import sys

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))
CSTUBS = os.path.join(os.path.dirname(HERE), "cstubs")

REQUIRED_HEADERS = ("linux/kvm.h", "asm/kvm_para.h", "linux/kvm_para.h")
INSTALL_HINT = (
    "Install a C compiler and the Linux uapi headers "
    "(Debian/Ubuntu: apt-get install gcc linux-libc-dev; "
    "Fedora: dnf install gcc kernel-headers)."
)


def _read(name):
    with open(os.path.join(CSTUBS, name), encoding="utf-8") as f:
        return f.read()


def check_toolchain():
    """Fail early, naming what to install, instead of with a compiler trace."""
    cc = os.environ.get("CC", "cc").split()[0]
    if shutil.which(cc) is None:
        sys.exit(f"kvmfilter: no C compiler ({cc!r} not found). {INSTALL_HINT}")
    source = "".join(f"#include <{h}>\n" for h in REQUIRED_HEADERS)
    proc = subprocess.run(
        [cc, "-E", "-x", "c", "-", "-o", os.devnull],
        input=source, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        sys.exit(
            f"kvmfilter: cannot include {', '.join(REQUIRED_HEADERS)}: "
            f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'unknown error'}. "
            f"{INSTALL_HINT}"
        )


ffibuilder = cffi.FFI()
ffibuilder.cdef(_read("kvm_cdef.h"))
ffibuilder.set_source("kvmfilter._kvm", _read("kvm_source.c"))

if "egg_info" not in sys.argv and "sdist" not in sys.argv:
    check_toolchain()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
