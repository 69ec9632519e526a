"""L4: the run report (docs/contracts.md, "The run report") and its self-checks."""
from __future__ import annotations

import re

from ..kvm import abi
from .dispatch import StopReason


def build_report(vmm, result) -> dict:
    """The report of ``vmm``'s run ``result``; fields are only ever added."""
    migration = vmm.control.snapshot()
    migration["blocked_reasons"] = vmm.blocked_reasons()
    page_map = vmm.page_map.snapshot()
    page_map["hypercall_exit"] = vmm.machine.hypercall_exits.get(
        abi.KVM_HC_MAP_GPA_RANGE, "disabled (--no-map-gpa-range)")
    report = {
        "image": vmm.label,
        "vcpus": vmm.options.vcpus,
        "exit": result.exit.to_json(),
        "console": result.console,
        "migration": migration,
        "page_map": page_map,
        "exits": dict(sorted(result.exits.items())),
        "unhandled_ports": {f"{p:#x}": n for p, n in result.unhandled_ports.items()},
        "elapsed_s": round(result.elapsed_s, 6),
    }
    if result.console_dropped:
        report["console_dropped"] = result.console_dropped
    report["checks"] = self_checks(report)
    report["ok"] = run_ok(report)
    return report


_GUEST_GP = re.compile(r"^# guest saw (\d+) #GP$", re.MULTILINE)


def self_checks(report: dict) -> list[dict]:
    """Host-side cross-checks of what the guest said against what the host saw."""
    checks = []
    m = _GUEST_GP.search(report["console"])
    if m:
        guest = int(m.group(1))
        host = report["migration"]["verdicts"]["gp"]
        checks.append({"name": "guest #GP count equals the host's gp verdicts",
                       "guest": guest, "host": host, "ok": guest == host})
    return checks


def run_ok(report: dict) -> bool:
    """Contract: success is a HLT or a debug exit with code 0, and every check ok."""
    ex = report["exit"]
    clean = ex["reason"] == StopReason.HLT or (ex["reason"] == StopReason.DEBUG_EXIT
                                               and ex["code"] == 0)
    return clean and all(c["ok"] for c in report["checks"])
