"""L5: the Prometheus textfile (node_exporter's textfile collector convention).

The file is replaced atomically: written to an unpredictable temporary file
created exclusively in the same directory (so a planted symlink or a file
another user holds open cannot stand in for it), made 0644 (node_exporter runs
as its own user), flushed to disk, then renamed over the target.

A directory that users other than its owner can write to is refused unless it
has the sticky bit: without it, another user could replace the live file
between two of our writes and publish a readiness the guest never announced.
"""
from __future__ import annotations

import os
import stat
import tempfile

from ..base import BadInput
from ..vm.machine import RunState

FILE_MODE = 0o644


class MetricsPathError(BadInput):
    """The metrics file cannot be kept safely where it was asked to be."""


def check_metrics_path(path: str) -> None:
    """Refuse a target that is not a regular file, or an unsafe directory."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise MetricsPathError(f"--metrics-file: {directory}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MetricsPathError(f"--metrics-file: {directory} is not a directory")
    if not os.access(directory, os.W_OK):
        raise MetricsPathError(f"--metrics-file: cannot write in {directory}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise MetricsPathError(
            f"--metrics-file: {directory} is writable by other users and not sticky, "
            "so they could replace the metrics file; use a directory only its owner "
            "can write to (Debian's node-exporter textfile directory is one)")
    try:
        target = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(target.st_mode):
        raise MetricsPathError(f"--metrics-file: {path} exists and is not a regular file")


def write_atomically(path: str, text: str, mode: int = FILE_MODE) -> None:
    """Replace ``path`` with ``text`` so no reader ever sees a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        os.fchmod(fd, mode)
        data = text.encode("utf-8")
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def metrics_text(vmm, version: str) -> str:
    """Every metric, labelled with the VM's name (exposition format 0.0.4)."""
    c = vmm.control
    vm = f'vm="{_label(vmm.options.name)}"'
    blocked = vmm.blocked_reasons()
    verdicts = c.verdicts
    status = vmm.status
    out = [
        ("kvmfilter_build_info", "gauge", "kvmfilter's version (always 1).",
         [(f'version="{_label(version)}"', 1)]),
        ("kvmfilter_migration_ready", "gauge", "1 when the guest has announced it is ready "
         "for live migration (MSR_KVM_MIGRATION_CONTROL bit 0).", [(vm, int(c.ready))]),
        ("kvmfilter_migration_blocked", "gauge", "1 when anything blocks live migration "
         "now (see blocked-reasons).", [(vm, int(bool(blocked)))]),
        ("kvmfilter_migration_control_value", "gauge",
         "The value of MSR_KVM_MIGRATION_CONTROL.", [(vm, c.value)]),
        ("kvmfilter_migration_last_transition_timestamp_seconds", "gauge",
         "When the readiness value last changed (or the VM started), in Unix time.",
         [(vm, f"{c.since:.6f}")]),
        ("kvmfilter_msr_accesses_total", "counter",
         "Guest accesses to MSR 0x4b564d08, by verdict.",
         [(f'{vm},verdict="{v}"', verdicts[v]) for v in ("ok", "gp")]),
        ("kvmfilter_migration_transitions_total", "counter",
         "Changes of the readiness value.", [(vm, c.transitions_total)]),
        ("kvmfilter_page_map_shared_bytes", "gauge",
         "Guest memory declared shared (decrypted).", [(vm, vmm.page_map.shared_bytes)]),
        ("kvmfilter_vm_state", "gauge", "The VM's run state (QEMU's names): 1 for the "
         "current state, 0 for the others.",
         [(f'{vm},state="{s}"', int(s is status)) for s in RunState]),
    ]
    lines = []
    for name, kind, help_text, samples in out:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines += [f"{name}{{{labels}}} {value}" for labels, value in samples]
    return "\n".join(lines) + "\n"
