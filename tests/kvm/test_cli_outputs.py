"""`kvmfilter run --tap` and `--junit` on real guests: what CI consumes."""
import json
import xml.etree.ElementTree as ET

import pytest

from conftest import TEST_GUESTS, parse_tap
from daemons import kvmfilter


@pytest.fixture(autouse=True)
def _needs_kvm(kvm):  # skips (or fails under CI) without /dev/kvm
    return kvm


def test_tap_is_strict_tap_13_and_nothing_else():
    p = kvmfilter("run", "--tap")
    assert p.returncode == 0, p.stderr
    assert p.stdout.endswith("\n") and not p.stdout.endswith("\n\n")
    tap = parse_tap(p.stdout[:-1])  # every line: header, plan, test, comment; Totals last
    assert tap["plan"] == len(tap["results"]) >= 3
    assert tap["totals"]["fail"] == 0
    assert tap["totals"]["pass"] + tap["totals"]["skip"] == tap["plan"]
    names = [r["description"] for r in tap["results"]]
    assert names[-1] == "the guest stopped cleanly (HLT, or debug exit 0)"
    assert any(n.startswith("host: ") for n in names)
    assert sum(n.startswith("guest: ") for n in names) >= 5
    assert p.stderr == ""  # a clean run is quiet


def test_junit_counts_match_the_run(tmp_path):
    path = tmp_path / "conformance.xml"
    p = kvmfilter("run", "--junit", str(path), "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)  # --junit goes to the file; stdout is still the report
    suite = ET.parse(path).getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert int(suite.attrib["tests"]) == len(cases) >= 3
    assert suite.attrib["failures"] == "0" and suite.attrib["errors"] == "0"
    assert int(suite.attrib["skipped"]) == len(suite.findall("testcase/skipped"))
    assert suite.find("system-out").text == report["console"]
    tap = parse_tap(kvmfilter("run", "--tap").stdout.rstrip("\n"))
    assert len(cases) == tap["plan"] and int(suite.attrib["skipped"]) == tap["totals"]["skip"]


def test_a_failing_guest_is_a_failure_element_and_exit_1(tmp_path):
    path = tmp_path / "fault.xml"
    guest = str(TEST_GUESTS / "triple_fault.bin")
    p = kvmfilter("run", guest, "--junit", str(path))
    assert p.returncode == 1, p.stderr
    suite = ET.parse(path).getroot().find("testsuite")
    failures = [tc for tc in suite.findall("testcase") if tc.find("failure") is not None]
    assert suite.attrib["failures"] == str(len(failures)) == "1"
    assert "triple fault" in failures[0].find("failure").attrib["message"]
    p = kvmfilter("run", guest, "--tap")
    assert p.returncode == 1
    tap = parse_tap(p.stdout.rstrip("\n"))
    assert tap["totals"]["fail"] == 1 and tap["results"][-1]["ok"] is False


def test_json_and_tap_together_is_a_usage_error():
    p = kvmfilter("run", "--json", "--tap")
    assert p.returncode == 2
    assert "choose one" in p.stderr and p.stdout == ""


def test_junit_to_an_unwritable_path_is_a_usage_error(tmp_path):
    p = kvmfilter("run", "--junit", str(tmp_path / "missing-dir" / "x.xml"))
    assert p.returncode == 2 and "--junit" in p.stderr


def test_log_options_after_the_subcommand_on_a_real_run():
    p = kvmfilter("run", "--log-level", "info", "--log-format", "json", "--tap")
    assert p.returncode == 0, p.stderr
    events = [json.loads(line)["event"] for line in p.stderr.splitlines()]
    assert "vm_created" in events and "migration_readiness_changed" in events
    parse_tap(p.stdout.rstrip("\n"))  # the logs stayed off stdout
