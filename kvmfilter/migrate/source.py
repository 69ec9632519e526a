"""The migration job on the source: gate, pre-copy rounds, stop and copy, commit.

    setup    connect (or create the file), send the configuration (and on a
             socket SYNC, which the destination answers once it has taken it)
    active   round 1: every page ever written; then KVM_GET_DIRTY_LOG rounds
             while the guest runs, until the rest fits the downtime limit (or
             MAX_ROUNDS passed: stop anyway, and say so); then read SYNC's
             answer: a destination that refused the VM never costs it a stop
    stop     park every vCPU (the access in flight completes), check the gate
             again under the policy lock, send the vCPU state, the clock and
             kvmfilter's own state, then the last dirty pages, END
    commit   (sockets) wait for the destination's READY, send COMMIT: from
             then on the guest belongs to the destination - the source is
             `postmigrate` and never runs it again (``downtime`` ends here,
             as QEMU's does at the source's completion); the destination says
             STARTED when its vCPUs run (``x-downtime-to-started``)

A ``file:`` URI is a snapshot: the guest is stopped first and every written
page goes to the file once (no pre-copy: a file gains nothing from it);
afterwards the source is `postmigrate` and ``cont`` may resume it.

Failure at any point before COMMIT - the destination unreachable, gone,
refusing the stream, a stall, ``migrate_cancel``, the guest revoking READY -
resumes the source unchanged (unless it was paused before) and leaves the
status ``failed`` or ``cancelled`` with the reason.  The job owns the VM while
it runs: the daemon refuses stop/cont meanwhile.
"""
from __future__ import annotations

import json
import logging
import mmap
import threading
import time
from typing import Callable, Optional

from ..base import KvmfilterError
from ..kvm.bitmap import or_into
from ..vm import state as vm_state
from ..vm.machine import RunState
from . import precopy, priority, stream
from .progress import Counting, Parameters, Stats
from .transport import SnapshotFile, Uri, connect
from .worker import Worker

log = logging.getLogger("kvmfilter.migrate")

PAGE = stream.PAGE
ZERO_PAGE = bytes(PAGE)
ZERO_RUNS_PER_SECTION = 65536
# Small sections and a small send buffer keep both sides busy at once: the
# destination checks and loads one 128 KiB section while the source reads the
# next (with 1 MiB of each it waited for the whole last round: +0.5-1 ms stopped).
# The buffer gathers the small writes (headers, checksums, JSON); being smaller
# than a section, it lets the pages go to the socket without a second copy.
SEND_CHUNK_PAGES = 32
SEND_BUFFER = 1 << 16


class MigrationError(KvmfilterError):
    """A migration failed; the message names the phase and the reason."""


class Cancelled(MigrationError):
    pass


class MigrationJob:
    """Moves (or saves) one VM; ``start()`` returns at once, the work is a thread.

    Args:
        vmm: the running (or paused) ``Vmm``.
        uri: where to: ``file:``, ``unix:`` or ``tcp:``.
        params: ``Parameters``.
        on_event: ``on_event(name, data)`` for MIGRATION, MIGRATION_PASS, and
            STOP / RESUME (QEMU's events when the job stops the guest and a
            failed job resumes it), from the job's thread.
    """

    def __init__(self, vmm, uri: Uri, params: Parameters,
                 on_event: Callable[[str, Optional[dict]], None] = lambda name, data: None):
        self.vmm = vmm
        self.uri = uri
        self.params = params
        self.on_event = on_event
        self.stats = Stats(vmm.options.memory)
        self.moved = False  # committed: the guest runs elsewhere now
        self._cancel = threading.Event()
        self._abort: Optional[str] = None  # set by a revoking vCPU
        self._paused_by_us = False
        self._sock = self._inp = None  # a socket's, and its return path
        self._pending = bytearray()  # pages pre-copy left dirty, for the stop
        self._pages = _page_buffer(SEND_CHUNK_PAGES * PAGE)  # _send_pages' copy of a run
        self._phase_start = 0.0  # where the current downtime phase began
        self._was_paused = False
        self.done = threading.Event()

    # -- control ---------------------------------------------------------------------

    def start(self, worker: Optional[Worker] = None) -> None:
        """Begin, on ``worker``'s thread (started ahead: worker.py says why)
        or else on a thread of the job's own."""
        if worker is not None:
            worker.submit(self._main)
        else:
            threading.Thread(target=self._main, name="migration", daemon=True).start()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def active(self) -> bool:
        return not self.done.is_set()

    def _status(self, status: str) -> None:
        self.stats.status = status
        self.on_event("MIGRATION", {"status": status})

    def _check(self) -> None:
        """Between any two steps: cancelled, or the guest took READY back?"""
        self.vmm.control.sync()  # changes the fast path applied reach the listener
        if self._cancel.is_set():
            raise Cancelled("cancelled by migrate_cancel")
        if self._abort:
            raise MigrationError(self._abort)

    def _on_transition(self, t) -> None:
        # A vCPU thread, under the policy's lock: the guest changed its mind.
        if not t.new:
            self._abort = (f"vCPU {t.vcpu} revoked migration readiness "
                           f"(wrote 0 to MSR_KVM_MIGRATION_CONTROL) during pre-copy")

    # -- the job ---------------------------------------------------------------------

    def _main(self) -> None:
        with priority.raised():  # ahead of the guest's vCPUs (this thread starts none)
            self._move()

    def _move(self) -> None:
        vmm = self.vmm
        vmm.control.add_listener(self._on_transition)
        out = None
        try:
            self._status("setup")
            self._was_paused = vmm.status is not RunState.RUNNING
            out, sock = self._open()
            writer = stream.Writer(Counting(out, self.stats, self.params.max_bandwidth))
            writer.header()
            writer.json(stream.CONF, vm_state.config(vmm))
            if sock is not None:
                writer.section(stream.SYNC, stream.u32(0))
            out.flush()  # the destination builds the VM while round 1 is read
            self.stats.setup_time = time.monotonic() - self.stats.started
            self._status("active")
            if self.uri.scheme != "file":
                self._precopy(writer)
                self._configuration_taken()
            self._stop_and_copy(writer)
            out.flush()
            self._phase("flush")
            if sock is None:
                out.commit()
                out = None
                self._finish_snapshot()
            else:
                self._commit(sock)
            if self.stats.total_time is None:  # a snapshot: it ends here
                self.stats.total_time = time.monotonic() - self.stats.started
            self._status("completed")
        except Exception as exc:  # every failure: resume, say why
            self._fail(exc, out)
        finally:
            vmm.control.remove_listener(self._on_transition)
            self.done.set()

    def _open(self):
        """(the sink, the socket or None) for the URI."""
        if self.uri.scheme == "file":
            return SnapshotFile(self.uri.path), None
        try:
            sock = connect(self.uri, self.params.stall_timeout / 1000)
        except OSError as exc:
            raise MigrationError(f"setup: cannot connect to {self.uri}: "
                                 f"{exc.strerror or exc}") from None
        self._sock = sock
        self._inp = sock.makefile("rb", buffering=0)  # the return path: exact reads
        return sock.makefile("wb", buffering=SEND_BUFFER), sock

    def _precopy(self, writer: stream.Writer) -> None:
        vmm, stats, params = self.vmm, self.stats, self.params
        bitmap = vmm.ram.written()  # round 1: every page the guest ever wrote
        while True:
            self._check()
            stats.rounds += 1
            stats.dirty_sync_count += 1
            writer.section(stream.PASS, stream.u32(stats.rounds))
            self.on_event("MIGRATION_PASS", {"pass": stats.rounds})
            started, sent = time.monotonic(), stats.transferred
            self._send_pages(writer, bitmap)
            elapsed = time.monotonic() - started
            if elapsed > 0 and stats.transferred > sent:
                stats.mbps = (stats.transferred - sent) * 8 / elapsed / 1e6
            bitmap = vmm.ram.harvest()
            dirty = precopy.count(bitmap) * PAGE
            stats.remaining = dirty
            estimate = precopy.next_step(dirty, stats.mbps * 1e6 / 8, params.downtime_limit,
                                         stats.rounds, params.max_rounds)
            stats.expected_downtime = estimate.expected_downtime_ms
            if estimate.decision is not precopy.Decision.ANOTHER_ROUND:
                stats.precopy = ("converged" if estimate.decision is
                                 precopy.Decision.STOP_AND_COPY else "gave-up")
                if stats.precopy == "gave-up":
                    log.warning("precopy_gave_up", extra={"rounds": stats.rounds,
                                                          "remaining": dirty})
                self._pending = bytearray(bitmap)  # a copy now, not in the downtime
                return

    def _configuration_taken(self) -> None:
        """The answer to the SYNC sent after the configuration: the destination
        built (or adopted) the VM - else it said why not - before the guest is
        stopped.  It has usually arrived during round 1.

        Only the configuration is waited for, not the pre-copy backlog: waiting
        for that as well (SYNC after the last round) kept a 1 MiB guest's move
        1 ms longer, and its stop no shorter, on a 2-core host.
        """
        tag, payload = self._answer(self._inp, "pre-copy: waiting for the destination "
                                               "to take the configuration")
        if tag == stream.FAILED:
            raise MigrationError("the destination refused the stream: " + _text(payload))
        if tag != stream.SYNCED or payload != stream.u32(0):
            raise MigrationError(f"pre-copy: unexpected {tag!r} from the destination")

    def _phase(self, name: str, now: Optional[float] = None) -> None:
        """Close the downtime phase ``name`` (x-downtime-phases, in ms), now or
        at ``now``."""
        if now is None:
            now = time.monotonic()
        self.stats.stop_phases[name] = now - self._phase_start
        self._phase_start = now

    def _stop_and_copy(self, writer: stream.Writer) -> None:
        vmm, stats = self.vmm, self.stats
        self._check()
        stats.stop_at = self._phase_start = time.monotonic()
        if not vmm.pause(state=RunState.FINISH_MIGRATE):
            raise MigrationError("stop: the vCPUs did not park in time; the guest runs on")
        self._paused_by_us = True
        self.on_event("STOP", None)  # as QEMU: once every vCPU is paused
        self._phase("pause")
        writer.json(stream.STOP, {"time": time.time()})
        with vmm.control.lock:  # no access can change readiness while we decide
            blockers = vmm.blocked_reasons()
        if blockers:
            raise MigrationError("stop: the guest may not be moved any more: "
                                 + " ".join(blockers))
        self._check()
        if self.uri.scheme == "file":
            bitmap = vmm.ram.written()
        else:
            bitmap = self._pending
            or_into(bitmap, vmm.ram.harvest())
            stats.dirty_sync_count += 1
        self._phase("dirty-log")
        # The state before the last pages: the destination loads it into KVM
        # while the pages are still on their way (0.5 ms that otherwise came
        # after END, with the guest stopped).
        state = vm_state.capture(vmm)
        for index, cpu in enumerate(state.vcpus):
            names = list(cpu.blobs)
            meta = {"msrs": cpu.msrs, "blobs": [[n, len(cpu.blobs[n])] for n in names]}
            writer.section(stream.VCPU, stream.vcpu_payload(
                index, meta, [cpu.blobs[n] for n in names]))
        writer.section(stream.CLCK, state.clock)
        writer.json(stream.KVMF, vm_state.kvmfilter_state(vmm))
        if self.uri.scheme != "file":
            writer.out.flush()
        self._phase("state")
        self._send_pages(writer, bitmap)
        writer.end()
        stats.remaining = 0
        self._phase("pages")

    def _send_pages(self, writer: stream.Writer, bitmap: bytes) -> None:
        """Every page set in ``bitmap``: zero pages as runs, the rest with data.

        Each run of pages is copied once, into a buffer reused for the whole
        job (a fresh 128 KiB object per section cost page faults: 0.3 ms per
        512 KiB here), and written from there.
        """
        ram, stats = self.vmm.ram, self.stats
        view = self._pages
        zero_runs: list[tuple[int, int]] = []
        for first, n in precopy.chunked(precopy.runs(bitmap), SEND_CHUNK_PAGES):
            self._check()
            base = first * PAGE
            ram.read_into(base, view[:n * PAGE])
            i = 0
            while i < n:
                zero = view[i * PAGE:(i + 1) * PAGE] == ZERO_PAGE
                j = i + 1
                while j < n and (view[j * PAGE:(j + 1) * PAGE] == ZERO_PAGE) == zero:
                    j += 1
                if zero:
                    zero_runs.append((base + i * PAGE, j - i))
                    stats.duplicate += j - i
                    if len(zero_runs) == ZERO_RUNS_PER_SECTION:
                        writer.section(stream.ZERO, stream.zero_payload(zero_runs))
                        zero_runs = []
                else:
                    writer.section(stream.RAM, stream.ram_head(base + i * PAGE),
                                   view[i * PAGE:j * PAGE])
                    stats.normal += j - i
                i = j
        if zero_runs:
            writer.section(stream.ZERO, stream.zero_payload(zero_runs))

    def _finish_snapshot(self) -> None:
        """A file: the state is saved; the VM stays parked (``cont`` resumes it)."""
        self.stats.downtime = time.monotonic() - self.stats.stop_at
        self.vmm.set_state(RunState.POSTMIGRATE)

    def _commit(self, sock) -> None:
        """READY from the destination, then COMMIT: the point of no return."""
        # After END the destination only loads the vCPU state (the RAM is in
        # already): silence beyond the stall timeout is a stall here too.
        sock.settimeout(self.params.stall_timeout / 1000)
        inp = self._inp
        tag, payload = self._answer(inp, "commit: waiting for the destination to load "
                                         "the state")
        if tag == stream.FAILED:
            raise MigrationError("the destination refused the stream: "
                                 + _text(payload))
        if tag != stream.READY:
            raise MigrationError(f"commit: unexpected {tag!r} from the destination")
        self._check()
        # The point of no return: once COMMIT is sent the guest belongs to the
        # destination. QEMU's downtime ends at the source's completion; so does
        # ours (and ours already includes the destination loading everything).
        # Taken before the send: the destination, woken by it, may take this
        # thread's core for a millisecond before the send returns - its guest
        # already running, which the downtime must not count.
        committed = time.monotonic()
        try:
            sock.sendall(stream.frame(stream.COMMIT))
        except OSError as exc:
            raise MigrationError(f"commit: cannot send COMMIT: {exc.strerror or exc}") \
                from None
        self.stats.downtime = committed - self.stats.stop_at
        self.stats.total_time = committed - self.stats.started  # as QEMU's: the source's part ends
        self._phase("destination-load", committed)
        self.moved = True
        self.vmm.set_state(RunState.POSTMIGRATE)
        try:
            tag, _ = self._answer(inp, "started")
        except MigrationError as exc:
            log.warning("migration_no_started_message", extra={"error": str(exc)})
        else:
            self.stats.downtime_to_started = time.monotonic() - self.stats.stop_at
            self._phase("destination-start")
        sock.close()

    def _answer(self, inp, phase: str):
        try:
            return stream.read_frame(inp)
        except (OSError, EOFError, stream.StreamError) as exc:
            reason = (f"the destination stalled for {self.params.stall_timeout / 1000:g} s"
                      if "timed out" in str(exc) else str(exc) or type(exc).__name__)
            raise MigrationError(f"{phase}: {reason}") from None

    def _fail(self, exc: Exception, out) -> None:
        vmm, stats = self.vmm, self.stats
        if isinstance(exc, MigrationError):
            reason = str(exc)
        elif isinstance(exc, OSError):
            stalled = "timed out" in str(exc)
            refused = None if stalled else self._refusal()
            reason = (f"the destination refused the stream: {refused}" if refused else
                      f"the stream to {self.uri} stalled for "
                      f"{self.params.stall_timeout / 1000:g} s" if stalled else
                      f"the stream to {self.uri} broke: {exc.strerror or exc}")
        else:
            reason = f"{type(exc).__name__}: {exc}"
            log.exception("migration_failed")
        stats.error = reason
        if out is not None:
            _discard(out)
        if not self.moved:
            self._abandon_destination()
            if self._paused_by_us:
                if self._was_paused:
                    vmm.set_state(RunState.PAUSED)
                else:
                    vmm.resume()
                    self.on_event("RESUME", None)
        stats.total_time = time.monotonic() - stats.started
        log.warning("migration_failed", extra={"uri": str(self.uri), "error": reason})
        self._status("cancelled" if isinstance(exc, Cancelled) else "failed")

    def _refusal(self) -> Optional[str]:
        """Why the destination refused the stream, if it said so before it hung
        up (a destination that refuses the configuration closes while round 1
        is still being written: the write fails, its NAK! waits to be read)."""
        if self._sock is None:
            return None
        try:
            self._sock.settimeout(0.5)
            tag, payload = stream.read_frame(self._inp)
        except (OSError, EOFError, stream.StreamError):
            return None
        return _text(payload) if tag == stream.FAILED else None

    def _abandon_destination(self) -> None:
        sock = self._sock
        if sock is not None:
            try:
                sock.settimeout(1.0)
                sock.sendall(stream.frame(stream.ABORT))
            except OSError:
                pass
            sock.close()


def _page_buffer(size: int) -> memoryview:
    """Memory to copy pages into, faulted in by one mmap: ``bytearray(size)``
    zero-filled it page by page first (fresh memory costs 4-6 us a page to
    fault in on these hosts; 32 pages were 0.2-0.4 ms of the setup)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return memoryview(mmap.mmap(-1, size, flags=flags))


def _text(payload: bytes) -> str:
    try:
        return str(json.loads(payload).get("error", ""))[:1000]
    except (ValueError, AttributeError):
        return payload[:200].decode("utf-8", "replace")


def _discard(out) -> None:
    if isinstance(out, SnapshotFile):
        out.abort()
    else:
        try:
            out.close()
        except OSError:
            pass
