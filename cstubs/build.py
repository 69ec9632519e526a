"""cffi API-mode builder for ``kvmfilter.kvm._kvm`` (L0).

The cdef (``kvm_cdef.h``) declares names only; the C compiler checks every
constant and struct layout against the installed <linux/kvm.h> and
<asm/kvm_para.h> (``kvm_source.c``).  setup.py names ``ffibuilder`` in
``cffi_modules``; cffi calls it while building.  Importing this file does
nothing: the toolchain check and the FFI are built inside the function.

    python cstubs/build.py    # build the module in place, verbosely
"""
import os
import shutil
import subprocess
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = "kvmfilter.kvm._kvm"
REQUIRED_HEADERS = ("linux/kvm.h", "asm/kvm_para.h", "linux/kvm_para.h")
INSTALL_HINT = (
    "Install a C compiler, the Linux uapi headers and the Python headers "
    "(Debian/Ubuntu: apt-get install gcc linux-libc-dev python3-dev; "
    "Fedora: dnf install gcc kernel-headers python3-devel)."
)
# Commands that only read metadata: no compiler needed (sdist, egg_info ...).
_METADATA_COMMANDS = {"egg_info", "sdist", "dist_info", "--version", "--name"}


def _read(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


def _preprocess(cc, source, include_dirs=()):
    args = [cc, "-E", "-x", "c", "-", "-o", os.devnull]
    args += [f"-I{d}" for d in include_dirs]
    return subprocess.run(args, input=source, capture_output=True, text=True)


def _last_line(text):
    text = text.strip()
    return text.splitlines()[-1] if text else "unknown error"


def check_toolchain():
    """Fail early, naming what to install, instead of with a compiler trace."""
    cc = os.environ.get("CC", "cc").split()[0]
    if shutil.which(cc) is None:
        sys.exit(f"kvmfilter: no C compiler ({cc!r} not found). {INSTALL_HINT}")
    proc = _preprocess(cc, "".join(f"#include <{h}>\n" for h in REQUIRED_HEADERS))
    if proc.returncode != 0:
        sys.exit(f"kvmfilter: cannot include {', '.join(REQUIRED_HEADERS)}: "
                 f"{_last_line(proc.stderr)}. {INSTALL_HINT}")
    include = sysconfig.get_paths()["include"]
    proc = _preprocess(cc, "#include <Python.h>\n", [include])
    if proc.returncode != 0:
        sys.exit(f"kvmfilter: cannot include Python.h (looked in {include}): "
                 f"{_last_line(proc.stderr)}. {INSTALL_HINT}")


def ffibuilder():
    """The FFI for ``kvmfilter.kvm._kvm``, after checking the toolchain."""
    import cffi

    if not _METADATA_COMMANDS & set(sys.argv[1:]):
        check_toolchain()
    ffi = cffi.FFI()
    ffi.cdef(_read("kvm_cdef.h"))
    ffi.set_source(MODULE, _read("kvm_source.c"))
    return ffi


if __name__ == "__main__":
    ffibuilder().compile(verbose=True)
