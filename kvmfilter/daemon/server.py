"""L5: `kvmfilter serve` - one VM per process behind a QMP control socket.

Threads: the asyncio loop (main thread) owns every socket and client; vCPU
threads hand it readiness changes (daemon/events.py), migration threads their
progress (daemon/migration.py).  The run state belongs to the VM
(``Vmm.status``); the server asks, it keeps no copy - until an incoming
migration has built the VM, the status is ``inmigrate``.

Lifecycle: signals are handled before the socket exists (a SIGTERM at any
moment removes it); on ``quit``, SIGTERM or SIGINT the socket file goes first
(no new client can come), the vCPUs stop (each finishes its access and journal
commit), every committed transition is announced, SHUTDOWN is sent, and all
clients are drained at once under one deadline (``DRAIN_DEADLINE``): a client
that stopped reading is dropped, never waited for one after another.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from typing import Optional

from ..base import version
from ..migrate.destination import Incoming
from ..migrate.transport import bind_unix, unlink_quietly
from ..vm.machine import RunState, StateError
from .commands import COMMANDS, check_arguments
from .connection import READ_CHUNK, Client
from .events import ReadinessEvents
from .loop import call_from_thread
from .metrics import metrics_text, write_atomically
from .migration import Migrations
from .notify import Notifier, watchdog_interval
from .qmp import QmpError, event

log = logging.getLogger("kvmfilter.daemon")

DRAIN_DEADLINE = 1.0  # seconds to flush every client at shutdown, all at once
METRICS_INTERVAL = 1.0  # the metrics file and sd_notify STATUS lag by at most this
PAUSE_TIMEOUT = 5.0
SYNC_INTERVAL = 0.1  # how often changes the C fast path applied reach the record


class Server:
    """Serves one VM on a Unix socket until ``quit``, SIGTERM or SIGINT.

    Args:
        vmm: the VM (its vCPUs are started by ``run``), or None when it will
            come from an incoming migration.
        kvm: the ``Kvm`` to start it with.
        socket_path: where to listen (ignored when ``listen_socket`` is given).
        metrics_file: a Prometheus textfile to keep current, or None.
        listen_socket: a socket systemd passed (socket activation).
        incoming: the ``Incoming`` to wait for (``serve --incoming URI``); with
            neither ``vmm`` nor ``incoming``, wait for QMP migrate-incoming.
        name: the VM's name before it exists (an incoming migration).
    """

    def __init__(self, vmm, kvm, socket_path: str, metrics_file: Optional[str] = None,
                 listen_socket: Optional[socket.socket] = None,
                 incoming: Optional[Incoming] = None, name: str = "vm"):
        self.vmm = vmm
        self.kvm = kvm
        self.name = vmm.options.name if vmm is not None else name
        self.socket_path = socket_path
        self.metrics_file = metrics_file
        self.incoming = incoming
        self.exit_status = 0
        self._listen_socket = listen_socket
        self._owns_path = False  # True once we bound the path: then we remove it
        self.clients: set[Client] = set()
        self._tasks: set[asyncio.Task] = set()
        self.notifier = Notifier()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._done: Optional[asyncio.Event] = None
        self._vm_ready: Optional[asyncio.Event] = None
        self._lifecycle: Optional[asyncio.Lock] = None  # one stop/cont at a time
        self.incoming_overrides: dict = {}  # what an incoming VM takes from the command line
        self.events: Optional[ReadinessEvents] = None
        self.migrations: Optional[Migrations] = None
        self._guest_stop_announced = False
        self._shutdown_reason = "host-qmp-quit"  # QEMU's SHUTDOWN reasons
        self._stop_detail = "shutdown"
        self._dirty = True  # metrics/STATUS need rewriting
        self._version = version()

    # -- state ---------------------------------------------------------------------

    @property
    def status(self) -> RunState:
        return RunState.INMIGRATE if self.vmm is None else self.vmm.status

    def version_info(self) -> dict:
        """QEMU's version shape (``qemu.qmp`` and ``qmp-shell`` read ``qemu``),
        carrying kvmfilter's version; ``package`` says who is answering."""
        parts = [int(p) if p.isdigit() else 0 for p in self._version.split(".")[:3]]
        parts += [0] * (3 - len(parts))
        triple = {"major": parts[0], "minor": parts[1], "micro": parts[2]}
        return {"qemu": triple, "kvmfilter": triple, "package": f"kvmfilter {self._version}"}

    def broadcast(self, msg: dict) -> None:
        for client in list(self.clients):
            if client.negotiated:
                client.send(msg)

    def broadcast_event(self, name: str, data: Optional[dict] = None,
                        at: Optional[float] = None) -> None:
        self.broadcast(event(name, data, at))

    def require_guest(self) -> None:
        """Refuse a lifecycle command when there is no guest to apply it to."""
        if self.vmm is None:
            raise QmpError("no VM yet: waiting for an incoming migration")
        stop = self.vmm.stop_record
        if stop is not None:
            raise QmpError(f"the guest has stopped ({stop.reason})")

    # -- commands ------------------------------------------------------------------

    async def execute(self, name: str, args: dict):
        if name == "qmp_capabilities":
            raise QmpError("Capabilities negotiation is already complete, command ignored",
                           "CommandNotFound")
        command = COMMANDS.get(name)
        if command is None:
            raise QmpError(f"The command {name} has not been found", "CommandNotFound")
        check_arguments(command.params, args)
        if command.needs_vm and self.vmm is None:
            raise QmpError(f"{name}: no VM yet (the daemon waits for an incoming migration)")
        return await command.handler(self, args)

    async def pause(self) -> None:
        async with self.lifecycle:
            self.require_guest()
            self.migrations.refuse_while_running("stop")
            if self.status in (RunState.PAUSED, RunState.POSTMIGRATE):
                return
            try:
                parked = await self._loop.run_in_executor(None, self.vmm.pause, PAUSE_TIMEOUT)
            except StateError as exc:
                raise QmpError(str(exc)) from None
            if not parked:
                raise QmpError(f"the vCPUs did not park within {PAUSE_TIMEOUT:g} s "
                               "(one may be waiting for the journal); the guest runs on")
            self.broadcast_event("STOP")
            self._dirty = True
            self.write_metrics()

    async def resume(self) -> None:
        async with self.lifecycle:
            self.require_guest()
            self.migrations.refuse_while_running("cont")
            if self.migrations.moved_to:
                raise QmpError(f"the guest was migrated to {self.migrations.moved_to} and "
                               "runs there now; refusing to run a second copy")
            if self.status is RunState.RUNNING:
                return
            try:
                self.vmm.resume()
            except StateError as exc:
                raise QmpError(str(exc)) from None
            self.broadcast_event("RESUME")
            self._dirty = True
            self.write_metrics()

    def request_shutdown(self, why: str) -> None:
        self._loop.call_soon(self._shutdown, why)

    def _shutdown(self, why: str) -> None:
        if self._done is not None and not self._done.is_set():
            log.info("daemon_stopping", extra={"why": why})
            self._stop_detail = why
            if why != "quit command":
                self._shutdown_reason = "host-signal"
            self.notifier.send("STOPPING=1")
            self._done.set()

    # -- metrics and systemd ------------------------------------------------------------

    def _status_line(self) -> str:
        if self.vmm is None:
            return f"{self.status}: waiting for an incoming migration"
        c = self.vmm.control
        return (f"{self.status}; migration {'ready' if c.ready else 'not ready'} "
                f"(value {c.value}, {c.transitions_total} transitions)")

    def mark_dirty(self) -> None:
        self._dirty = True

    def write_metrics(self) -> None:
        if not self.metrics_file or self.vmm is None:
            return
        try:
            write_atomically(self.metrics_file, metrics_text(self.vmm, self._version))
        except OSError as exc:
            log.warning("metrics_write_failed", extra={"path": self.metrics_file,
                                                       "error": exc.strerror or str(exc)})

    async def _tick(self) -> None:
        """Every second: metrics (counters move without transitions), STATUS, watchdog;
        every SYNC_INTERVAL: take the transitions the C fast path applied (their
        events go out from here)."""
        watchdog = watchdog_interval()
        last_ping = last_tick = 0.0
        while not self._done.is_set():
            now = time.monotonic()
            if self.vmm is not None:
                self.vmm.control.sync()
            if watchdog is not None and now - last_ping >= watchdog:
                self.notifier.send("WATCHDOG=1")
                last_ping = now
            if now - last_tick >= METRICS_INTERVAL:
                last_tick = now
                self.write_metrics()
                if self._dirty:
                    self._dirty = False
                    self.notifier.send(f"STATUS={self._status_line()}")
            try:
                await asyncio.wait_for(self._done.wait(), SYNC_INTERVAL)
            except asyncio.TimeoutError:
                pass

    # -- the guest ----------------------------------------------------------------------

    def _watch_guest(self) -> None:
        self.vmm.wait()
        call_from_thread(self._loop, self._guest_stopped)  # closed: shutdown announced it

    def _guest_stopped(self) -> None:
        stop = self.vmm.stop_record
        if self._guest_stop_announced or stop is None:
            return
        self._guest_stop_announced = True
        log.info("guest_stopped", extra={"reason": stop.reason, "code": stop.code})
        self.broadcast_event("GUEST_STOPPED", stop.to_json())
        self._dirty = True
        self.write_metrics()

    # -- connections and the main loop ------------------------------------------------------

    async def _connected(self, reader, writer) -> None:
        client = Client(self, reader, writer)
        self.clients.add(client)
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await client.serve()
        finally:
            self.clients.discard(client)
            self._tasks.discard(task)

    def run(self) -> int:
        """Serve until shutdown; the exit status (1: an incoming migration failed)."""
        asyncio.run(self._main())
        return self.exit_status

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self._vm_ready = asyncio.Event()
        self._lifecycle = asyncio.Lock()
        self.migrations = Migrations(self._loop, self.broadcast_event)
        # Signals first: a SIGTERM from here on is a clean shutdown that removes
        # the socket, however early it comes.
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._shutdown, signal.Signals(sig).name)
        server = None
        try:
            sock = self._listen_socket
            if sock is None:
                sock = bind_unix(self.socket_path)
                self._owns_path = True
            server = await asyncio.start_unix_server(self._connected, sock=sock,
                                                     limit=READ_CHUNK)
            if self.vmm is None:
                if self.incoming is not None:
                    self.start_incoming(self.incoming)
                self.notifier.send(f"READY=1\nSTATUS={self._status_line()}\n"
                                   f"MAINPID={os.getpid()}")
                log.info("daemon_waiting_for_incoming_migration",
                         extra={"socket": self.socket_path})
                await self._wait_for_vm()
            elif not self._done.is_set():
                self._adopt(self.vmm, start=True)
                self.notifier.send(f"READY=1\nSTATUS={self._status_line()}\n"
                                   f"MAINPID={os.getpid()}")
            if not self._done.is_set():
                await self._tick()
        finally:
            await self._stop_everything(server)
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.remove_signal_handler(sig)

    async def _wait_for_vm(self) -> None:
        done = asyncio.ensure_future(self._done.wait())
        ready = asyncio.ensure_future(self._vm_ready.wait())
        await asyncio.wait([done, ready], return_when=asyncio.FIRST_COMPLETED)
        for f in (done, ready):
            f.cancel()

    @property
    def lifecycle(self) -> asyncio.Lock:
        return self._lifecycle

    def make_incoming(self, uri) -> Incoming:
        """An ``Incoming`` for ``uri`` with this daemon's command-line overrides."""
        return Incoming(self.kvm, uri, **self.incoming_overrides)

    def start_incoming(self, incoming: Incoming) -> None:
        """Receive ``incoming`` in the background (serve --incoming, migrate-incoming)."""
        self.incoming = incoming
        incoming.on_event = self.migrations.on_incoming_event
        incoming.before_start = self._wire
        self.migrations.receive(incoming, self._adopt, self._incoming_failed)

    def _incoming_failed(self, reason: str) -> None:
        log.error("incoming_migration_failed", extra={"error": reason})
        self.exit_status = 1
        self._shutdown(f"the incoming migration failed: {reason}")

    def _wire(self, vmm) -> None:
        """Before a VM's vCPUs start: hear its transitions (after the journal)."""
        self.events = ReadinessEvents(self._loop, vmm, self.broadcast, self.mark_dirty)
        vmm.control.add_listener(self.events.on_transition, latest_only=True)

    def _adopt(self, vmm, start: bool = False) -> None:
        """The VM is here (built at start-up, or by an incoming migration)."""
        self.vmm = vmm
        self.name = vmm.options.name
        if start:
            self._wire(vmm)
            vmm.start(self.kvm)
        threading.Thread(target=self._watch_guest, name="guest-watch", daemon=True).start()
        log.info("daemon_ready", extra={"socket": self.socket_path, "vm": self.name,
                                        "status": str(self.status)})
        self._dirty = True
        self.write_metrics()
        self._vm_ready.set()

    async def _stop_everything(self, server) -> None:
        if self._owns_path:
            unlink_quietly(self.socket_path)  # first: no new client can come
        if server is not None:
            server.close()
        if self.migrations is not None:
            self.migrations.abandon_incoming()
            self.migrations.cancel()
            await self._loop.run_in_executor(None, self.migrations.wait, 10.0)
            await self._loop.run_in_executor(None, self.migrations.close)
        vmm = self.vmm
        if vmm is not None and vmm.started:
            if vmm.stop_record is None:
                vmm.stop("quit", f"the daemon stopped the guest ({self._stop_detail})")
            # Joins every vCPU thread: each finishes its access (and its journal
            # commit) before it leaves.
            await self._loop.run_in_executor(None, vmm.wait)
            self._guest_stopped()
        if self.events is not None:
            self.events.flush()  # the latest committed state is announced before SHUTDOWN
        self.write_metrics()
        self.broadcast_event("SHUTDOWN", {"guest": False, "reason": self._shutdown_reason})
        await self._drain_clients()

    async def _drain_clients(self) -> None:
        clients = list(self.clients)

        async def drain(client: Client) -> None:
            try:
                await client.writer.drain()
            except Exception:
                pass

        if clients:
            await asyncio.wait([asyncio.ensure_future(drain(c)) for c in clients],
                               timeout=DRAIN_DEADLINE)
        for client in clients:
            client.closed = True
            client.writer.transport.abort()
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def serve(vmm, kvm, socket_path: str, metrics_file: Optional[str] = None,
          listen_socket: Optional[socket.socket] = None,
          incoming: Optional[Incoming] = None, name: str = "vm",
          incoming_overrides: Optional[dict] = None) -> int:
    """Run the daemon; its exit status.  A VM that arrived by migration is
    closed here; one passed in belongs to the caller."""
    server = Server(vmm, kvm, socket_path, metrics_file, listen_socket, incoming, name)
    server.incoming_overrides = incoming_overrides or {}
    try:
        return server.run()
    finally:
        if vmm is None and server.vmm is not None:
            server.vmm.close()
