"""Moving a guest: live migration side by side with QEMU, memory-size scaling,
and snapshots.

Both VMMs run the same boot sector (``dirty_pages``: it dirties 128 pages in a
loop) and are driven the same way: ``kvmfilter serve`` and
``qemu-system-x86_64`` each as their own process, told over QMP to
``migrate`` to a fresh destination listening on a ``unix:`` socket, polled
with ``query-migrate``.  Rounds are chained - each destination is the next
round's source - and the two VMMs take turns (each first every other round),
so both see the same host.  The numbers are what each VMM reports in
``query-migrate``: ``total-time`` and ``downtime`` (QEMU's definition: from
stopping the guest to the source's completion).  kvmfilter's source
completes only after the destination has loaded everything and said READY,
so its downtime includes the destination's load; QEMU's does not.
``x-downtime-to-started`` adds the destination's start (kvmfilter only).  So
two more are measured the same way for both, on one host clock, from QMP
event timestamps: ``paused_ms`` (the source's STOP to the destination's
RESUME) and ``move_ms`` (``migrate`` sent to the destination's RESUME: how
long a move takes, both destinations' work in).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

from ..daemon.client import QmpClient, QmpClientError
from ..migrate.destination import restore_file
from ..migrate.progress import Parameters
from ..migrate.source import MigrationJob
from ..migrate.transport import parse_uri
from ..vm.image import bundled_guest
from ..vm.vmm import RunOptions, Vmm
from . import qemu
from .common import kvmfilter_command, migrate_over_qmp, paired, summarize

MIB, GIB = 1 << 20, 1 << 30
DOWNTIME_LIMIT_MS = 300  # QEMU's default, given to both
# A guest of up to 32 MiB moves in 5-15 ms here, and one move differs from the
# next by 2-3 ms: five rounds cannot tell 1 ms apart, and twenty often could
# not (the 1 MiB total time: UNRELIABLE in 1 run of 2, where 200 rounds
# resolved it).  Such rounds are short (about 0.6 s for both VMMs), so these
# sizes get this many times the rounds.
SMALL_GUEST = 32 * MIB
SMALL_GUEST_ROUNDS = 10


class KvmfilterGuest:
    """One ``kvmfilter serve`` process: the dirty_pages guest, or an incoming one."""

    def __init__(self, workdir: str, memory: int, incoming: bool = False):
        self.memory = memory
        self.dir = tempfile.mkdtemp(prefix="kvmf-", dir=workdir)
        self.socket = os.path.join(self.dir, "qmp.sock")
        self.incoming_path = os.path.join(self.dir, "in.sock")
        self.log = open(os.path.join(self.dir, "serve.log"), "w+")
        # The destination is told the VM's shape, as QEMU's is started with
        # the same -m: both build the VM before the source connects.
        what = ((["--incoming", f"unix:{self.incoming_path}"] if incoming else
                 ["bundled:dirty_pages"]) + ["--memory", str(memory), "--plain-memory"])
        self.proc = subprocess.Popen(kvmfilter_command() + ["--log-level", "warning", "serve", *what,
                                                     "--socket", self.socket],
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        self.qmp = None
        deadline = time.monotonic() + 30
        while self.qmp is None:
            if self.proc.poll() is not None:
                raise self._fail(f"exited with status {self.proc.returncode}")
            try:
                self.qmp = QmpClient(self.socket, timeout=30)
            except (OSError, QmpClientError):
                if time.monotonic() > deadline:
                    raise self._fail("did not answer QMP within 30 s") from None
                time.sleep(0.02)

    def _fail(self, why: str) -> RuntimeError:
        self.log.seek(0)
        tail = self.log.read()[-2000:].strip()
        return RuntimeError(f"kvmfilter serve {why}" + (f":\n{tail}" if tail else ""))

    def execute(self, command: str, arguments: dict | None = None):
        reply = self.qmp.execute(command, arguments)
        if "error" in reply:
            raise self._fail(f"{command}: {reply['error'].get('desc')}")
        return reply["return"]

    def wait_ready(self, timeout: float = 30) -> None:
        """Until the guest has written READY (it does so first thing)."""
        deadline = time.monotonic() + timeout
        while not self.execute("query-migration-readiness")["ready"]:
            if time.monotonic() > deadline:
                raise self._fail(f"guest not READY within {timeout:g} s")
            time.sleep(0.01)

    def close(self) -> None:
        if self.qmp is not None:
            try:
                self.qmp.execute("quit")
            except (OSError, QmpClientError, EOFError):
                pass  # already gone: the wait below covers it
            self.qmp.close()
            self.qmp = None
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def kvmfilter_migrate(source: KvmfilterGuest, workdir: str, timeout: float = 120) -> dict:
    """Live-migrate ``source`` to a new ``kvmfilter serve --incoming``; quit the
    source; the numbers and the running destination."""
    dest = KvmfilterGuest(workdir, source.memory, incoming=True)
    try:
        result = migrate_over_qmp(source.qmp, dest.qmp, f"unix:{dest.incoming_path}",
                                  {"downtime-limit": DOWNTIME_LIMIT_MS}, "kvmfilter",
                                  timeout, failed=source._fail)
    except BaseException:
        dest.close()
        raise
    source.close()
    return {**result, "destination": dest}


def _booted(vmm_kind: str, memory: int, workdir: str):
    if vmm_kind == "kvmfilter":
        guest = KvmfilterGuest(workdir, memory)
        try:
            guest.wait_ready()
        except BaseException:
            guest.close()
            raise
        return guest
    return qemu.QemuGuest(memory, workdir).start()


def _chain(vmm_kind: str, memory: int, rounds: int, workdir: str):
    """A generator of ``rounds`` migrations of one guest, each destination the
    next source; the last guest is closed when it ends (or is closed)."""
    migrate = kvmfilter_migrate if vmm_kind == "kvmfilter" else qemu.migrate
    guest = _booted(vmm_kind, memory, workdir)
    try:
        for _ in range(rounds):
            # The other VMM's guest is stopped meanwhile: on a 2-core host its
            # spinning vCPU would take the core the migration needs.
            _qmp(guest, "cont")
            time.sleep(0.05)  # let the guest dirty its pages again
            result = migrate(guest, workdir)
            guest = result.pop("destination")
            _qmp(guest, "stop")
            yield result
    finally:
        guest.close()


def _qmp(guest, command: str) -> None:
    reply = guest.qmp.execute(command)
    if "error" in reply:
        raise RuntimeError(f"{command}: {reply['error'].get('desc')}")


def _summary(results: list[dict]) -> dict:
    out = {}
    for key in ("downtime_ms", "total_ms", "paused_ms", "move_ms", "downtime_to_started_ms",
                "transferred_bytes"):
        values = [r[key] for r in results if r.get(key) is not None]
        if values:
            out[key] = summarize(values, key.rsplit("_", 1)[1])
    phases = [r["downtime_phases_ms"] for r in results if r.get("downtime_phases_ms")]
    if phases:  # kvmfilter's x-downtime-phases: where its downtime went
        out["downtime_phases_ms"] = {name: summarize([p.get(name, 0) for p in phases], "ms")
                                     for name in phases[0]}
    return out


def side_by_side(sizes: list[int], rounds: int, workdir: str) -> dict:
    """kvmfilter and QEMU, chained migrations interleaved round by round,
    each going first every other round (``SMALL_GUEST_ROUNDS`` times
    ``rounds`` for the small guests)."""
    qemu_missing = qemu.qemu_binary() is None
    out: dict = {}
    for memory in sizes:
        n = rounds * SMALL_GUEST_ROUNDS if memory <= SMALL_GUEST else rounds
        chains = {"kvmfilter": _chain("kvmfilter", memory, n, workdir)}
        if not qemu_missing:
            chains["qemu"] = _chain("qemu", memory, n, workdir)
        results: dict = {name: [] for name in chains}
        order = list(chains.items())
        try:
            for i in range(n):
                # A B, B A, ...: neither VMM always goes first after the other.
                for name, chain in (order if i % 2 == 0 else order[::-1]):
                    results[name].append(next(chain))
        finally:
            for chain in chains.values():
                chain.close()
        case = {name: _summary(r) for name, r in results.items()}
        if qemu_missing:
            case["qemu"] = {"missing": qemu.MISSING_HINT}
        else:
            for key, ratio in (("downtime_ms", "ratio_downtime"), ("total_ms", "ratio_total"),
                               ("paused_ms", "ratio_paused"), ("move_ms", "ratio_move")):
                # Both report whole milliseconds: 0 ms counts as 1.
                case[ratio] = (max(case["kvmfilter"][key]["median_ms"], 1)
                               / max(case["qemu"][key]["median_ms"], 1))
            # Round by round (the two VMMs' moves of a round ran back to back):
            # whether a ratio above 1 is a difference or this run's noise.
            case["paired"] = {key: paired([r[key] for r in results["kvmfilter"]],
                                          [r[key] for r in results["qemu"]])
                              for key in ("paused_ms", "total_ms")}
        out[_label(memory)] = case
    return out


def scaling(sizes: list[int], rounds: int, workdir: str) -> dict:
    """kvmfilter alone: total time and bytes for guests that touched the same
    few MiB, whatever their size."""
    out = {}
    for memory in sizes:
        chain = _chain("kvmfilter", memory, rounds, workdir)
        try:
            out[_label(memory)] = _summary(list(chain))
        finally:
            chain.close()
    return out


def snapshot(kvm, sizes: list[int], rounds: int, workdir: str) -> dict:
    """Save (``migrate file:``, the daemon's own job) and restore, in-process:
    time and file size for the dirty_pages guest of each size."""
    out = {}
    for memory in sizes:
        saves, restores, size = [], [], 0
        for _ in range(rounds):
            path = os.path.join(workdir, f"snap-{memory}.kvmf")
            with Vmm(None, RunOptions(memory=memory, plain_memory=True, timeout=None),
                     image=bundled_guest("dirty_pages"), label="<bench>") as vmm:
                vmm.start(kvm)
                _wait(lambda: vmm.control.sync() or vmm.control.ready, "READY")
                time.sleep(0.05)
                job = MigrationJob(vmm, parse_uri(f"file:{path}"), Parameters())
                job.start()
                job.done.wait(120)
                if job.stats.status != "completed":
                    raise RuntimeError(f"snapshot {job.stats.status}: {job.stats.error}")
                saves.append(job.stats.total_time * 1000)
                vmm.stop()
            size = os.path.getsize(path)
            started = time.monotonic()
            restored, _ = restore_file(kvm, path)
            with restored:
                restored.start(kvm)
                restores.append((time.monotonic() - started) * 1000)
                restored.stop()
            os.unlink(path)
        out[_label(memory)] = {"save_ms": summarize(saves, "ms"),
                               "restore_ms": summarize(restores, "ms"), "file_bytes": size}
    return out


def _wait(check, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not reached in {timeout:g} s")
        time.sleep(0.005)


def _label(memory: int) -> str:
    return f"{memory // GIB}G" if memory >= GIB else f"{memory // MIB}M"

