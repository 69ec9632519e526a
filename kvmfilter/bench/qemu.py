"""The QEMU side of the live-migration benchmark.

It boots the same guest kvmfilter migrates (guests/dirty_pages.bin: 128 pages
rewritten in a tight loop) in qemu-system-x86_64 under KVM, migrates it over a
Unix socket to a fresh QEMU on this host, and reports QEMU's own numbers from
``query-migrate``: total-time, downtime, setup-time (ms) and bytes sent.
A benchmark boots once and chains migrations (source -> destination, which
becomes the next source), because booting SeaBIOS here takes seconds.

Fairness (both sides get the same conditions):
- same guest, same memory size, one vCPU, KVM; RAM allocated lazily (no
  -mem-prealloc), as kvmfilter does;
- the same downtime-limit (QEMU's and kvmfilter's default are both 300 ms);
- max-bandwidth raised from QEMU's default 128 MiB/s (kvmfilter has no cap);
- QEMU's other defaults are kept: no xbzrle, compression, multifd or postcopy;
  zero pages are sent as a flag by both.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..daemon.client import QmpClient, QmpClientError
from .common import migrate_over_qmp

MISSING_HINT = ("qemu-system-x86_64 not found: apt-get install qemu-system-x86 "
                "(make bench installs it)")
GUEST = Path(__file__).resolve().parents[1] / "guests" / "dirty_pages.bin"
RUNNING = b"dirty_pages: running"
DISK_SIZE = 1 << 20        # the boot sector padded to a small raw IDE disk
UNCAPPED = 1 << 40         # bytes/s (1 TiB/s): more than any local socket moves
QMP_TIMEOUT = 10.0
# -cpu host fails here (kvm_pvm): "failed to set MSR 0x10a" (IA32_ARCH_CAPABILITIES)
# then an assertion.  Without that MSR it works; the default CPU (qemu64) is the
# last resort.  The first choice that boots is kept for later guests.
CPU_CHOICES = (["-cpu", "host"], ["-cpu", "host,-arch-capabilities"], [])
_cpu_index = 0


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def _size(memory: int) -> str:
    return f"{memory >> 20}M" if memory % (1 << 20) == 0 else f"{memory}B"


class QemuGuest:
    """One qemu-system-x86_64 running dirty_pages.bin; its files live in a
    private directory under ``workdir`` that close() removes."""

    def __init__(self, memory: int, workdir: str):
        if qemu_binary() is None:
            raise RuntimeError(MISSING_HINT)
        self.memory = memory
        os.makedirs(workdir, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="qemu-", dir=workdir)
        self.qmp_path = os.path.join(self.dir, "qmp.sock")
        self.incoming_path = os.path.join(self.dir, "incoming.sock")
        self.console = os.path.join(self.dir, "debugcon.log")
        self.errlog = os.path.join(self.dir, "stderr.log")
        self.disk = os.path.join(self.dir, "disk.img")
        if len(self.incoming_path) >= 108:  # sun_path
            raise RuntimeError(f"{workdir}: too long for a Unix socket path")
        self.cpu: list[str] | None = None
        self.proc: subprocess.Popen | None = None
        self.qmp: QmpClient | None = None
        self.boot_s: float | None = None

    def __enter__(self) -> "QemuGuest":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    def _launch(self, cpu: list[str], extra: list[str]) -> None:
        # Each guest its own copy of the disk: no image lock shared with a peer.
        with open(GUEST, "rb") as src, open(self.disk, "wb") as dst:
            dst.write(src.read())
            dst.truncate(DISK_SIZE)
        for path in (self.console, self.qmp_path):  # left by a failed attempt
            if os.path.exists(path):
                os.unlink(path)
        self.cpu = cpu
        # IDE disk, not floppy: SeaBIOS boots it in ~5 s here; a floppy did not
        # boot within 60 s.
        cmd = [qemu_binary(), "-accel", "kvm", *cpu, "-m", _size(self.memory), "-smp", "1",
               "-display", "none", "-no-reboot", "-nodefaults",
               "-drive", f"file={self.disk},format=raw,if=ide",
               "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
               "-debugcon", f"file:{self.console}",
               "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *extra]
        with open(self.errlog, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)

    def _fail(self, why: str, whose: str = "") -> RuntimeError:
        """The error to raise, with QEMU's stderr; the process is gone after it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # a wedged QEMU is not worth a polite quit
        err = Path(self.errlog).read_text(errors="replace").strip()[-2000:]
        self.close()
        return RuntimeError(f"QEMU {why}; {whose}stderr: {err or '(empty)'}")

    def _connect(self, deadline: float) -> None:
        while True:
            if self.proc.poll() is not None:
                raise self._fail(f"exited with status {self.proc.returncode}")
            try:
                self.qmp = QmpClient(self.qmp_path, QMP_TIMEOUT)
                return
            except (OSError, QmpClientError, EOFError):
                if time.monotonic() > deadline:
                    raise self._fail("QMP did not answer in time") from None
                time.sleep(0.02)

    def start(self, timeout: float = 60) -> "QemuGuest":
        """Boot and wait for "dirty_pages: running" on the debug console."""
        global _cpu_index
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            self._launch(CPU_CHOICES[_cpu_index], [])
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    with open(self.console, "rb") as f:
                        if RUNNING in f.read():
                            break
                except FileNotFoundError:
                    pass
                time.sleep(0.05)
            else:
                if self.proc.poll() is None:
                    raise self._fail(f"printed no {RUNNING.decode()!r} within {timeout:g} s")
                # An early exit (before any guest code ran) can be the CPU model.
                if _cpu_index + 1 < len(CPU_CHOICES) and time.monotonic() - t0 < 5:
                    self.proc.wait()
                    _cpu_index += 1
                    continue
                raise self._fail(f"exited with status {self.proc.returncode} while booting")
            break
        self.boot_s = time.monotonic() - t0
        self._connect(deadline)
        return self

    def status(self) -> str:
        return self.qmp.execute("query-status")["return"]["status"]

    def counter(self) -> int:
        """The guest's round counter (dword at 0x10000): it advances while it runs."""
        path = os.path.join(self.dir, "counter.bin")
        reply = self.qmp.execute("pmemsave", {"val": 0x10000, "size": 4, "filename": path})
        if "error" in reply:
            raise RuntimeError(f"pmemsave: {reply['error'].get('desc')}")
        with open(path, "rb") as f:
            return int.from_bytes(f.read(4), "little")

    def close(self) -> None:
        """QMP quit, kill after 5 s; then remove the files."""
        if self.qmp is not None:
            try:
                self.qmp.execute("quit")
            except (OSError, QmpClientError, EOFError):
                pass  # it may already be gone; the kill below covers the rest
            self.qmp.close()
            self.qmp = None
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


def migrate(source: QemuGuest, workdir: str, downtime_limit_ms: int | None = 300,
            timeout: float = 120, max_bandwidth: int | None = UNCAPPED) -> dict:
    """Live-migrate ``source`` to a new QEMU; quit the source; return the numbers
    and the running destination.  None for a limit keeps QEMU's default."""
    dest = QemuGuest(source.memory, workdir)
    try:
        # Same command line (and CPU model) plus -incoming.
        dest._launch(source.cpu, ["-incoming", f"unix:{dest.incoming_path}"])
        dest._connect(time.monotonic() + 30)
        params = {k: v for k, v in (("downtime-limit", downtime_limit_ms),
                                    ("max-bandwidth", max_bandwidth)) if v is not None}
        # The cause of a failure is often in the destination's log.
        result = migrate_over_qmp(source.qmp, dest.qmp, f"unix:{dest.incoming_path}", params,
                                  "QEMU", timeout,
                                  failed=lambda why: dest._fail(why, "destination "))
    except BaseException:
        dest.close()
        raise
    source.close()  # postmigrate: its RAM now lives in the destination
    return {**result, "destination": dest}


def selfcheck(memory: int = 32 << 20, rounds: int = 3, workdir: str = "/tmp/qemu-bench",
              **limits) -> list[dict]:
    """Boot once, chain ``rounds`` migrations; per round: the numbers, boot time
    and whether the guest's counter still advances on the destination."""
    results = []
    guest = QemuGuest(memory, workdir)
    try:
        guest.start()
        boot_s = guest.boot_s
        for i in range(rounds):
            result = migrate(guest, workdir, **limits)
            guest = result.pop("destination")
            before = guest.counter()
            time.sleep(0.05)
            result.update(round=i, boot_s=round(boot_s, 2),
                          counter_advances=guest.counter() > before)
            results.append(result)
    finally:
        guest.close()
    return results

