"""Packaging: the sdist carries what building needs, the wheel is built from it,
is abi3 and complete, installs into a fresh venv and imports there; one
version source; ``python -m kvmfilter``; ``python -m pytest`` from a checkout
without a built extension tests the installed copy; .ci/sysdeps names what is
missing.  The build and the venv are made once per session (conftest.py's
``built_package``, tests/wheel_venv.py); no test here opens /dev/kvm.
"""
import email.parser
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def pyproject_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'^version\s*=\s*"([^"]+)"', text, re.M).group(1)


def checkout_files(pattern: str) -> list:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


# -- the sdist --------------------------------------------------------------------------

def test_sdist_carries_what_building_and_testing_need(built_package):
    names = set(built_package.sdist_names())
    needed = ["LICENSE", "README.md", "Makefile", "pyproject.toml", "setup.py", "MANIFEST.in",
              "cstubs/build.py", "cstubs/kvm_cdef.h", "cstubs/kvm_source.c",
              ".ci/sysdeps", "tests/conftest.py", "tests/wheel_venv.py"]
    for pattern in ("kvmfilter/guests/*.S", "kvmfilter/guests/*.inc", "kvmfilter/guests/*.bin",
                    "tests/guests/*.S", "tests/guests/*.bin", "tests/unit/*.py",
                    "tests/kvm/*.py", "docs/**/*.md", "examples/*"):
        needed += checkout_files(pattern)
    assert len(needed) > 40
    assert sorted(set(needed) - names) == []
    assert [n for n in names if n.endswith((".so", ".pyc", ".o", ".elf"))] == []


def test_the_wheel_was_built_from_the_sdist(built_package):
    # The wheel's source tree is the unpacked sdist (no .so before the build),
    # and the build left its products outside the package directory.
    assert built_package.unpacked.parent.name == "src"
    assert list((built_package.unpacked / "kvmfilter" / "kvm").glob("_kvm*.so")) == []
    assert (built_package.unpacked / "PKG-INFO").is_file()
    print("package build and install, seconds:",
          {k: round(v, 1) for k, v in built_package.seconds.items()})


# -- the wheel --------------------------------------------------------------------------

def test_wheel_is_tagged_cp310_abi3(built_package):
    name = built_package.wheel.name
    assert re.fullmatch(rf"kvmfilter-{re.escape(pyproject_version())}-cp310-abi3-linux_\w+\.whl",
                        name), name
    import zipfile
    with zipfile.ZipFile(built_package.wheel) as z:
        wheel_meta = z.read(f"kvmfilter-{pyproject_version()}.dist-info/WHEEL").decode()
    assert re.search(r"^Tag: cp310-abi3-linux_\w+$", wheel_meta, re.M), wheel_meta
    assert "Root-Is-Purelib: false" in wheel_meta


def test_wheel_contains_the_extension_guests_and_every_package(built_package):
    names = set(built_package.wheel_names())
    assert "kvmfilter/kvm/_kvm.abi3.so" in names
    assert [n for n in names if n.endswith(".so")] == ["kvmfilter/kvm/_kvm.abi3.so"]
    guests = checkout_files("kvmfilter/guests/*.bin")
    assert guests and sorted(set(guests) - names) == []
    packages = sorted(str(p.parent.relative_to(ROOT)) + "/__init__.py"
                      for p in (ROOT / "kvmfilter").rglob("__init__.py"))
    assert sorted(set(packages) - names) == []
    assert not any(n.startswith("tests/") for n in names)


def test_wheel_metadata_is_spdx_mit(built_package):
    import zipfile
    version = pyproject_version()
    with zipfile.ZipFile(built_package.wheel) as z:
        meta = email.parser.Parser().parsestr(
            z.read(f"kvmfilter-{version}.dist-info/METADATA").decode())
        license_text = z.read(f"kvmfilter-{version}.dist-info/licenses/LICENSE").decode()
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["Version"] == version
    assert "2026 the kvmfilter authors" in license_text
    assert license_text == (ROOT / "LICENSE").read_text()
    requires = meta.get_all("Requires-Dist")
    assert {r.split(">=")[0] for r in requires if "extra ==" not in r} == {
        "cffi", "click", "structlog"}


# -- the installed package ------------------------------------------------------------------

def run_in_venv(built_package, *args, cwd=None):
    # cwd outside the checkout: the venv's copy is what is imported.
    return subprocess.run([built_package.python, *args], capture_output=True, text=True,
                          cwd=cwd or tempfile.gettempdir(), timeout=120)


def test_fresh_venv_imports_the_policy_from_the_wheel(built_package):
    p = run_in_venv(built_package, "-c", "import kvmfilter.policy, kvmfilter.kvm._kvm as k;"
                    "print(kvmfilter.policy.__file__); print(k.__file__)")
    assert p.returncode == 0, p.stderr
    policy, ext = p.stdout.split()
    assert policy.startswith(str(built_package.venv)) and ext.endswith("_kvm.abi3.so")
    assert ext.startswith(str(built_package.venv))


def test_one_version_source(built_package):
    version = pyproject_version()
    p = subprocess.run([built_package.kvmfilter, "--version"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith(version), p.stdout
    p = run_in_venv(built_package, "-c", "from kvmfilter.base import version; print(version())")
    assert p.stdout.strip() == version, p.stderr


def test_python_m_kvmfilter_in_the_fresh_venv(built_package):
    p = run_in_venv(built_package, "-m", "kvmfilter", "--help")
    assert p.returncode == 0, p.stderr
    assert "Usage: kvmfilter" in p.stdout and "probe" in p.stdout
    p = run_in_venv(built_package, "-m", "kvmfilter", "--version")
    assert p.returncode == 0 and pyproject_version() in p.stdout


def test_python_m_kvmfilter_in_this_environment():
    assert (ROOT / "kvmfilter" / "__main__.py").is_file()
    p = subprocess.run([sys.executable, "-m", "kvmfilter", "run", "--json", "--tap"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "choose one" in p.stderr  # the CLI ran: a usage error


def test_pytest_in_a_checkout_without_the_extension_tests_the_installed_copy(built_package):
    # The unpacked sdist is such a checkout: the tests, and kvmfilter/ without _kvm*.so.
    tree = built_package.unpacked
    assert list((tree / "kvmfilter" / "kvm").glob("_kvm*.so")) == []
    tests = ["tests/unit/test_abi.py", "tests/unit/test_layers.py"]
    # The problem: with the checkout first on sys.path, the extension is not found.
    p = run_in_venv(built_package, "-m", "pytest", "-p", "no:cacheprovider", "--noconftest",
                    "-q", tests[0], cwd=tree)
    assert p.returncode != 0
    assert "_kvm" in p.stdout + p.stderr
    # The fix (conftest.py): the installed copy is tested.
    p = run_in_venv(built_package, "-m", "pytest", "-p", "no:cacheprovider", *tests, cwd=tree)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert re.search(r"\d+ passed", p.stdout)
    header = re.search(r"^kvmfilter under test: (.*)$", p.stdout, re.M)
    assert header is not None, p.stdout[:2000]
    assert header.group(1).startswith(str(built_package.venv)), header.group(1)
    assert "testing the installed copy" in header.group(1)


# -- .ci/sysdeps and the Makefile -------------------------------------------------------------

@pytest.fixture
def toolbox():
    """A PATH with cc and ld (and no apt-get: .ci/sysdeps must report, not install),
    and a "python" whose include dir has no Python.h."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="kvmf-sysdeps-"))
    d.chmod(0o755)
    for tool in ("cc", "ld", "sh", "cat", "id", "printf"):
        found = shutil.which(tool)
        if found:
            (d / tool).symlink_to(found)
    (d / "include").mkdir()
    (d / "python").write_text(f"#!/bin/sh\necho {d / 'include'}\n")
    (d / "python").chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def sysdeps(toolbox, *args):
    return subprocess.run([str(ROOT / ".ci" / "sysdeps"), *args],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": str(toolbox)})


def test_sysdeps_names_python3_dev_when_python_h_is_missing(toolbox):
    p = sysdeps(toolbox, str(toolbox / "python"))
    assert p.returncode == 2
    assert "missing system packages: python3-dev" in p.stderr, p.stderr
    assert f"Python.h for {toolbox / 'python'} not found" in p.stderr
    assert "qemu" not in p.stderr


def test_sysdeps_checks_the_headers_of_the_python_it_is_given(toolbox):
    p = sysdeps(toolbox, sys.executable)
    assert p.returncode == 0, p.stderr


def test_sysdeps_bench_asks_for_qemu(toolbox):
    p = sysdeps(toolbox, "--bench", sys.executable)
    assert p.returncode == 2
    assert "missing system packages: qemu-system-x86" in p.stderr, p.stderr


def test_makefile_passes_its_python_to_sysdeps():
    def dry(*args):
        p = subprocess.run(["make", "-n", "-B", *args, "PYTHON=/opt/py/bin/python3.99"],
                           cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        return p.stdout
    assert "./.ci/sysdeps /opt/py/bin/python3.99" in dry("venv")
    assert "./.ci/sysdeps --bench /opt/py/bin/python3.99" in dry("bench")
    assert "--bench" not in dry("test")
    floors = dry("test-min")
    assert "./.ci/sysdeps --min /opt/py/bin/python3.99" in floors
    assert re.search(r"cffi==[\d.]+ click==[\d.]+ structlog==[\d.]+", floors), floors
