"""L5: one client connection to the daemon: its JSON stream, capabilities
negotiation as QEMU words it, and a write queue that never waits for a client
that stopped reading.
"""
from __future__ import annotations

import asyncio
import logging

from .qmp import JsonStream, ParseError, QmpError, check_request, encode

log = logging.getLogger("kvmfilter.daemon")

READ_CHUNK = 65536
# Replies and events are queued without waiting for the client; a client that
# lets more than this pile up (it does not read) is dropped, never waited for.
MAX_BACKLOG = 1 << 20
CAPABILITIES: list[str] = []  # QMP capabilities offered (QEMU offers "oob")


class Client:
    """One connection: its JSON stream, negotiation state and write queue."""

    def __init__(self, server, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.stream = JsonStream()
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

    async def serve(self) -> None:
        self.send({"QMP": {"version": self.server.version_info(),
                           "capabilities": CAPABILITIES}})
        try:
            while not self.closed:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    break
                for item in self.stream.feed(data):
                    if self.closed:
                        break
                    await self.request(item)
                    await asyncio.sleep(0)  # fairness: let other clients in between
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:  # shutdown: the server closes us
            pass
        finally:
            self.closed = True
            self.writer.close()

    async def request(self, item) -> None:
        has_id, id_ = False, None
        try:
            if isinstance(item, ParseError):
                raise item
            if isinstance(item, dict) and "id" in item:
                has_id, id_ = True, item["id"]
            name, args = check_request(item)
            if not self.negotiated:
                if name != "qmp_capabilities":
                    raise QmpError("Expecting capabilities negotiation with "
                                   "'qmp_capabilities'", "CommandNotFound")
                negotiate(args)
                self.negotiated = True
                result = {}
            else:
                result = await self.server.execute(name, args)
        except QmpError as exc:
            self.send(exc.reply(id_, has_id))
            return
        except Exception as exc:  # a bug answers this client; the daemon serves on
            log.exception("command_failed")
            self.send(QmpError(f"internal error: {type(exc).__name__}: {exc}")
                      .reply(id_, has_id))
            return
        reply: dict = {"return": result}
        if has_id:
            reply["id"] = id_
        self.send(reply)


def negotiate(args: dict) -> None:
    """qmp_capabilities {"enable": [...]}: QEMU's checks and wording."""
    enable = args.get("enable", [])
    unexpected = set(args) - {"enable"}
    if unexpected:
        raise QmpError(f"Parameter '{sorted(unexpected)[0]}' is unexpected")
    if not isinstance(enable, list):
        raise QmpError("Invalid parameter type for 'enable', expected: array")
    for i, cap in enumerate(enable):
        if not isinstance(cap, str):
            raise QmpError(f"Invalid parameter type for 'enable[{i}]', expected: string")
        # QEMU's words, quirks included: its enum visitor names list elements 'null'.
        if cap == "oob":
            raise QmpError(f"Capability {cap} not available")
        if cap not in CAPABILITIES:
            raise QmpError(f"Parameter 'null' does not accept value '{cap}'")
