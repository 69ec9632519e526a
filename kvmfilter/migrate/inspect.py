"""`kvmfilter inspect`: what a snapshot holds, every checksum verified.

Reads the whole stream (no KVM needed) and summarises it: the header, the
configuration, the sections by kind, the pages, each vCPU's mode and RIP,
the readiness record and the page map.  Any damage raises ``StreamError``
naming the section, like a restore would.
"""
from __future__ import annotations

from ..kvm.vcpu_state import describe
from ..policy.readiness import rfc3339
from . import stream
from .destination import _parse_vcpu
from .transport import open_snapshot


def inspect_file(path: str) -> dict:
    with open_snapshot(path) as f:
        reader = stream.Reader(f)
        return summarize(reader, path)


def summarize(reader: stream.Reader, path: str) -> dict:
    version = reader.header()
    sections: dict[str, dict] = {}
    conf = kvmf = None
    memory = 0
    nvcpus = 0
    vcpus: dict = {}
    pages = zero_pages = 0
    ranges = []
    for tag, payload in reader.sections():
        name = stream.NAMES.get(tag, tag.decode("ascii", "replace"))
        entry = sections.setdefault(name, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += len(payload) + stream.SECTION.size + stream.CRC.size
        if tag == stream.CONF:
            conf = stream.parse_json(tag, payload)
            memory = int(conf.get("vm", {}).get("memory", 0))
            nvcpus = int(conf.get("vm", {}).get("vcpus", 0))
        elif conf is None:
            raise stream.StreamError("the configuration must come first", tag, reader.offset)
        elif tag == stream.RAM:
            gpa, data = stream.parse_ram(payload, memory)
            n = len(data) // stream.PAGE
            pages += n
            _add_range(ranges, gpa, n)
        elif tag == stream.ZERO:
            for gpa, n in stream.parse_zero(payload, memory):
                zero_pages += n
        elif tag == stream.VCPU:
            index, cpu = _parse_vcpu(payload, nvcpus, vcpus)
            vcpus[index] = {"index": index, **describe(cpu.blobs),
                            "msrs": len(cpu.msrs), "parts": sorted(cpu.blobs)}
        elif tag == stream.KVMF:
            kvmf = stream.parse_json(tag, payload)
    if conf is None:
        raise stream.StreamError("the stream has no configuration", stream.END)
    return {
        "path": path,
        "format": {"magic": stream.MAGIC.hex(), "version": version,
                   "sections": reader.sections_read, "bytes": reader.offset,
                   "checksums": "verified"},
        "config": {k: v for k, v in conf.items() if k != "cpuid"}
        | {"cpuid_entries": len(conf.get("cpuid", []))},
        "sections": sections,
        "ram": {"pages": pages, "bytes": pages * stream.PAGE, "zero_pages": zero_pages,
                "ranges": [[a, b] for a, b in ranges[:64]], "ranges_total": len(ranges)},
        "vcpus": [vcpus[i] for i in sorted(vcpus)],
        "readiness": _readiness(kvmf),
        "page_map": (kvmf or {}).get("page_map"),
        "power_button": (kvmf or {}).get("power_button"),
        "run": (kvmf or {}).get("run"),
    }


def _add_range(ranges: list, gpa: int, n: int) -> None:
    end = gpa + n * stream.PAGE
    if ranges and ranges[-1][1] == gpa:
        ranges[-1][1] = end
    else:
        ranges.append([gpa, end])


def _readiness(kvmf) -> dict | None:
    if not kvmf:
        return None
    c = kvmf.get("control", {})
    history = c.get("history", [])
    return {"advertised": c.get("advertised"), "value": c.get("value"),
            "ready": bool(c.get("advertised")) and bool(c.get("value")),
            "initial_value": c.get("initial_value"),
            "since": rfc3339(c["since"]) if "since" in c else None,
            "accesses_total": c.get("accesses_total"),
            "transitions_total": c.get("transitions_total"),
            "transitions": [{"vcpu": v, "from": o, "to": n, "time": rfc3339(t)}
                            for v, o, n, t in history]}
