"""kvmfilter/render.py on hand-made run reports: text for people, strict TAP 13
and JUnit XML for CI, and guest console text that cannot drive a terminal."""
import copy
import os
import pathlib
import re
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from conftest import parse_tap

from kvmfilter import cli, render

RAW_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029]")

BASE = {
    "image": "<test>", "vcpus": 1,
    "exit": {"reason": "debug_exit", "code": 0, "detail": None},
    "console": "",
    "migration": {"advertised": True, "value": 1, "ready": True, "initial_value": 0,
                  "accesses": [], "accesses_total": 4, "verdicts": {"ok": 3, "gp": 1},
                  "per_vcpu": {}, "transitions": [
                      {"vcpu": 0, "from": 0, "to": 1, "time": "2026-01-01T00:00:00.000000Z"}],
                  "transitions_total": 1, "transitions_omitted": 0,
                  "since": "2026-01-01T00:00:00.000000Z", "blocked_reasons": []},
    "page_map": {"tracking": True, "shared": [], "shared_bytes": 0, "ranges": 0, "updates": 0,
                 "hypercall_exit": "enabled"},
    "exits": {"io": 10}, "unhandled_ports": {}, "elapsed_s": 0.0125,
    "checks": [{"name": "guest #GP count equals the host's gp verdicts", "guest": 1,
                "host": 1, "ok": True}],
    "ok": True,
}


def report(console="", checks=None, exit_=None, ok=True):
    r = copy.deepcopy(BASE)
    r["console"] = console
    if checks is not None:
        r["checks"] = checks
    if exit_ is not None:
        r["exit"] = exit_
    r["ok"] = ok
    return r


def junit_tree(r):
    xml = render.junit(r)
    assert xml.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n')
    root = ET.fromstring(xml)  # well-formed, or this raises
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    return root, suite


PASSING_CONSOLE = ("TAP version 13\n1..3\nok 1 - CPUID has the signature\n"
                   "ok 2 - WRMSR with reserved bit 1 raises #GP\n"
                   "ok 3 - the hypercall # SKIP the host raised #UD\n# guest saw 1 #GP\n")


def test_a_passing_run():
    r = report(PASSING_CONSOLE)
    tap = parse_tap(render.tap(r))
    assert tap["plan"] == 5  # 3 guest lines, 1 host check, the exit
    assert [x["ok"] for x in tap["results"]] == [True] * 5
    assert tap["totals"] == {"pass": 4, "fail": 0, "xfail": 0, "xpass": 0, "skip": 1, "error": 0}
    assert tap["results"][1]["description"] == r"guest: WRMSR with reserved bit 1 raises \#GP"
    assert tap["results"][2]["directive"] == "SKIP"
    assert tap["results"][2]["reason"] == r"the host raised \#UD"
    assert "# guest saw 1 #GP" in tap["comments"]
    _, suite = junit_tree(r)
    assert suite.attrib["tests"] == "5" and suite.attrib["failures"] == "0"
    assert suite.attrib["skipped"] == "1" and suite.attrib["errors"] == "0"
    assert suite.find("testcase/failure") is None
    skipped = suite.findall("testcase/skipped")
    assert [s.attrib["message"] for s in skipped] == ["the host raised #UD"]
    assert suite.find("system-out").text == PASSING_CONSOLE
    text = render.human(r, {})
    assert text.splitlines()[-1] == "result: ok"
    assert "exit: debug_exit (code 0)" in text
    assert "check: ok - guest #GP count equals the host's gp verdicts (guest 1, host 1)" in text


def test_a_failing_guest_tap_line():
    r = report("1..2\nok 1 - first\nnot ok 2 - the value is unchanged\n", ok=False)
    tap = parse_tap(render.tap(r))
    assert [x["ok"] for x in tap["results"]] == [True, False, True, True]
    assert tap["totals"]["fail"] == 1 and tap["totals"]["pass"] == 3
    _, suite = junit_tree(r)
    assert suite.attrib["failures"] == "1"
    failed = [tc for tc in suite.findall("testcase") if tc.find("failure") is not None]
    assert [tc.attrib["name"] for tc in failed] == ["guest: the value is unchanged"]
    assert render.human(r, {}).splitlines()[-1] == "result: FAILED"


def test_a_host_check_failure():
    checks = [{"name": "guest #GP count equals the host's gp verdicts", "guest": 2, "host": 1,
               "ok": False}]
    r = report("ok 1 - fine\n", checks=checks, ok=False)
    tap_text = render.tap(r)
    tap = parse_tap(tap_text)
    assert [x["ok"] for x in tap["results"]] == [True, False, True]
    lines = tap_text.splitlines()
    failed_at = lines.index(r"not ok 2 - host: guest \#GP count equals the host's gp verdicts")
    assert lines[failed_at + 1] == "# guest 2, host 1"  # the diagnostic follows its test
    _, suite = junit_tree(r)
    (failure,) = suite.findall("testcase/failure")
    assert failure.attrib["message"] == "guest 2, host 1" and failure.text == "guest 2, host 1"
    assert "check: FAILED - guest #GP count" in render.human(r, {})


def test_a_bad_exit_is_a_failure_with_its_detail():
    r = report("", exit_={"reason": "triple_fault", "code": None,
                          "detail": "KVM_EXIT_SHUTDOWN\nat 0x7c05"}, ok=False)
    tap_text = render.tap(r)
    tap = parse_tap(tap_text)
    assert tap["results"][-1]["ok"] is False and tap["totals"]["fail"] == 1
    # A detail with a newline stays inside comments (strict TAP).
    assert "# triple_fault (code None): KVM_EXIT_SHUTDOWN" in tap_text.splitlines()
    assert "# at 0x7c05" in tap_text.splitlines()
    _, suite = junit_tree(r)
    assert suite.attrib["failures"] == "1"
    assert "triple_fault" in suite.find("testcase/failure").attrib["message"]


def test_skip_and_todo_directives():
    console = ("ok 1 - a # SKIP no hardware\nnot ok 2 - b # skip\n"
               "not ok 3 - c # TODO not yet\nok 4 - d # TODO\nok 5 - e\n")
    r = report(console)
    tap = parse_tap(render.tap(r))
    assert [(x["directive"], x["reason"]) for x in tap["results"][:4]] == [
        ("SKIP", "no hardware"), ("SKIP", "skipped"), ("TODO", "not yet"), ("TODO", "todo")]
    # A TODO with a reason is a TODO (expected failure), not a SKIP.
    assert tap["totals"] == {"pass": 3, "fail": 0, "xfail": 1, "xpass": 1, "skip": 2, "error": 0}
    _, suite = junit_tree(r)
    assert suite.attrib["failures"] == "0" and suite.attrib["skipped"] == "3"
    messages = [s.attrib["message"] for s in suite.findall("testcase/skipped")]
    assert messages == ["no hardware", "skipped", "TODO: not yet"]


ATTACK = ("\x1b]0;owned\x07\x1b[2J\x1b[H\rresult: ok\x9b31m\u202eko :tluser\u2028"
          "\x00\x01\x0c\x7f\ufffe\n")


def test_console_control_characters_are_escaped_for_people():
    r = report(ATTACK + "ok 1 - \x1b[32mgreen\x1b[0m\n", ok=False)
    text = render.human(r, {})
    assert not RAW_CONTROLS.search(text), repr(text)
    assert r"\x1b]0;owned\x07\x1b[2J\x1b[H\x0dresult: ok\x9b31m\u202eko :tluser\u2028" in text
    # The only line that starts with "result:" is the host's verdict, last.
    assert [line for line in text.splitlines() if line.startswith("result:")] == [
        "result: FAILED"]


def test_console_control_characters_are_escaped_in_tap():
    console = ATTACK + "ok 1 - \x1b[32mgreen\x1b[0m \u202eevil\n# \x1b[31mred\n# Totals: pass:99\n"
    tap_text = render.tap(report(console))
    tap = parse_tap(tap_text)  # asserts no raw control characters, one Totals line
    assert tap["results"][0]["description"] == r"guest: \x1b[32mgreen\x1b[0m \u202eevil"
    assert r"# \x1b[31mred" in tap["comments"]
    assert "# guest Totals: pass:99" in tap["comments"]
    assert tap_text.splitlines()[-1].startswith("# Totals: pass:")


def test_junit_is_well_formed_with_control_characters():
    console = ATTACK + "not ok 1 - \x00nul \x1b[1mbold\ud800\n"
    root, suite = junit_tree(report(console, ok=False))
    assert root.attrib["tests"] == suite.attrib["tests"] == "3"
    failed = [tc.attrib["name"] for tc in suite.findall("testcase")
              if tc.find("failure") is not None]
    assert failed == [r"guest: \x00nul \x1b[1mbold\ud800"]
    out = suite.find("system-out").text
    assert r"\x1b]0;owned\x07" in out and r"\x00\x01\x0c" in out and r"\ufffe" in out
    assert not RAW_CONTROLS.search(out)


def test_terminal_safe_keeps_text_tabs_and_newlines():
    assert render.terminal_safe("a\tb\nc — ünïcode ✓") == "a\tb\nc — ünïcode ✓"
    assert render.terminal_safe("\x1b") == r"\x1b"
    assert render.terminal_safe("\u2066x\u2069") == r"\u2066x\u2069"


# -- the example CI files use commands the CLI has ------------------------------------------

CI_EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples" / "ci"
_COMMAND = re.compile(r"(?:^|[\s;&|])(?:\S*/)?kvmfilter\s+(.*?)\s*$")


def ci_commands(path):
    """Every `kvmfilter ...` command line in a CI file (YAML `run:` or list items)."""
    found = []
    for line in path.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if line.startswith("#"):
            continue
        line = re.sub(r"^(?:-\s+)?(?:run:\s*)?", "", line)
        m = _COMMAND.match(line)
        if m and not line.startswith(("name:", "path:", "uses:", "- uses:")):
            found.append(shlex.split(m.group(1)))
    return found


@pytest.mark.parametrize("name", ["github-actions.yml", "gitlab-ci.yml"])
def test_ci_examples_use_commands_the_cli_has(name, tmp_path):
    commands = ci_commands(CI_EXAMPLES / name)
    assert [c[0] for c in commands] == ["probe", "run"], commands
    exe = os.path.join(os.path.dirname(sys.executable), "kvmfilter")
    kvmfilter = [exe] if os.path.exists(exe) else [sys.executable, "-m", "kvmfilter"]
    for args in commands:
        sub, options = args[0], [a for a in args[1:] if a.startswith("--")]
        # `kvmfilter SUB --help` documents every option the file uses ...
        p = subprocess.run(kvmfilter + [sub, "--help"], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, p.stderr
        for option in options:
            assert re.search(rf"(?<![\w-]){re.escape(option)}\b", p.stdout), (option, p.stdout)
        # ... and click parses the whole line (types and all), without running it.
        parent = cli.cli.make_context("kvmfilter", [sub], resilient_parsing=True)
        command = cli.cli.get_command(parent, sub)
        ctx = command.make_context(sub, [a.replace("kvmfilter-conformance.xml",
                                                   str(tmp_path / "x.xml")) for a in args[1:]],
                                   parent=parent)
        assert ctx.params is not None


def test_ci_examples_keep_the_report_even_on_failure():
    gh = (CI_EXAMPLES / "github-actions.yml").read_text()
    assert "actions/upload-artifact@" in gh and "reporter: java-junit" in gh
    assert gh.count("if: ${{ always() }}") == 2
    assert gh.count("kvmfilter-conformance.xml") >= 3
    gl = (CI_EXAMPLES / "gitlab-ci.yml").read_text()
    assert re.search(r"artifacts:\n(?:\s+.*\n)*?\s+when: always", gl)
    assert re.search(r"reports:\n\s+junit: kvmfilter-conformance.xml", gl)
