"""Shared fixtures.  tests/unit never opens /dev/kvm; tests/kvm runs real guests.

A KVM test skips only when the host truly lacks the feature, saying why;
KVMFILTER_REQUIRE_KVM=1 (set by .ci/run where /dev/kvm opens) turns every such
skip into a failure.
"""
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEST_GUESTS = ROOT / "tests" / "guests"
REQUIRE_KVM = os.environ.get("KVMFILTER_REQUIRE_KVM") == "1"


def skip_or_fail(reason: str):
    """Skip with ``reason``, or fail when KVMFILTER_REQUIRE_KVM=1."""
    if REQUIRE_KVM:
        pytest.fail(f"KVMFILTER_REQUIRE_KVM=1 but: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kvm():
    from kvmfilter.kvm.ioctls import Kvm, KvmError

    try:
        handle = Kvm()
    except KvmError as exc:
        skip_or_fail(f"cannot open /dev/kvm: {exc}. Is KVM loaded and enabled?")
    yield handle
    handle.close()


@pytest.fixture
def require_cap(kvm):
    """require_cap(KVM_CAP_X, "name") skips (with the reason) when KVM lacks it."""
    def check(cap: int, name: str) -> int:
        value = kvm.check_extension(cap)
        if not value:
            skip_or_fail(f"this host's KVM does not advertise {name}")
        return value
    return check


def test_guest(name: str) -> bytes:
    return (TEST_GUESTS / f"{name}.bin").read_bytes()


test_guest.__test__ = False  # a helper, not a test
