"""Installing without a compiler or the uapi headers fails with what to install."""
import subprocess
import sys
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _check(env_cc):
    code = ("import sys; sys.argv=['build']; sys.path.insert(0, 'kvmfilter');"
            "import _build; _build.check_toolchain()")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env={"CC": env_cc, "PATH": "/usr/bin:/bin"})


def test_missing_compiler_names_the_packages():
    p = _check("no-such-cc")
    assert p.returncode != 0
    assert "no C compiler" in p.stderr and "linux-libc-dev" in p.stderr and "gcc" in p.stderr


def test_missing_headers_names_the_packages(tmp_path):
    # A "compiler" whose preprocessor cannot find <linux/kvm.h>.
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fatal error: linux/kvm.h: No such file' >&2\nexit 1\n")
    fake.chmod(0o755)
    p = _check(str(fake))
    assert p.returncode != 0
    assert "cannot include" in p.stderr and "linux-libc-dev" in p.stderr


def test_present_toolchain_passes():
    assert _check("cc").returncode == 0
