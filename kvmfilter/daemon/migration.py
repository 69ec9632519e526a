"""L5: the daemon's side of migration - the outgoing job it owns, the incoming
one it waits for, their parameters, and what each QMP command may do meanwhile.

The source job (``migrate.source.MigrationJob``) and the incoming receiver
(``migrate.destination.Incoming``) run in threads; their events reach clients
through the loop.  While an outgoing migration runs, the job owns the VM:
stop, cont and system_powerdown are refused.  After a completed live
migration the guest runs elsewhere, and ``cont`` is refused for good.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable, Optional

from ..migrate.destination import Incoming
from ..migrate.progress import Parameters
from ..migrate.source import MigrationJob
from ..migrate.transport import parse_uri
from ..migrate.worker import Worker
from .loop import call_from_thread
from .qmp import QmpError

log = logging.getLogger("kvmfilter.daemon")


class Migrations:
    """What one daemon knows about migrations, in and out."""

    def __init__(self, loop: asyncio.AbstractEventLoop, broadcast_event: Callable):
        self._loop = loop
        self._broadcast_event = broadcast_event
        self.params = Parameters()
        self._worker = Worker("migration")  # the jobs' thread, started before any job
        self.job: Optional[MigrationJob] = None
        self.incoming: Optional[Incoming] = None
        self.incoming_status: dict = {}
        self.incoming_error: Optional[str] = None

    def post_event(self, name: str, data: Optional[dict]) -> None:
        """From any thread; stamped now, not when the loop gets to it."""
        call_from_thread(self._loop, self._broadcast_event, name, data, time.time())

    # -- outgoing --------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.active

    @property
    def moved_to(self) -> Optional[str]:
        """Where the guest went, once a live migration committed."""
        return str(self.job.uri) if self.job is not None and self.job.moved else None

    def refuse_while_running(self, what: str) -> None:
        if self.running:
            raise QmpError(f"{what} is not possible while a migration is in progress "
                           "(migrate_cancel first)")

    def start(self, vmm, uri_text: str) -> None:
        """QMP migrate: the checks QEMU makes up front, then the job."""
        try:
            uri = parse_uri(uri_text)
        except ValueError as exc:
            raise QmpError(str(exc)) from None
        self.refuse_while_running("migrate")
        if self.moved_to:
            raise QmpError(f"the guest was migrated to {self.moved_to} and runs there")
        stop = vmm.stop_record
        if stop is not None:
            raise QmpError(f"the guest has stopped ({stop.reason}); nothing to migrate")
        blockers = vmm.blocked_reasons()
        if blockers:
            raise QmpError("Migration is blocked: " + " ".join(blockers))
        self.job = MigrationJob(vmm, uri, self.params, self.post_event)
        self.job.start(self._worker)

    def cancel(self) -> None:
        if self.running:
            self.job.cancel()

    def wait(self, timeout: float) -> None:
        if self.job is not None:
            self.job.done.wait(timeout)

    def close(self) -> None:
        """End the jobs' thread (after ``cancel`` and ``wait``: a job still
        running keeps it, and the process's exit ends it)."""
        self._worker.close(timeout=1.0)

    def query(self) -> dict:
        if self.job is not None:
            return self.job.stats.to_json()
        return dict(self.incoming_status)

    # -- incoming --------------------------------------------------------------------

    def receive(self, incoming: Incoming, adopt: Callable, failed: Callable) -> None:
        """Run ``incoming`` in a thread; ``adopt(vmm)`` or ``failed(reason)`` on the loop."""
        self.incoming = incoming
        self.incoming_status = {"status": "setup"}

        def main():
            try:
                vmm = incoming.run()
            except Exception as exc:  # every failure ends the daemon, with the reason
                self.incoming_error = str(exc) or type(exc).__name__
                self.incoming_status = {"status": "failed", "error-desc": self.incoming_error}
                call_from_thread(self._loop, failed, self.incoming_error)
                return
            self.incoming_status = {"status": "completed"}
            if incoming.downtime is not None:
                self.incoming_status["downtime"] = round(incoming.downtime * 1000)
            if not call_from_thread(self._loop, adopt, vmm):
                vmm.stop("quit", "the daemon shut down while the VM arrived")
                vmm.wait()
                vmm.close()

        threading.Thread(target=main, name="incoming", daemon=True).start()

    def on_incoming_event(self, name: str, data: Optional[dict]) -> None:
        if name == "MIGRATION":
            self.incoming_status = {**self.incoming_status, "status": data["status"]}
        self.post_event(name, data)

    def abandon_incoming(self) -> None:
        if self.incoming is not None:
            self.incoming.close()
