"""L5: the run report rendered for people and for CI - text, strict TAP, JUnit XML.

The report itself is a dict (docs/contracts.md); nothing here changes it.
Guest console text is escaped for a terminal: a guest must not be able to
set the window title, move the cursor or draw a fake "result: ok".
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET

# C0 controls except tab and newline, DEL, and C1 controls.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")

# The CLI's hints for the gate's reasons, naming its own options.
GATE_HINTS = {
    "migration-control-not-offered": "start the VM without --no-migration-control",
    "page-encryption-status-unreportable": "without --no-map-gpa-range, on a host whose "
                                           "KVM delivers the hypercall exit (kvmfilter "
                                           "probe: exit_hypercall); or --plain-memory for "
                                           "a guest without encrypted memory",
}


def terminal_safe(text: str) -> str:
    """``text`` with control characters shown as ``\\xNN`` (newlines and tabs kept)."""
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


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

_TAP_RESULT = re.compile(r"^(ok|not ok)\b\s*(\d+)?\s*(?:-\s*)?(.*?)\s*(?:#\s*(SKIP|TODO)\b\s*(.*))?$",
                         re.IGNORECASE)


class Case:
    """One test case: the guest's TAP results, the host's checks, the run itself."""

    def __init__(self, name: str, ok: bool, skip: str | None = None, detail: str = ""):
        self.name, self.ok, self.skip, self.detail = name, ok, skip, detail


def cases(r: dict) -> list[Case]:
    """Every result in the report, in order: guest TAP lines, host checks, the exit."""
    out = []
    for line in r["console"].splitlines():
        m = _TAP_RESULT.match(line.strip())
        if m:
            status, _, name, directive, reason = m.groups()
            skip = reason or "skipped" if directive and directive.upper() == "SKIP" else None
            out.append(Case(f"guest: {name or 'unnamed'}", status == "ok", skip))
    for c in r["checks"]:
        out.append(Case(f"host: {c['name']}", c["ok"],
                        detail=f"guest {c['guest']}, host {c['host']}"))
    ex = r["exit"]
    clean = ex["reason"] == "hlt" or (ex["reason"] == "debug_exit" and ex["code"] == 0)
    out.append(Case("the guest stopped cleanly (HLT, or debug exit 0)", clean,
                    detail=f"{ex['reason']} (code {ex['code']})"
                    + (f": {ex['detail']}" if ex["detail"] else "")))
    return out


def tap(r: dict) -> str:
    """Strict TAP 13 for the run (kselftest's ``# Totals:`` line at the end)."""
    results = cases(r)
    lines = ["TAP version 13", f"1..{len(results)}"]
    counts = {"pass": 0, "fail": 0, "skip": 0}
    for i, c in enumerate(results, 1):
        line = f"{'ok' if c.ok else 'not ok'} {i} - {terminal_safe(c.name)}"
        if c.skip:
            line += f" # SKIP {terminal_safe(c.skip)}"
            counts["skip"] += 1
        else:
            counts["pass" if c.ok else "fail"] += 1
        lines.append(line)
        if not c.ok and c.detail:
            lines.append(f"# {terminal_safe(c.detail)}")
    for text in r["console"].splitlines():
        if text.startswith("#"):
            lines.append(terminal_safe(text))
    lines.append(f"# Totals: pass:{counts['pass']} fail:{counts['fail']} xfail:0 xpass:0 "
                 f"skip:{counts['skip']} error:0")
    return "\n".join(lines)


def junit(r: dict, suite: str = "kvmfilter.conformance") -> bytes:
    """JUnit XML (one testsuite) for GitHub Actions, GitLab and Jenkins."""
    results = cases(r)
    failures = sum(1 for c in results if not c.ok and not c.skip)
    skipped = sum(1 for c in results if c.skip)
    root = ET.Element("testsuites")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(results)),
                       failures=str(failures), errors="0", skipped=str(skipped),
                       time=f"{r['elapsed_s']:.6f}")
    for c in results:
        tc = ET.SubElement(ts, "testcase", classname=suite, name=_xml_safe(c.name))
        if c.skip:
            ET.SubElement(tc, "skipped", message=_xml_safe(c.skip))
        elif not c.ok:
            failure = ET.SubElement(tc, "failure", message=_xml_safe(c.detail or "failed"))
            failure.text = _xml_safe(c.detail)
    out = ET.SubElement(ts, "system-out")
    out.text = _xml_safe(r["console"])
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8")


_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_safe(text: str) -> str:
    """XML 1.0 cannot carry most control characters, even escaped."""
    return _XML_INVALID.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
