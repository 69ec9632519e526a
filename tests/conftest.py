"""Shared fixtures.  tests/unit never opens /dev/kvm; tests/kvm runs real guests.

A KVM test skips only when the host truly lacks the feature, saying why;
KVMFILTER_REQUIRE_KVM=1 (set by .ci/run where /dev/kvm opens) turns every such
skip into a failure.

Which kvmfilter is under test: ``python -m pytest`` puts the current directory
first on sys.path, so run from a checkout it imports the checkout's
``kvmfilter/`` - right for the Makefile's editable install (the extension is
built into the checkout), wrong when kvmfilter is installed from a wheel and
the checkout has no built extension: then every KVM import fails.  In that
case (and only then) the checkout is taken off sys.path before anything
imports kvmfilter, and PYTHONSAFEPATH=1 keeps the tests' own ``python -c``
subprocesses (3.11+) from putting it back.  The header of the run says which
copy was tested.
"""
import importlib.machinery
import os
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEST_GUESTS = ROOT / "tests" / "guests"
REQUIRE_KVM = os.environ.get("KVMFILTER_REQUIRE_KVM") == "1"


def _is_checkout(entry: str) -> bool:
    try:
        return pathlib.Path(entry or os.getcwd()).resolve() == ROOT
    except OSError:
        return False


def unshadow_installed_copy():
    """Drop the checkout from sys.path when it would shadow an installed kvmfilter.

    Returns the installed package's directory when it did, else None.
    """
    if any((ROOT / "kvmfilter" / "kvm").glob("_kvm*.so")):
        return None  # the checkout is complete (the editable install): test it
    others = [entry for entry in sys.path if not _is_checkout(entry)]
    if len(others) == len(sys.path):
        return None  # the checkout is not on the path: nothing shadows
    spec = importlib.machinery.PathFinder.find_spec("kvmfilter", others)
    if spec is None or not spec.submodule_search_locations:
        return None  # nothing installed elsewhere: the checkout is all there is
    installed = pathlib.Path(list(spec.submodule_search_locations)[0])
    if not any((installed / "kvm").glob("_kvm*.so")):
        return None  # the other copy is no better
    sys.path[:] = others
    for name in [m for m in sys.modules if m == "kvmfilter" or m.startswith("kvmfilter.")]:
        del sys.modules[name]
    os.environ["PYTHONSAFEPATH"] = "1"
    return installed


UNSHADOWED = unshadow_installed_copy()


def pytest_report_header(config):
    spec = importlib.machinery.PathFinder.find_spec("kvmfilter", sys.path)
    where = list(spec.submodule_search_locations)[0] if spec else "not importable"
    note = " (the checkout has no built extension: testing the installed copy)" \
        if UNSHADOWED else ""
    return f"kvmfilter under test: {where}{note}"


TEST_TIME_LIMIT = 240  # seconds; a wedged KVM_RUN or daemon fails the test, not CI


@pytest.fixture(autouse=True)
def _time_limit(request):
    """Every test ends within TEST_TIME_LIMIT: SIGALRM raises in the test (a
    blocking call returns EINTR and Python raises), and faulthandler dumps every
    thread and exits if even that cannot get through."""
    import faulthandler
    import signal

    marker = request.node.get_closest_marker("time_limit")
    limit = marker.args[0] if marker else TEST_TIME_LIMIT

    def expired(signum, frame):  # noqa: F811 - with the limit that applies
        raise TimeoutError(f"the test ran longer than {limit} s "
                           "(a wedged KVM_RUN, daemon or socket?)")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(limit)
    faulthandler.dump_traceback_later(limit + 30, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


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


@pytest.fixture(scope="session")
def built_package(tmp_path_factory):
    """kvmfilter built as a user would (sdist, then a wheel from the unpacked
    sdist) and installed into a fresh venv; built once per session
    (tests/wheel_venv.py)."""
    import wheel_venv

    return wheel_venv.build_and_install(tmp_path_factory.mktemp("package"))


_TAP_TEST = re.compile(r"^(ok|not ok) (\d+) - ((?:[^#\\]|\\.)*?)"
                       r"(?: # (SKIP|TODO)(?: (.*))?)?$")
_TAP_TOTALS = re.compile(r"^# Totals: pass:(\d+) fail:(\d+) xfail:(\d+) xpass:(\d+) "
                         r"skip:(\d+) error:(\d+)$")


def parse_tap(text: str) -> dict:
    """Parse kvmfilter's TAP strictly: every line is the header, the plan, a test
    line or a comment; tests numbered 1..plan; the last line kselftest's
    ``# Totals:``, which must agree with the test lines.  No control characters."""
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", text), repr(text)
    lines = text.split("\n")
    assert lines[0] == "TAP version 13", lines[:2]
    plan = re.fullmatch(r"1\.\.(\d+)", lines[1])
    assert plan, lines[1]
    results, comments = [], []
    for line in lines[2:]:
        m = _TAP_TEST.match(line)
        if m:
            ok, number, description, directive, reason = m.groups()
            assert int(number) == len(results) + 1, line
            results.append({"ok": ok == "ok", "description": description,
                            "directive": directive, "reason": reason})
        else:
            assert line == "#" or line.startswith("# "), f"not a TAP line: {line!r}"
            comments.append(line)
    assert len(results) == int(plan.group(1))
    totals = _TAP_TOTALS.match(lines[-1])
    assert totals, lines[-1]
    assert sum(1 for c in comments if c.startswith("# Totals:")) == 1
    counted = dict(zip(("pass", "fail", "xfail", "xpass", "skip", "error"),
                       (int(n) for n in totals.groups())))
    expect = {"pass": 0, "fail": 0, "xfail": 0, "xpass": 0, "skip": 0, "error": 0}
    for r in results:
        if r["directive"] == "SKIP":
            expect["skip"] += 1
        elif r["directive"] == "TODO":
            expect["xpass" if r["ok"] else "xfail"] += 1
        else:
            expect["pass" if r["ok"] else "fail"] += 1
    assert counted == expect, (counted, expect)
    return {"plan": int(plan.group(1)), "results": results, "comments": comments,
            "totals": counted}


def test_guest(name: str) -> bytes:
    return (TEST_GUESTS / f"{name}.bin").read_bytes()


test_guest.__test__ = False  # a helper, not a test
