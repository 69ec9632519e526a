"""The cffi builder: importing it does nothing, and a missing compiler, uapi
header or Python.h is reported by name, with what to install."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(code, env_cc):
    return subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'cstubs');"
                           + code], cwd=ROOT, capture_output=True, text=True,
                          env={"CC": env_cc, "PATH": "/usr/bin:/bin"})


def _check(env_cc):
    return _run("import build; build.check_toolchain()", env_cc)


def test_importing_the_builder_does_no_work():
    # With no compiler at all, an import that checked or built would fail.
    p = _run("import build; print(callable(build.ffibuilder))", "no-such-cc")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "True"


def test_missing_compiler_names_the_packages():
    p = _check("no-such-cc")
    assert p.returncode != 0
    assert "no C compiler" in p.stderr and "linux-libc-dev" in p.stderr and "gcc" in p.stderr


def _fake_cc(tmp_path, missing: str):
    """A "compiler" whose preprocessor cannot find one header."""
    fake = tmp_path / "cc"
    fake.write_text(f"#!/bin/sh\nif grep -q '{missing}'; then echo 'fatal error: {missing}: "
                    "No such file' >&2; exit 1; fi\nexit 0\n")
    fake.chmod(0o755)
    return str(fake)


def test_missing_headers_names_the_packages(tmp_path):
    p = _check(_fake_cc(tmp_path, "linux/kvm.h"))
    assert p.returncode != 0
    assert "cannot include" in p.stderr and "linux-libc-dev" in p.stderr


def test_missing_python_h_names_python3_dev(tmp_path):
    p = _check(_fake_cc(tmp_path, "Python.h"))
    assert p.returncode != 0
    assert "Python.h" in p.stderr and "python3-dev" in p.stderr


def test_present_toolchain_passes():
    assert _check("cc").returncode == 0
