"""The wheel, installed into a fresh venv (conftest.py's ``built_package``: the
sdist, a wheel built from it, ``pip install``), drives real KVM: ``probe`` proves
each capability with its micro-guests and ``run`` runs the bundled conformance
guest from the wheel's package data."""
import json
import subprocess
import tempfile

import pytest


@pytest.fixture
def installed(built_package, kvm):  # kvm: skips (or fails under CI) without /dev/kvm
    def run(*args, timeout=120):
        return subprocess.run([built_package.kvmfilter, *args], capture_output=True,
                              text=True, timeout=timeout, cwd=tempfile.gettempdir())
    return run


def test_installed_probe_works_on_real_kvm(installed):
    p = installed("probe", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(p.stdout)
    assert report["ok"] is True
    features = report["features"]
    assert features and all({"advertised", "working", "detail"} <= set(f)
                            for f in features.values())
    assert any(f["working"] for f in features.values())


def test_installed_run_uses_the_bundled_guest(installed, built_package):
    p = installed("run", "--json")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr
    report = json.loads(p.stdout)
    assert report["ok"] is True
    assert report["migration"]["accesses_total"] > 0
    where = subprocess.run([built_package.python, "-c",
                            "import kvmfilter.guests, os; print(os.path.dirname("
                            "kvmfilter.guests.__file__))"],
                           capture_output=True, text=True, cwd=tempfile.gettempdir())
    assert where.stdout.strip().startswith(str(built_package.venv)), where.stderr
