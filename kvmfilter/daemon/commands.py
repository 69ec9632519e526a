"""L5: the QMP command table - names, argument schemas, handlers.

Arguments are checked against each command's schema before it runs, with
QEMU's wording for what is wrong (qapi/qobject-input-visitor.c):
"Parameter 'x' is unexpected", "Parameter 'x' is missing",
"Invalid parameter type for 'x', expected: integer".

A handler is ``async handler(server, args) -> return value``; it raises
``QmpError`` to answer with an error.  The server is ``daemon.server.Server``.
"""
from __future__ import annotations

import asyncio
from collections import namedtuple
from typing import Any, Awaitable, Callable, Optional

from ..base import KvmfilterError
from ..policy.readiness import rfc3339
from .qmp import QmpError

# QAPI's type names, as its error messages spell them.
_TYPES = {"str": (str, "string"), "int": (int, "integer"), "bool": (bool, "boolean"),
          "number": ((int, float), "number"), "array": (list, "array"),
          "object": (dict, "object")}


class Param(namedtuple("Param", "name type required", defaults=(False,))):
    __slots__ = ()


class Command(namedtuple("Command", "name handler params needs_vm")):
    """``needs_vm``: refused while no VM exists yet (an incoming migration)."""
    __slots__ = ()


def check_arguments(params: tuple, args: dict) -> dict:
    """``args`` checked against ``params``; QmpError as QEMU words it."""
    known = {p.name: p for p in params}
    for name, value in args.items():
        param = known.get(name)
        if param is None:
            raise QmpError(f"Parameter '{name}' is unexpected")
        pytype, qtype = _TYPES[param.type]
        # bool is an int in Python, not in JSON.
        if not isinstance(value, pytype) or (isinstance(value, bool) and param.type != "bool"):
            raise QmpError(f"Invalid parameter type for '{name}', expected: {qtype}")
    for p in params:
        if p.required and p.name not in args:
            raise QmpError(f"Parameter '{p.name}' is missing")
    return args


class CommandTable:
    def __init__(self):
        self.commands: dict[str, Command] = {}

    def command(self, name: str, *params: Param, needs_vm: bool = True):
        """Decorator: register ``handler`` as command ``name``."""
        def register(handler: Callable[[Any, dict], Awaitable[Any]]):
            self.commands[name] = Command(name, handler, params, needs_vm)
            return handler
        return register

    def get(self, name: str) -> Optional[Command]:
        return self.commands.get(name)

    def names(self) -> list[str]:
        return sorted(self.commands)


COMMANDS = CommandTable()
command = COMMANDS.command


@command("query-commands", needs_vm=False)
async def query_commands(server, args):
    return [{"name": name} for name in COMMANDS.names() + ["qmp_capabilities"]]


@command("query-version", needs_vm=False)
async def query_version(server, args):
    return server.version_info()


@command("query-status", needs_vm=False)
async def query_status(server, args):
    vmm = server.vmm
    status = server.status
    stop = None if vmm is None else vmm.stop_record
    return {"status": status, "running": status == "running",
            "name": server.name, "image": None if vmm is None else vmm.label,
            "exit": None if stop is None else stop.to_json()}


@command("query-migration-readiness")
async def query_migration_readiness(server, args):
    vmm = server.vmm
    c = vmm.control
    return {"ready": c.ready, "value": c.value, "advertised": c.advertised,
            "blocked-reasons": vmm.blocked_reasons(), "since": rfc3339(c.since),
            "transitions": c.transitions_total, "accesses": c.accesses_total,
            "last-changed-by": c.last_changed_by}


@command("query-page-map")
async def query_page_map(server, args):
    return {key.replace("_", "-"): value
            for key, value in server.vmm.page_map.snapshot().items()}


@command("stop")
async def stop(server, args):
    await server.pause()
    return {}


@command("cont")
async def cont(server, args):
    await server.resume()
    return {}


@command("system_powerdown")
async def system_powerdown(server, args):
    server.require_guest()
    server.migrations.refuse_while_running("system_powerdown")
    server.vmm.request_powerdown()
    server.broadcast_event("POWERDOWN")
    return {}


@command("quit", needs_vm=False)
async def quit_(server, args):
    server.request_shutdown("quit command")
    return {}


# -- migration (QEMU's commands) ----------------------------------------------------------

@command("migrate", Param("uri", "str", True), Param("detach", "bool"),
         Param("resume", "bool"))
async def migrate(server, args):
    """Returns at once; progress in query-migrate and MIGRATION events."""
    if args.get("resume"):
        raise QmpError("kvmfilter has no post-copy to resume")
    server.require_guest()
    async with server.lifecycle:
        server.migrations.start(server.vmm, args["uri"])
    return {}


@command("migrate_cancel")
async def migrate_cancel(server, args):
    server.migrations.cancel()
    return {}


@command("query-migrate", needs_vm=False)
async def query_migrate(server, args):
    return server.migrations.query()


@command("migrate-set-parameters", Param("downtime-limit", "int"), Param("max-bandwidth", "int"),
         Param("x-max-rounds", "int"), Param("x-stall-timeout", "int"), needs_vm=False)
async def migrate_set_parameters(server, args):
    try:
        server.migrations.params.update(args)
    except ValueError as exc:
        raise QmpError(str(exc)) from None
    return {}


@command("query-migrate-parameters", needs_vm=False)
async def query_migrate_parameters(server, args):
    return server.migrations.params.to_json()


@command("migrate-incoming", Param("uri", "str", True), needs_vm=False)
async def migrate_incoming(server, args):
    """Only for a daemon started with --incoming defer, once."""
    from ..migrate.destination import Incoming
    from ..migrate.transport import parse_uri
    if server.vmm is not None or server.incoming is not None:
        raise QmpError("The incoming migration has already been started (or this daemon "
                       "was not started with --incoming defer)")
    try:
        uri = parse_uri(args["uri"])
    except ValueError as exc:
        raise QmpError(str(exc)) from None
    incoming = server.make_incoming(uri)
    try:
        incoming.listen()
    except ValueError as exc:
        raise QmpError(str(exc)) from None
    server.incoming = incoming  # taken: a second migrate-incoming is refused meanwhile
    try:
        # The VM is built (or the warm-up done) before the reply: a destination
        # that has answered is ready, and a migrate sent at once pays no build.
        await asyncio.get_running_loop().run_in_executor(None, incoming.set_up)
    except BaseException as exc:
        server.incoming = None
        incoming.close()
        if isinstance(exc, KvmfilterError):
            raise QmpError(str(exc)) from None
        raise
    server.start_incoming(incoming)
    return {}
