"""Build kvmfilter as a user would and install it into a fresh venv.

``python -m build --sdist`` from the checkout, the sdist unpacked, ``python -m
build --wheel`` from the unpacked tree (so the wheel can only contain what the
sdist carries), then ``python -m venv`` and ``pip install`` of that wheel (its
dependencies from the package index or pip's cache) plus pytest.  Both builds
are isolated: their build dependencies (setuptools>=77, cffi) come from the
index too, as for any user.  conftest.py's ``built_package`` fixture calls
this once per session; tests/unit/test_packaging.py and
tests/kvm/test_packaging_kvm.py share the result.
"""
from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys
import tarfile
import time
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class BuiltPackage:
    sdist: pathlib.Path
    unpacked: pathlib.Path  # the sdist's tree, which the wheel was built from
    wheel: pathlib.Path
    venv: pathlib.Path
    seconds: dict  # step -> wall time

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    @property
    def kvmfilter(self) -> str:
        return str(self.venv / "bin" / "kvmfilter")

    def sdist_names(self) -> list[str]:
        with tarfile.open(self.sdist) as tar:
            return [m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name]

    def wheel_names(self) -> list[str]:
        with zipfile.ZipFile(self.wheel) as z:
            return z.namelist()


def _run(args, what, timeout=600, **kw):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                       timeout=timeout, **kw)
    if p.returncode != 0:
        raise AssertionError(f"{what} failed (exit {p.returncode}):\n"
                             f"{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def _only(directory: pathlib.Path, pattern: str) -> pathlib.Path:
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {directory}, found {found}"
    return found[0]


def build_and_install(work: pathlib.Path) -> BuiltPackage:
    seconds = {}
    dist = work / "dist"

    t = time.monotonic()
    _run([sys.executable, "-m", "build", "--sdist", "--outdir", dist, ROOT], "building the sdist")
    sdist = _only(dist, "kvmfilter-*.tar.gz")
    seconds["sdist"] = time.monotonic() - t

    t = time.monotonic()
    src = work / "src"
    with tarfile.open(sdist) as tar:
        tar.extractall(src, filter="data") if hasattr(tarfile, "data_filter") \
            else tar.extractall(src)
    unpacked = _only(src, "kvmfilter-*")
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", dist, unpacked],
         "building the wheel from the unpacked sdist")
    wheel = _only(dist, "kvmfilter-*.whl")
    seconds["wheel"] = time.monotonic() - t

    t = time.monotonic()
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", venv], "creating a venv")
    _run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel, "pytest"],
         "installing the wheel")
    seconds["venv"] = time.monotonic() - t
    return BuiltPackage(sdist, unpacked, wheel, venv, seconds)
