"""Every committed guest .bin is exactly what its .S source assembles to."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = sorted(ROOT.glob("kvmfilter/guests/*.S")) + sorted(ROOT.glob("tests/guests/*.S"))
INCLUDES = sorted(ROOT.glob("kvmfilter/guests/*.inc"))
TOOLS = ("gcc", "ld", "objcopy")


def test_there_are_guests():
    names = {s.stem for s in SOURCES}
    assert {"conformance", "hello", "probe_wrmsr", "probe_vmmcall", "probe_vmcall",
            "triple_fault", "vmcall", "port_flood"} <= names


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_committed_binary_matches_source(source, tmp_path):
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"cannot rebuild guests without {', '.join(missing)} (binutils/gcc)")
    committed = source.with_suffix(".bin")
    assert committed.exists(), f"{committed.name} is not committed; run make guests"
    target = tmp_path / committed.name
    shutil.copy(source, tmp_path / source.name)  # includes come from kvmfilter/guests
    subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), "-C", str(tmp_path),
                    committed.name], check=True, capture_output=True)
    assert target.read_bytes() == committed.read_bytes(), (
        f"{committed.name} is stale: run make guests and commit it")


def test_bundled_images_are_packaged():
    from kvmfilter.vm.image import BUNDLED_GUESTS, bundled_guest, bundled_names
    assert bundled_guest("conformance")[:1] == b"\xfa"  # cli
    assert len(bundled_guest("conformance")) < 0xA0000 - 0x7C00
    assert bundled_names() == [f"bundled:{name}" for name in BUNDLED_GUESTS]
