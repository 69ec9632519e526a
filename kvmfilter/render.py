"""L5: the run report rendered for people and for CI - text, strict TAP, JUnit XML.

The report itself is a dict (docs/contracts.md); nothing here changes it.
Guest console text is escaped for a terminal: a guest must not be able to
set the window title, move the cursor or draw a fake "result: ok".
"""
from __future__ import annotations

import re

# The patterns are compiled on first use (re's cache), and ElementTree imported
# only for JUnit: `kvmfilter run` starts ~7 ms sooner than with both up front.

# C0 controls except tab and newline, DEL, C1 controls; and the characters that
# reorder or break text without being controls: bidi embeddings, overrides and
# isolates ("Trojan Source"), the line and paragraph separators.
_UNSAFE = ("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f"
           "\u2028-\u202e\u2066-\u2069]")

# The CLI's hints for the gate's reasons, naming its own options.
GATE_HINTS = {
    "migration-control-not-offered": "start the VM without --no-migration-control",
    "page-encryption-status-unreportable": "without --no-map-gpa-range, on a host whose "
                                           "KVM delivers the hypercall exit (kvmfilter "
                                           "probe: exit_hypercall); or --plain-memory for "
                                           "a guest without encrypted memory",
}


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal_safe(text: str) -> str:
    """``text`` with control characters shown as ``\\xNN`` (``\\uNNNN`` for the
    bidi and separator characters); newlines and tabs kept."""
    return re.sub(_UNSAFE, lambda m: _escape(m.group()), text)


def human(r: dict, hints: dict) -> str:
    """The report as text for a terminal.  ``hints``: blocker text -> hint."""
    lines = []
    if r["console"]:
        lines.append(terminal_safe(r["console"]).rstrip("\n"))
    ex = r["exit"]
    lines.append(f"exit: {ex['reason']} (code {ex['code']})"
                 + (f": {ex['detail']}" if ex["detail"] else ""))
    m = r["migration"]
    lines.append(f"migration control: {'advertised' if m['advertised'] else 'not advertised'}"
                 f", value {m['value']}, {'READY' if m['ready'] else 'not ready'}; "
                 f"{m['accesses_total']} accesses ({m['verdicts']['ok']} ok, "
                 f"{m['verdicts']['gp']} #GP), {m['transitions_total']} transitions")
    if m["transitions_omitted"]:
        lines.append(f"  ({m['transitions_omitted']} earlier transitions not kept in "
                     "memory; the journal has them all)")
    for t in m["transitions"]:
        lines.append(f"  {t['time']}  vCPU {t['vcpu']}: {t['from']} -> {t['to']}")
    for reason in m["blocked_reasons"]:
        hint = hints.get(reason)
        lines.append(f"blocked: {reason}" + (f" (hint: {hint})" if hint else ""))
    p = r["page_map"]
    if p["tracking"]:
        lines.append(f"page map: {p['shared_bytes']} bytes shared in {p['ranges']} ranges "
                     f"(hypercall exit: {p['hypercall_exit']})")
    if r["unhandled_ports"]:
        lines.append(f"unhandled ports: {len(r['unhandled_ports'])} ports, "
                     f"{sum(r['unhandled_ports'].values())} accesses")
    for c in r["checks"]:
        lines.append(f"check: {'ok' if c['ok'] else 'FAILED'} - {c['name']} "
                     f"(guest {c['guest']}, host {c['host']})")
    lines.append(f"result: {'ok' if r['ok'] else 'FAILED'}")
    return "\n".join(lines)


# -- CI formats ------------------------------------------------------------------------

_TAP_RESULT = r"(?i)^(ok|not ok)\b\s*(\d+)?\s*(?:-\s*)?(.*?)\s*(?:#\s*(SKIP|TODO)\b\s*(.*))?$"


class Case:
    """One test case: the guest's TAP results, the host's checks, the run itself.

    ``skip``/``todo``: the reason, when the guest's TAP line had that directive
    (a skip counts as neither pass nor fail; a TODO that fails is expected).
    """

    def __init__(self, name: str, ok: bool, skip: str | None = None, detail: str = "",
                 todo: str | None = None):
        self.name, self.ok, self.skip, self.detail, self.todo = name, ok, skip, detail, todo

    @property
    def failed(self) -> bool:
        """A failure CI must report (not skipped, not an expected TODO failure)."""
        return not self.ok and self.skip is None and self.todo is None


def cases(r: dict) -> list[Case]:
    """Every result in the report, in order: guest TAP lines, host checks, the exit."""
    out = []
    for line in r["console"].splitlines():
        m = re.match(_TAP_RESULT, line.strip())
        if m:
            status, _, name, directive, reason = m.groups()
            directive = (directive or "").upper()
            name = name.replace("\\#", "#")  # the guest's own TAP escape; tap() redoes it
            out.append(Case(f"guest: {name or 'unnamed'}", status.lower() == "ok",
                            skip=(reason or "skipped") if directive == "SKIP" else None,
                            todo=(reason or "todo") if directive == "TODO" else None))
    for c in r["checks"]:
        out.append(Case(f"host: {c['name']}", c["ok"],
                        detail=f"guest {c['guest']}, host {c['host']}"))
    ex = r["exit"]
    clean = ex["reason"] == "hlt" or (ex["reason"] == "debug_exit" and ex["code"] == 0)
    out.append(Case("the guest stopped cleanly (HLT, or debug exit 0)", clean,
                    detail=f"{ex['reason']} (code {ex['code']})"
                    + (f": {ex['detail']}" if ex["detail"] else "")))
    return out


def _tap_description(text: str) -> str:
    # TAP: a description may not contain "#" (it would start a directive) or a newline.
    return terminal_safe(text).replace("\n", "\\n").replace("#", "\\#")


def _tap_comments(text: str) -> list[str]:
    return ["# " + terminal_safe(line) for line in text.splitlines() or [""]]


def tap(r: dict) -> str:
    """Strict TAP 13 for the run (kselftest's ``# Totals:`` line at the end).

    Every line is the header, the plan, a test line or a ``#`` comment: the
    guest's own comment lines follow the results (a guest's ``# Totals:`` is
    renamed, so the last line is the only one).
    """
    results = cases(r)
    lines = ["TAP version 13", f"1..{len(results)}"]
    counts = {"pass": 0, "fail": 0, "xfail": 0, "xpass": 0, "skip": 0}
    for i, c in enumerate(results, 1):
        line = f"{'ok' if c.ok else 'not ok'} {i} - {_tap_description(c.name)}"
        if c.skip is not None:
            line += f" # SKIP {_tap_description(c.skip)}"
            counts["skip"] += 1
        elif c.todo is not None:
            line += f" # TODO {_tap_description(c.todo)}"
            counts["xpass" if c.ok else "xfail"] += 1
        else:
            counts["pass" if c.ok else "fail"] += 1
        lines.append(line)
        if c.failed and c.detail:
            lines += _tap_comments(c.detail)
    for text in r["console"].splitlines():
        if text.startswith("#"):
            text = text[1:].lstrip(" ")
            if text.startswith("Totals:"):
                text = "guest " + text
            lines += _tap_comments(text)
    lines.append(f"# Totals: pass:{counts['pass']} fail:{counts['fail']} "
                 f"xfail:{counts['xfail']} xpass:{counts['xpass']} skip:{counts['skip']} "
                 "error:0")
    return "\n".join(lines)


def junit(r: dict, suite: str = "kvmfilter.conformance") -> bytes:
    """JUnit XML (one testsuite) for GitHub Actions, GitLab and Jenkins.

    A SKIP, and a TODO that failed, are ``<skipped>``; guest text is escaped as
    for a terminal, and what XML 1.0 cannot carry at all is escaped too.
    """
    import xml.etree.ElementTree as ET

    results = cases(r)
    failures = sum(1 for c in results if c.failed)
    skipped = sum(1 for c in results if c.skip is not None or (c.todo is not None and not c.ok))
    root = ET.Element("testsuites", name="kvmfilter", tests=str(len(results)),
                      failures=str(failures), errors="0", skipped=str(skipped),
                      time=f"{r['elapsed_s']:.6f}")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(results)),
                       failures=str(failures), errors="0", skipped=str(skipped),
                       time=f"{r['elapsed_s']:.6f}")
    for c in results:
        tc = ET.SubElement(ts, "testcase", classname=suite, name=_xml_safe(c.name))
        if c.skip is not None:
            ET.SubElement(tc, "skipped", message=_xml_safe(c.skip))
        elif c.todo is not None and not c.ok:
            ET.SubElement(tc, "skipped", message=_xml_safe(f"TODO: {c.todo}"))
        elif c.failed:
            failure = ET.SubElement(tc, "failure", message=_xml_safe(c.detail or "failed"))
            failure.text = _xml_safe(c.detail)
    out = ET.SubElement(ts, "system-out")
    out.text = _xml_safe(r["console"])
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8")


_XML_INVALID = "[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]"


def _xml_safe(text: str) -> str:
    """Terminal-safe (as the console is everywhere), and nothing XML 1.0 cannot
    carry even escaped (lone surrogates included)."""
    return re.sub(_XML_INVALID, lambda m: _escape(m.group()), terminal_safe(text))
