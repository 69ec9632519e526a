"""L5: `kvmfilter serve` - one VM per process, a QMP-shaped control socket,
events, a Prometheus textfile, sd_notify and a clean SIGTERM.

Protocol (design.md, "the daemon"): JSON lines over a Unix socket (mode 0600).
The server greets, the client sends ``{"execute": "qmp_capabilities"}``, then
``{"execute": CMD, "arguments": {...}, "id": ANY}`` -> ``{"return": ...}`` or
``{"error": {"class": ..., "desc": ...}}`` (with the same ``id``), and the
server pushes ``{"event": NAME, "data": ..., "timestamp": {...}}``.

Threads: the asyncio loop (main thread) owns every socket; vCPU threads only
hand events to it with ``call_soon_threadsafe``.  A readiness event is queued
by a listener that runs after the journal's, so no client hears of a
transition the journal does not hold.
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import socket
import stat
import threading
import time

from .machine import StopRecord
from .migration import rfc3339
from .vmm import Vmm

log = logging.getLogger("kvmfilter.daemon")

VERSION = {"kvmfilter": {"major": 0, "minor": 1, "micro": 0}, "package": "kvmfilter"}
MAX_LINE = 64 * 1024  # longer requests are answered with an error and skipped
# Replies and events are queued without waiting for the client; a client that
# lets more than this pile up (it does not read) is dropped, never waited for.
MAX_BACKLOG = 1 << 20
METRICS_INTERVAL = 1.0  # the metrics file and sd_notify STATUS lag by at most this
MAX_PENDING_EVENTS = 65536  # readiness events waiting for the loop; beyond: counted, dropped
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1


class CommandError(Exception):
    def __init__(self, desc: str, cls: str = "GenericError"):
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


def event(name: str, data: dict | None = None) -> dict:
    now = time.time()
    msg = {"event": name, "timestamp": {"seconds": int(now),
                                        "microseconds": int(now % 1 * 1_000_000)}}
    if data is not None:
        msg["data"] = data
    return msg


def encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


# ---- the socket file ------------------------------------------------------------

class SocketError(Exception):
    """The socket path cannot be served: another live daemon serves it, it is
    not ours to replace, or it cannot be bound."""


def claim_socket_path(path: str) -> None:
    """Make ``path`` free to bind: refuse a live socket, replace a stale one."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise SocketError(f"{path}: a Unix socket path is at most {SUN_PATH_MAX} bytes")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SocketError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise SocketError(f"{path}: {exc.strerror}") from None
        log.warning("stale_socket_replaced", extra={"socket": path})
        os.unlink(path)
        return
    finally:
        probe.close()
    raise SocketError(f"{path} is served by another live kvmfilter (or other) process")


# ---- sd_notify ------------------------------------------------------------------

def sd_notify(state: str) -> bool:
    """Tell systemd (Type=notify) about ``state``; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), address)
        return True
    except OSError as exc:
        log.warning("sd_notify_failed", extra={"error": str(exc)})
        return False


# ---- Prometheus textfile --------------------------------------------------------

def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def metrics_text(vmm: Vmm, status: str) -> str:
    c = vmm.control
    vm = f'vm="{_label(vmm.options.name)}"'
    blocked = vmm.blocked_reasons()
    lines = [
        "# HELP kvmfilter_migration_ready 1 when the guest has announced it is ready "
        "for live migration (MSR_KVM_MIGRATION_CONTROL bit 0).",
        "# TYPE kvmfilter_migration_ready gauge",
        f"kvmfilter_migration_ready{{{vm}}} {int(c.ready)}",
        "# HELP kvmfilter_migration_blocked 1 when anything blocks live migration now "
        "(see blocked-reasons).",
        "# TYPE kvmfilter_migration_blocked gauge",
        f"kvmfilter_migration_blocked{{{vm}}} {int(bool(blocked))}",
        "# HELP kvmfilter_migration_control_value The value of MSR_KVM_MIGRATION_CONTROL.",
        "# TYPE kvmfilter_migration_control_value gauge",
        f"kvmfilter_migration_control_value{{{vm}}} {c.value}",
        "# HELP kvmfilter_msr_accesses_total Guest accesses to MSR 0x4b564d08, by verdict.",
        "# TYPE kvmfilter_msr_accesses_total counter",
    ]
    verdicts = dict(c.verdicts)
    for verdict in ("ok", "gp"):
        lines.append(f'kvmfilter_msr_accesses_total{{{vm},verdict="{verdict}"}} '
                     f"{verdicts[verdict]}")
    lines += [
        "# HELP kvmfilter_migration_transitions_total Changes of the readiness value.",
        "# TYPE kvmfilter_migration_transitions_total counter",
        f"kvmfilter_migration_transitions_total{{{vm}}} {c.transitions_total}",
        "# HELP kvmfilter_page_map_shared_bytes Guest memory declared shared (decrypted).",
        "# TYPE kvmfilter_page_map_shared_bytes gauge",
        f"kvmfilter_page_map_shared_bytes{{{vm}}} {vmm.page_map.shared_bytes}",
        "# HELP kvmfilter_vm_running 1 while the guest runs, 0 paused or stopped.",
        "# TYPE kvmfilter_vm_running gauge",
        f"kvmfilter_vm_running{{{vm}}} {int(status == 'running')}",
    ]
    return "\n".join(lines) + "\n"


def write_atomically(path: str, text: str) -> None:
    """node-exporter textfile convention: never expose a half-written file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ---- the daemon -----------------------------------------------------------------

class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.negotiated = False
        self.closed = False

    def send(self, msg: dict) -> None:
        if self.closed:
            return
        transport = self.writer.transport
        if transport.is_closing():
            self.closed = True
            return
        if transport.get_write_buffer_size() > MAX_BACKLOG:
            log.warning("client_dropped_not_reading", extra={"backlog": MAX_BACKLOG})
            self.closed = True
            transport.abort()
            return
        self.writer.write(encode(msg))


class Daemon:
    """Serves one Vmm on ``socket_path`` until ``quit``, SIGTERM or SIGINT."""

    def __init__(self, vmm: Vmm, socket_path: str, metrics_file: str | None = None):
        self.vmm = vmm
        self.socket_path = socket_path
        self.metrics_file = metrics_file
        self.clients: set[Client] = set()
        self.guest_stop: StopRecord | None = None
        self.started = time.time()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self._server = None
        self.paused = False  # True only once every vCPU is parked
        self._run_state_lock: asyncio.Lock | None = None  # serializes stop/cont
        self._pending: list[dict] = []  # events from vCPU threads, for the loop
        self._pending_lock = threading.Lock()
        self._events_dropped = 0
        self._dirty = True  # metrics/STATUS need rewriting
        self._shutdown_reason = "host-qmp-quit"  # QEMU's SHUTDOWN reasons
        self._stop_detail = "shutdown"
        self.commands = {
            "qmp_capabilities": self.cmd_qmp_capabilities,
            "query-commands": self.cmd_query_commands,
            "query-status": self.cmd_query_status,
            "query-migration-readiness": self.cmd_query_migration_readiness,
            "query-page-map": self.cmd_query_page_map,
            "query-version": self.cmd_query_version,
            "stop": self.cmd_stop,
            "cont": self.cmd_cont,
            "system_powerdown": self.cmd_system_powerdown,
            "quit": self.cmd_quit,
        }

    # -- state ------------------------------------------------------------------

    @property
    def status(self) -> str:
        if self.guest_stop is not None:
            return "guest-stopped"
        return "paused" if self.paused else "running"

    def broadcast(self, msg: dict) -> None:
        for client in list(self.clients):
            if client.negotiated:
                client.send(msg)

    def _on_transition(self, t) -> None:
        # A vCPU thread, under the policy's lock, after the journal committed
        # the change: the event is built now, so its blocked-reasons belong to
        # this transition.  The loop is woken only when the queue was empty: a
        # guest that toggles as fast as it can costs one wake-up per batch, and
        # the loop's wake-up pipe (which also carries SIGTERM) never fills.
        msg = event("MIGRATION_READINESS_CHANGED", {
            "vcpu": t.vcpu, "from": t.old, "to": t.new, "ready": bool(t.new),
            "time": rfc3339(t.time), "blocked-reasons": self.vmm.blocked_reasons()})
        with self._pending_lock:
            wake = not self._pending
            if len(self._pending) < MAX_PENDING_EVENTS:
                self._pending.append(msg)
            else:
                self._events_dropped += 1
        if wake:
            self._loop.call_soon_threadsafe(self._flush_events)

    def _flush_events(self) -> None:
        with self._pending_lock:
            batch, self._pending = self._pending, []
            dropped, self._events_dropped = self._events_dropped, 0
        for msg in batch:
            self.broadcast(msg)
        if dropped:  # the loop fell behind: say so, the journal has every one
            self.broadcast(event("MIGRATION_READINESS_EVENTS_DROPPED", {"count": dropped}))
        self._dirty = True

    def _status_line(self) -> str:
        c = self.vmm.control
        return (f"{self.status}; migration {'ready' if c.ready else 'not ready'} "
                f"(value {c.value}, {c.transitions_total} transitions)")

    def write_metrics(self) -> None:
        if not self.metrics_file:
            return
        try:
            write_atomically(self.metrics_file, metrics_text(self.vmm, self.status))
        except OSError as exc:
            log.warning("metrics_write_failed", extra={"path": self.metrics_file,
                                                       "error": exc.strerror})

    # -- commands ---------------------------------------------------------------

    @staticmethod
    def _no_arguments(args: dict) -> None:
        """No command takes arguments (yet): QMP's error for any that are given."""
        if args:
            raise CommandError(f"Parameter '{next(iter(args))}' is unexpected")

    async def cmd_qmp_capabilities(self, client: Client):
        raise CommandError("Capabilities negotiation is already complete, command ignored",
                           "CommandNotFound")

    async def cmd_query_commands(self, client: Client):
        return [{"name": name} for name in sorted(self.commands)]

    async def cmd_query_version(self, client: Client):
        return VERSION

    async def cmd_query_status(self, client: Client):
        stop = self.guest_stop
        return {"status": self.status, "running": self.status == "running",
                "name": self.vmm.options.name, "image": self.vmm.label,
                "exit": None if stop is None else
                {"reason": stop.reason, "code": stop.code, "detail": stop.detail}}

    async def cmd_query_migration_readiness(self, client: Client):
        c = self.vmm.control
        return {"ready": c.ready, "value": c.value, "advertised": c.advertised,
                "blocked-reasons": self.vmm.blocked_reasons(), "since": rfc3339(c.since),
                "transitions": c.transitions_total, "accesses": c.accesses_total,
                "last-changed-by": c.last_changed_by}

    async def cmd_query_page_map(self, client: Client):
        return self.vmm.page_map.snapshot()

    async def cmd_stop(self, client: Client):
        async with self._run_state_lock:  # one stop/cont at a time, in order
            self._require_guest()
            if self.paused:
                return {}
            parked = await self._loop.run_in_executor(None, self.vmm.machine.pause)
            if not parked:
                self.vmm.machine.resume()
                raise CommandError("the vCPUs did not park within 5 s; the guest runs on")
            self.paused = True
            self.broadcast(event("STOP"))
            self.write_metrics()
            return {}

    async def cmd_cont(self, client: Client):
        async with self._run_state_lock:
            self._require_guest()
            if self.paused:
                self.vmm.machine.resume()
                self.paused = False
                self.broadcast(event("RESUME"))
                self.write_metrics()
            return {}

    async def cmd_system_powerdown(self, client: Client):
        self._require_guest()
        self.vmm.request_powerdown()
        self.broadcast(event("POWERDOWN"))
        return {}

    async def cmd_quit(self, client: Client):
        self._loop.call_soon(self.shutdown, "quit command")
        return {}

    def _require_guest(self) -> None:
        if self.guest_stop is not None:
            raise CommandError(f"the guest has stopped ({self.guest_stop.reason})")

    # -- connections ---------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        client = Client(reader, writer)
        self.clients.add(client)
        client.send({"QMP": {"version": VERSION, "capabilities": []}})
        try:
            while not client.closed:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError as exc:
                    await self._skip_long_line(reader, exc.consumed)
                    client.send({"error": {"class": "GenericError",
                                           "desc": f"request longer than {MAX_LINE} bytes"}})
                    continue
                except asyncio.IncompleteReadError:
                    break
                if line.strip():
                    await self._request(client, line)
        except (ConnectionError, OSError):
            pass
        finally:
            self.clients.discard(client)
            client.closed = True
            writer.close()

    @staticmethod
    async def _skip_long_line(reader: asyncio.StreamReader, consumed: int) -> None:
        await reader.readexactly(consumed)
        while True:
            try:
                await reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await reader.readexactly(exc.consumed)

    async def _request(self, client: Client, line: bytes) -> None:
        reply: dict = {}
        try:
            try:
                req = json.loads(line)
            except (ValueError, UnicodeDecodeError) as exc:
                raise CommandError(f"JSON parse error: {exc}") from None
            if not isinstance(req, dict):
                raise CommandError("a request must be a JSON object")
            if "id" in req:
                reply["id"] = req["id"]
            name = req.get("execute")
            if not isinstance(name, str):
                raise CommandError("'execute' must be a string naming a command")
            args = req.get("arguments", {})
            if not isinstance(args, dict):
                raise CommandError("'arguments' must be a JSON object")
            if not client.negotiated:
                if name != "qmp_capabilities":
                    raise CommandError("Expecting capabilities negotiation with "
                                       "'qmp_capabilities'", "CommandNotFound")
                self._no_arguments(args)
                client.negotiated = True
                reply["return"] = {}
            else:
                command = self.commands.get(name)
                if command is None:
                    raise CommandError(f"The command {name} has not been found",
                                       "CommandNotFound")
                self._no_arguments(args)  # no command takes any (yet)
                reply["return"] = await command(client)
        except Exception as exc:  # a bug answers this client; the daemon serves on
            if not isinstance(exc, CommandError):
                log.exception("command_failed")
                exc = CommandError(f"internal error: {type(exc).__name__}: {exc}")
            reply = {"error": {"class": exc.cls, "desc": exc.desc},
                     **({"id": reply["id"]} if "id" in reply else {})}
        client.send(reply)

    # -- lifecycle -----------------------------------------------------------------

    def _watch_guest(self) -> None:
        result = self.vmm.machine.wait()
        self._loop.call_soon_threadsafe(self._guest_stopped, result.exit)

    def _guest_stopped(self, stop: StopRecord) -> None:
        if self.guest_stop is not None:
            return
        self.guest_stop = stop
        log.info("guest_stopped", extra={"reason": stop.reason, "code": stop.code})
        self.broadcast(event("GUEST_STOPPED", {"reason": stop.reason, "code": stop.code,
                                               "detail": stop.detail}))
        self.write_metrics()
        sd_notify(f"STATUS={self._status_line()}")

    def shutdown(self, why: str) -> None:
        if self._done is not None and not self._done.is_set():
            log.info("daemon_stopping", extra={"why": why})
            self._stop_detail = why
            if why != "quit command":
                self._shutdown_reason = "host-signal"
            sd_notify("STOPPING=1")
            self._done.set()

    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self._run_state_lock = asyncio.Lock()
        self.vmm.control.add_listener(self._on_transition)  # the journal records first
        claim_socket_path(self.socket_path)
        old_umask = os.umask(0o177)  # the socket is born 0600, never wider
        try:
            self._server = await asyncio.start_unix_server(self.handle, self.socket_path,
                                                           limit=MAX_LINE)
        except OSError as exc:
            raise SocketError(f"cannot serve {self.socket_path}: {exc.strerror or exc}") \
                from None
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o600)
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self.shutdown, signal.Signals(sig).name)
            self.vmm.machine.start()
            threading.Thread(target=self._watch_guest, name="guest-watch", daemon=True).start()
            log.info("daemon_ready", extra={"socket": self.socket_path,
                                            "vm": self.vmm.options.name})
            self.write_metrics()
            sd_notify(f"READY=1\nSTATUS={self._status_line()}\nMAINPID={os.getpid()}")
            while not self._done.is_set():
                try:
                    await asyncio.wait_for(self._done.wait(), METRICS_INTERVAL)
                except asyncio.TimeoutError:
                    # Counters move without transitions: rewrite every interval.
                    self.write_metrics()
                    if self._dirty:
                        self._dirty = False
                        sd_notify(f"STATUS={self._status_line()}")
        finally:
            await self._stop_everything()

    async def _stop_everything(self) -> None:
        machine = self.vmm.machine
        if machine.stopped is None and machine.vcpus:
            machine.stop(StopRecord("quit", 0, "the daemon stopped the guest "
                                    f"({self._stop_detail})"))
        if machine.vcpus:
            # Joins every vCPU thread: each finishes its access (and its journal
            # commit) before it leaves.
            await self._loop.run_in_executor(None, machine.wait)
        self._flush_events()  # every committed transition is announced before SHUTDOWN
        self.write_metrics()
        self.broadcast(event("SHUTDOWN", {"guest": False, "reason": self._shutdown_reason}))
        for client in list(self.clients):
            try:
                await asyncio.wait_for(client.writer.drain(), 1.0)
            except Exception:
                pass
            client.writer.close()
        if self._server is not None:
            self._server.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.remove_signal_handler(sig)


def serve(vmm: Vmm, socket_path: str, metrics_file: str | None = None) -> Daemon:
    daemon = Daemon(vmm, socket_path, metrics_file)
    asyncio.run(daemon.serve())
    return daemon


# ---- the client side (`kvmfilter query` / `kvmfilter watch`) ---------------------

class QmpClient:
    """A blocking client: connect, negotiate, execute, read events."""

    def __init__(self, path: str, timeout: float | None = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.events: list[dict] = []  # events that arrived while waiting for a reply
        self.greeting = self.read()
        if "QMP" not in self.greeting:
            raise ConnectionError(f"{path} did not greet like QMP: {self.greeting!r}")
        reply = self.execute("qmp_capabilities")
        if "error" in reply:
            raise ConnectionError(f"capabilities negotiation failed: {reply['error']}")

    def read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise EOFError("the daemon closed the connection")
        return json.loads(line)

    def execute(self, command: str, arguments: dict | None = None) -> dict:
        """The reply (``{"return": ...}`` or ``{"error": ...}``); events are kept."""
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(encode(msg))
        while True:
            reply = self.read()
            if "event" in reply:
                self.events.append(reply)
                continue
            return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
