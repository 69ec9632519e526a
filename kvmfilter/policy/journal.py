"""L3: the readiness journal - every migration-readiness transition, durably.

SQLite in WAL mode, one file for many VMs.  ``record()`` commits before it
returns; MigrationControl calls it before the vCPU that caused the transition
re-enters the guest, so a crash never loses an announced change.  Accesses
that change nothing are not journaled.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass

from ..base import BadInput
from .readiness import Transition, rfc3339

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS transitions (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    vm      TEXT    NOT NULL,
    vcpu    INTEGER NOT NULL,
    old     INTEGER NOT NULL,
    new     INTEGER NOT NULL,
    time    REAL    NOT NULL   -- seconds since the epoch, UTC
);
CREATE INDEX IF NOT EXISTS transitions_vm ON transitions (vm, id);
"""


class JournalError(BadInput):
    """The journal cannot be opened, created, read or written."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"journal {path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class JournalRow:
    id: int
    vm: str
    vcpu: int
    old: int
    new: int
    time: float

    def to_json(self) -> dict:
        return {"id": self.id, "vm": self.vm, "vcpu": self.vcpu, "from": self.old,
                "to": self.new, "time": rfc3339(self.time)}


class ReadinessJournal:
    """Append-only transition log for VM ``vm_name`` in the SQLite file ``path``.

    ``create=False`` opens an existing journal read-only (``kvmfilter journal``).

    Raises:
        JournalError: the file cannot be created or written, or is not a
            kvmfilter journal (checked here, before any guest runs).
    """

    def __init__(self, path: str, vm_name: str = "vm", *, create: bool = True):
        self.path = path
        self.vm_name = vm_name
        if not create and not os.path.exists(path):
            raise JournalError(path, "no such file")
        try:
            if create:
                self._db = sqlite3.connect(path, check_same_thread=False,
                                           isolation_level=None, timeout=10.0)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
            else:  # reading only: never write to (or need write access to) the file
                self._db = sqlite3.connect(f"file:{_quote_uri(path)}?mode=ro", uri=True,
                                           check_same_thread=False, timeout=10.0)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise JournalError(path, f"schema version {version}, expected {SCHEMA_VERSION}")
            tables = {r[0] for r in self._db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if version == 0 and tables - {"transitions", "sqlite_sequence"}:
                raise JournalError(path, "an SQLite database of something else "
                                         "(refusing to add a table to it)")
            if create:
                self._db.executescript(_SCHEMA)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._db.execute("SELECT vm, vcpu, old, new, time FROM transitions LIMIT 1")
        except sqlite3.Error as exc:
            raise JournalError(path, _reason(exc)) from None
        except OSError as exc:
            raise JournalError(path, exc.strerror or str(exc)) from None
        self._lock = threading.Lock()

    def record(self, t: Transition) -> None:
        """Append one transition and commit it (fsync'd: synchronous=FULL).

        Raises:
            JournalError: the commit failed (disk full, database locked ...);
                nothing was recorded.
        """
        try:
            with self._lock:
                self._db.execute("INSERT INTO transitions (vm, vcpu, old, new, time) "
                                 "VALUES (?, ?, ?, ?, ?)",
                                 (self.vm_name, t.vcpu, t.old, t.new, t.time))
        except sqlite3.Error as exc:
            raise JournalError(self.path, f"cannot record a transition: {_reason(exc)}") \
                from None

    def rows(self, vm: str | None = None) -> list[JournalRow]:
        query = "SELECT id, vm, vcpu, old, new, time FROM transitions"
        args: tuple = ()
        if vm is not None:
            query += " WHERE vm = ?"
            args = (vm,)
        try:
            with self._lock:
                return [JournalRow(*row) for row in self._db.execute(query + " ORDER BY id", args)]
        except sqlite3.Error as exc:
            raise JournalError(self.path, _reason(exc)) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _quote_uri(path: str) -> str:
    from urllib.parse import quote
    return quote(os.path.abspath(path))


def _reason(exc: sqlite3.Error) -> str:
    text = str(exc)
    if "file is not a database" in text:
        return "not an SQLite database (corrupt, or some other file)"
    if "unable to open" in text:
        return "cannot open or create the file (does the directory exist, is it writable?)"
    if "readonly" in text:
        return "the file or its directory is read-only"
    if "no such table" in text or "no such column" in text:
        return "not a kvmfilter journal (no transitions table)"
    return text
