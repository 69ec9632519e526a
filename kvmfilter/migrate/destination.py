"""The receiving side: a stream in, a VM out - ready to run, or nothing at all.

``receive(kvm, reader, ...)`` reads a whole stream and returns a ``Vmm`` with
its RAM, vCPU state, clock and kvmfilter state in place and no vCPU started.
The destination checks the stream as it reads: the configuration comes first
(the VM and its RAM are built from it), every length is bounded before
anything is allocated, every RAM write lands inside guest memory, each vCPU
arrives once, and the state is complete at END.  On any error the half-built
VM is closed: nothing is half-restored, and nothing ran.

``Incoming`` adds the network side for ``unix:`` and ``tcp:``: it accepts one
connection, receives, answers READY, and starts the guest only after the
source's COMMIT (the source never runs it again after that).
"""
from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from typing import Callable, Optional

from ..base import BadInput, KvmfilterError
from ..kvm.vcpu_state import STRUCTS, CpuState
from ..vm import state as vm_state
from . import priority, stream
from .transport import Uri, listen, open_snapshot, unlink_quietly

log = logging.getLogger("kvmfilter.migrate")

ACCEPT_TIMEOUT = None  # wait for the source as long as the operator lets us
READ_TIMEOUT = 30.0  # a source silent this long has stalled or died
# Less than a RAM section (32 pages): those are read past it, straight into
# guest memory; a bigger buffer is fresh memory to fault in (6 us a page here).
READ_BUFFER = 64 << 10
COMMIT_TIMEOUT = 30.0
STATE = (stream.VCPU, stream.CLCK, stream.KVMF)  # loaded into KVM once all have come


class IncomingError(KvmfilterError):
    """An incoming migration failed; no VM runs."""


def receive(kvm, reader: stream.Reader, origin: str, source: str,
            on_event: Callable[[str, Optional[dict]], None] = lambda name, data: None,
            on_sync: Callable[[bytes], None] = lambda number: None, prepared=None,
            **overrides):
    """Read a whole stream; the built ``Vmm`` (not started) and facts about it.

    ``on_sync(number)``: a SYNC section arrived (everything before it is in).
    ``prepared``: a VM ``vm_state.prepare`` built for the stream; it is used
    (or closed, whatever happens).

    Raises:
        StreamError: the stream is malformed (says which section and why).
        BadInput: its content does not fit (sizes, counts, states).
    """
    vmm = None
    vcpus: dict[int, CpuState] = {}
    once: dict = {}  # the CLCK payload and the parsed KVMF, each allowed once
    facts = {"pages": 0, "zero_pages": 0, "passes": 0, "source_stopped": None}
    try:
        reader.header()
        for tag, payload in reader.sections():
            if vmm is None:
                if tag != stream.CONF:
                    raise stream.StreamError("the configuration must come first", tag,
                                             reader.offset)
                conf = stream.parse_json(tag, payload)
                if prepared is not None:
                    vmm, prepared = vm_state.adopt(prepared, conf, **overrides), None
                else:
                    vmm = vm_state.build(kvm, conf, origin, source, **overrides)
                facts["config"] = conf
                reader.into_memory(vmm.options.memory, vmm.ram.to_fill)
                on_event("MIGRATION", {"status": "active"})
            elif tag == stream.RAM:  # read into guest memory already
                facts["pages"] += len(payload) // stream.PAGE
            elif tag == stream.ZERO:
                for gpa, n in stream.parse_zero(payload, vmm.options.memory):
                    vmm.ram.zero(gpa, n * stream.PAGE)
                    facts["zero_pages"] += n
            elif tag == stream.VCPU:
                index, cpu = _parse_vcpu(payload, vmm.options.vcpus, vcpus)
                vcpus[index] = cpu
            elif tag in (stream.CLCK, stream.KVMF):
                if tag in once:
                    raise stream.StreamError("repeated", tag, reader.offset)
                once[tag] = payload if tag == stream.CLCK else stream.parse_json(tag, payload)
            elif tag == stream.PASS:
                facts["passes"] = stream.parse_u32(tag, payload)
                on_event("MIGRATION_PASS", {"pass": facts["passes"]})
            elif tag == stream.SYNC:
                on_sync(payload)
            elif tag == stream.STOP:
                facts["source_stopped"] = float(stream.parse_json(tag, payload).get("time", 0))
            else:  # CONF again
                raise stream.StreamError("a second configuration", tag, reader.offset)
            if tag in STATE and len(vcpus) == vmm.options.vcpus and len(once) == 2:
                # Complete (it happens once: none may come again): into KVM
                # now, while any pages still arrive.
                _apply(vmm, vcpus, once[stream.CLCK], once[stream.KVMF])
        if vmm is None:
            raise stream.StreamError("the stream has no configuration", stream.END)
        missing = [name for name, value in (
            ("vCPU state", len(vcpus) == vmm.options.vcpus), ("clock", stream.CLCK in once),
            ("kvmfilter state", stream.KVMF in once)) if not value]
        if missing:
            raise stream.StreamError(f"the stream ended without {', '.join(missing)} "
                                     f"({len(vcpus)} of {vmm.options.vcpus} vCPUs)", stream.END)
        return vmm, facts
    except BaseException:
        for unused in (vmm, prepared):
            if unused is not None:
                unused.close()
        raise


def _apply(vmm, vcpus: dict, clock: bytes, kvmf: dict) -> None:
    try:
        vm_state.apply(vmm, vm_state.VmState([vcpus[i] for i in sorted(vcpus)], clock), kvmf)
    except ValueError as exc:
        raise BadInput(f"the vCPU state does not load: {exc}") from None


def _parse_vcpu(payload: bytes, nvcpus: int, seen: dict) -> tuple[int, CpuState]:
    index, meta, blob_bytes = stream.parse_vcpu(payload)
    if not 0 <= index < nvcpus or index in seen:
        raise stream.StreamError(f"vCPU {index}: out of range or repeated", stream.VCPU)
    try:
        blobs, offset = {}, 0
        for name, size in meta["blobs"]:
            if name not in STRUCTS or size < 0 or offset + size > len(blob_bytes):
                raise ValueError(f"blob {name!r} of {size} bytes")
            blobs[name] = bytes(blob_bytes[offset:offset + size])
            offset += size
        if offset != len(blob_bytes):
            raise ValueError("trailing bytes")
        msrs = [(int(i), int(v)) for i, v in meta["msrs"]]
        if any(not 0 <= i < 1 << 32 or not 0 <= v < 1 << 64 for i, v in msrs):
            raise ValueError("an MSR out of range")
    except (KeyError, TypeError, ValueError) as exc:
        raise stream.StreamError(f"vCPU {index}: {exc}", stream.VCPU) from None
    return index, CpuState(blobs, msrs)


def restore_file(kvm, path: str, prepare=None, **overrides):
    """A VM from a snapshot file (``file:PATH``); (vmm, facts), not started.
    ``prepare()``: builds the VM ``receive`` takes as ``prepared``, once the
    file has opened."""
    with open_snapshot(path) as f:
        return receive(kvm, stream.Reader(f), "restore", f"file:{path}",
                       prepared=prepare() if prepare else None, **overrides)


class Incoming:
    """One incoming migration over ``unix:`` or ``tcp:`` (or a ``file:``).

    ``run()`` blocks: listen, accept one source, receive, hand back READY,
    wait for COMMIT, start the guest, say STARTED; it returns the running
    ``Vmm``.  ``set_up()`` builds the VM ahead (or warms up) before ``run()``
    does it itself.  ``before_start(vmm)`` runs just before the guest's vCPUs
    start (a daemon hooks its event listener there).  ``close()`` from
    another thread abandons the wait.
    """

    def __init__(self, kvm, uri: Uri,
                 on_event: Callable[[str, Optional[dict]], None] = lambda name, data: None,
                 prepare: Optional[dict] = None, **overrides):
        self.kvm = kvm
        self.uri = uri
        self.prepare = prepare  # a VM shape to build before the source connects
        self.on_event = on_event
        self.before_start: Callable = lambda vmm: None
        self.overrides = overrides
        self.facts: dict = {}
        self.started_at: Optional[float] = None
        self._listener: Optional[socket.socket] = None
        self.downtime: Optional[float] = None
        self._set_up = False
        self._prepared = None  # built by set_up(), until run() takes it
        self._lock = threading.Lock()

    def listen(self) -> None:
        """Bind now (so the address is reserved before anyone connects)."""
        if self.uri.scheme != "file":
            self._listener = listen(self.uri)

    def run(self):
        self.on_event("MIGRATION", {"status": "setup"})
        if self.uri.scheme == "file":
            vmm, self.facts = restore_file(
                self.kvm, self.uri.path, self._prepare if self.prepare else None,
                **self.overrides)
            try:
                self.before_start(vmm)
                vmm.start(self.kvm)
            except BaseException:
                vmm.close()
                raise
            self.on_event("MIGRATION", {"status": "completed"})
            return vmm
        if self._listener is None:
            self.listen()
        self.set_up()
        with self._lock:
            prepared, self._prepared = self._prepared, None
        try:
            try:
                conn, peer = self._listener.accept()
            except OSError as exc:
                raise IncomingError(f"waiting for the source on {self.uri}: "
                                    f"{exc.strerror or exc}") from None
            finally:
                self._close_listener()
        except BaseException:
            if prepared is not None:
                prepared.close()
            raise
        # This thread runs raised (priority.py) only with a VM built ahead:
        # building one here starts its vCPU threads, which would inherit it.
        with conn, priority.raised() if prepared is not None else contextlib.nullcontext():
            conn.settimeout(READ_TIMEOUT)
            return self._receive(conn, peer, prepared)

    def set_up(self) -> None:
        """Take the build off the migration's clock, before anyone connects:
        build the VM when its shape was given, else warm up (a process's first
        VM costs ~1 ms more than later ones).  ``serve --incoming`` calls it
        before it answers QMP, so a destination that answers is ready, as
        QEMU's is.  Once; ``run()`` calls it if nobody did.

        Raises:
            IncomingError: the VM cannot be built.
        """
        if self._set_up or self.uri.scheme == "file":  # a file: built as it opens
            return
        self._set_up = True
        if self.prepare is None:
            vm_state.warm_up(self.kvm)
            return
        prepared = self._prepare()
        with self._lock:
            self._prepared = prepared

    def _prepare(self):
        try:
            origin = "restore" if self.uri.scheme == "file" else "incoming"
            return vm_state.prepare(self.kvm, self.prepare, origin, str(self.uri),
                                    **self.overrides)
        except ValueError as exc:
            raise IncomingError(f"cannot prepare the VM: {exc}") from None

    def _receive(self, conn: socket.socket, peer, prepared):
        inp = conn.makefile("rb", buffering=READ_BUFFER)
        self.started_at = time.monotonic()
        try:
            vmm, self.facts = receive(
                self.kvm, stream.Reader(inp), "incoming", str(self.uri), self.on_event,
                lambda number: conn.sendall(stream.frame(stream.SYNCED, number)),
                prepared, **self.overrides)
        except (KvmfilterError, OSError, ValueError) as exc:
            reason = _reason(exc)
            try:
                conn.sendall(stream.frame(stream.FAILED, json.dumps({"error": reason}).encode()))
            except OSError:
                pass
            raise IncomingError(f"the incoming stream from {peer or self.uri} failed: "
                                f"{reason}") from None
        try:
            conn.sendall(stream.frame(stream.READY))
            conn.settimeout(COMMIT_TIMEOUT)
            tag, _ = stream.read_frame(conn.makefile("rb", buffering=0))
            if tag != stream.COMMIT:
                raise IncomingError("the source abandoned the migration")
            self.before_start(vmm)
            # As QEMU's vm_prepare_start: RESUME goes out as the vCPUs are let go
            # (their threads wait, launched, so this is a notification).
            self.on_event("RESUME", None)
            vmm.start(self.kvm)
            stopped = self.facts.get("source_stopped")
            if stopped:
                self.downtime = max(0.0, time.time() - stopped)
            try:
                conn.sendall(stream.frame(stream.STARTED))
            except OSError:
                pass  # the guest runs here now; the source's bookkeeping is its own
        except (OSError, EOFError, stream.StreamError) as exc:
            vmm.close()
            raise IncomingError(f"the source did not commit: {_reason(exc)}") from None
        except BaseException:
            vmm.close()
            raise
        self.on_event("MIGRATION", {"status": "completed"})
        return vmm

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self.uri.scheme == "unix":
                unlink_quietly(self.uri.path)

    def close(self) -> None:
        """Stop waiting (another thread): the accept fails and ``run`` raises;
        a VM ``set_up()`` built and ``run()`` never took is closed."""
        with self._lock:
            unused, self._prepared = self._prepared, None
        if unused is not None:
            unused.close()
        listener = self._listener
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._close_listener()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, KvmfilterError):
        return "timed out" if "timed out" in str(exc) else (exc.strerror or str(exc))
    if isinstance(exc, EOFError):
        return f"the source hung up ({exc})"
    return str(exc)
