"""The CLI does not demand root: membership of the group that owns the KVM node
is enough, as for /dev/kvm (root:kvm 0660 on the usual distributions).

A copy of /dev/kvm (char 10:232) is made in a temporary directory, owned by a
temporary group with mode 0660, and kvmfilter - the wheel (conftest.py's
``built_package``) installed into a venv nobody can execute - runs the bundled
guest as ``nobody`` with that group as its only supplementary group
(KVMFILTER_DEV_KVM names the node).  Without the group: exit 4 and the hint.

The venv is made with an interpreter ``nobody`` can run: this checkout's .venv
points into /root (0700) on pyenv hosts, so the system's python3 is tried too.
"""
import grp
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from conftest import skip_or_fail

SETPRIV = shutil.which("setpriv")


def as_nobody(args, groups=None, env=None, timeout=120):
    ids = ["--reuid=nobody", "--regid=nogroup"]
    ids.append(f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups")
    return subprocess.run([SETPRIV, *ids, *args], capture_output=True, text=True,
                          timeout=timeout, cwd="/", env=env)


def nobody_can_run(python: str) -> bool:
    try:
        p = as_nobody([python, "-c", "import sys; assert sys.version_info >= (3, 10)"],
                      timeout=30)
    except OSError:
        return False
    return p.returncode == 0


@pytest.fixture(scope="module")
def public_dir():
    if os.geteuid() != 0:
        pytest.skip("needs root: mknod, groupadd and setpriv to another user")
    if SETPRIV is None:
        skip_or_fail("setpriv (util-linux) is not installed")
    d = tempfile.mkdtemp(prefix="kvmf-nonroot-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def nobody_kvmfilter(public_dir, built_package):
    candidates = [getattr(sys, "_base_executable", None), os.path.realpath(sys.executable),
                  "/usr/bin/python3", "/usr/local/bin/python3"]
    python = next((c for c in candidates if c and os.path.exists(c) and nobody_can_run(c)),
                  None)
    if python is None:
        skip_or_fail(f"no Python >= 3.10 that user nobody can execute among {candidates}")
    venv = os.path.join(public_dir, "venv")
    subprocess.run([python, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    p = subprocess.run([sys.executable, "-m", "pip", "--python", os.path.join(venv, "bin", "python"),
                        "install", "--quiet", str(built_package.wheel)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    exe = os.path.join(venv, "bin", "kvmfilter")
    assert as_nobody([exe, "--version"]).returncode == 0
    return exe


@pytest.fixture(scope="module")
def kvm_node(public_dir, kvm):  # kvm: the module is loaded (else skip, or fail under CI)
    st = os.stat("/dev/kvm")
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (10, 232)
    group = f"kvmf{os.getpid()}"
    subprocess.run(["groupadd", group], check=True, capture_output=True, timeout=60)
    try:
        gid = grp.getgrnam(group).gr_gid
        node = os.path.join(public_dir, "kvm")
        os.mknod(node, 0o660 | stat.S_IFCHR, os.makedev(10, 232))
        os.chown(node, 0, gid)
        os.chmod(node, 0o660)
        yield node, gid
    finally:
        subprocess.run(["groupdel", group], capture_output=True, timeout=60)


def env_for(node):
    return {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "KVMFILTER_DEV_KVM": node}


def test_the_kvm_group_is_enough(nobody_kvmfilter, kvm_node):
    node, gid = kvm_node
    p = as_nobody([nobody_kvmfilter, "run", "--json"], groups=[gid], env=env_for(node))
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["ok"] is True and report["image"] == "<bundled:conformance>"
    assert report["migration"]["ready"] is True
    assert "Traceback" not in p.stderr


def test_the_group_really_is_what_grants_access(nobody_kvmfilter, kvm_node):
    # The control: the same user and node without the group - refused, with the hint.
    node, _ = kvm_node
    p = as_nobody([nobody_kvmfilter, "run", "--json"], env=env_for(node))
    assert p.returncode == 4, p.stdout + p.stderr
    assert "Permission denied" in p.stderr and "'kvm' group" in p.stderr
    assert "Traceback" not in p.stderr
    p = as_nobody([nobody_kvmfilter, "probe", "--json"], env=env_for(node))
    assert p.returncode == 4 and json.loads(p.stdout)["ok"] is False
