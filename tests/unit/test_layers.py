"""The layers are packages, and imports point down (docs/architecture.md).

Every module under kvmfilter/ is parsed (not imported) and each import of a
kvmfilter module is checked against the table below.  Only kvmfilter.kvm may
import the cffi module.  A subprocess proves that importing the policy package
- what an embedder imports - loads no cffi module at all.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "kvmfilter"

# Layer -> the layers it may import.  "top" is cli, bench, logs, render, __main__.
ALLOWED = {
    "base": set(),
    "policy": {"base"},
    "kvm": {"base"},
    "vm": {"base", "policy", "kvm"},
    "migrate": {"base", "policy", "kvm", "vm"},
    "daemon": {"base", "policy", "vm", "migrate"},
    "top": {"base", "policy", "kvm", "vm", "migrate", "daemon", "top"},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:  # the package itself
        return "top"
    if parts[1] in ("policy", "kvm", "vm", "migrate", "daemon", "base"):
        return parts[1]
    return "top"


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: pathlib.Path) -> list[str]:
    """Every kvmfilter module ``path`` imports, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "kvmfilter"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "kvmfilter":
                continue
            out.append(target)
            out += [f"{target}.{a.name}" for a in node.names]  # `from . import x`
    return out


def violations(path: pathlib.Path) -> list[str]:
    name = module_name(path)
    mine = layer_of(name)
    bad = []
    for target in imports(path):
        theirs = layer_of(target)
        if target.startswith("kvmfilter.kvm._kvm") and mine != "kvm":
            bad.append(f"{name} imports the cffi module ({target})")
        elif theirs != mine and theirs not in ALLOWED[mine]:
            bad.append(f"{name} ({mine}) imports {target} ({theirs})")
    return bad


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_checked():
    layers = {layer_of(module_name(p)) for p in MODULES}
    assert layers == set(ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    assert violations(path) == []


def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch):
    """The test above can fail: a policy module importing the VM layer or the
    daemon, or importing the cffi module, is reported (checked on a copy)."""
    probe = tmp_path / "kvmfilter" / "policy" / "_upward_probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from ..vm.vmm import Vmm\nfrom ..kvm._kvm import lib\n"
                     "import kvmfilter.daemon\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations(probe) == [
        "kvmfilter.policy._upward_probe (policy) imports kvmfilter.vm.vmm (vm)",
        "kvmfilter.policy._upward_probe (policy) imports kvmfilter.vm.vmm.Vmm (vm)",
        "kvmfilter.policy._upward_probe imports the cffi module (kvmfilter.kvm._kvm)",
        "kvmfilter.policy._upward_probe imports the cffi module (kvmfilter.kvm._kvm.lib)",
        "kvmfilter.policy._upward_probe (policy) imports kvmfilter.daemon (daemon)",
    ]


def test_importing_the_policy_loads_no_cffi():
    code = ("import sys, kvmfilter.policy, kvmfilter.policy.journal;"
            "from kvmfilter.policy import MigrationControl;"
            "mc = MigrationControl(); mc.access(0, 'wrmsr', 1); print(mc.ready);"
            "bad = sorted(m for m in sys.modules if m == 'cffi' or m.startswith('_cffi')"
            " or m.startswith('kvmfilter.kvm') or m.startswith('kvmfilter.vm'));"
            "print(bad)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:2] == ["True", "[]"]


def test_importing_kvmfilter_loads_no_cffi():
    code = "import sys, kvmfilter; print(sorted(m for m in sys.modules if 'cffi' in m))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
