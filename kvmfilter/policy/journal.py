"""L3: the readiness journal - every migration-readiness transition, durably.

SQLite in WAL mode, one file for many VMs.  ``record()`` commits before it
returns; MigrationControl calls it before the vCPU that caused the transition
re-enters the guest, so a crash never loses an announced change.  Accesses
that change nothing are not journaled.

Each VM instance is a *run* (a boot, or a restore of a snapshot or migration,
which continues the run it came from), so the chains of two runs with the same
name never mix, and a restored VM's history reads on from the one it left.

The file is checked before anything is written: a symbolic link, anything but
a regular file, another application's database, or one with triggers or views
(which could rewrite history behind our back) is refused.
"""
from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Optional
from urllib.parse import quote

from ..base import BadInput
from .readiness import Transition, rfc3339

SCHEMA_VERSION = 2
APPLICATION_ID = 0x4B56_4D46  # "KVMF": PRAGMA application_id marks the file as ours
_SCHEMA = """
CREATE TABLE IF NOT EXISTS transitions (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    vm      TEXT    NOT NULL,
    vcpu    INTEGER NOT NULL,
    old     INTEGER NOT NULL,
    new     INTEGER NOT NULL,
    time    REAL    NOT NULL,   -- seconds since the epoch, UTC
    run     TEXT,               -- the VM instance (NULL: written by schema 1)
    carried INTEGER NOT NULL DEFAULT 0  -- copied from a restore's stream
);
CREATE INDEX IF NOT EXISTS transitions_vm ON transitions (vm, id);
CREATE TABLE IF NOT EXISTS runs (
    run     TEXT PRIMARY KEY,
    vm      TEXT NOT NULL,
    started REAL NOT NULL,
    origin  TEXT NOT NULL,      -- boot, restore, incoming
    source  TEXT,               -- where it came from (a URI)
    parent  TEXT                -- the run it continues
);
"""
_OURS = {"transitions", "runs", "sqlite_sequence"}


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
    run: Optional[str] = None
    carried: bool = False

    def to_json(self) -> dict:
        return {"id": self.id, "vm": self.vm, "vcpu": self.vcpu, "from": self.old,
                "to": self.new, "time": rfc3339(self.time), "run": self.run,
                "carried": self.carried}


@dataclass(frozen=True)
class RunRow:
    run: str
    vm: str
    started: float
    origin: str
    source: Optional[str]
    parent: Optional[str]

    def to_json(self) -> dict:
        return {"run": self.run, "vm": self.vm, "started": rfc3339(self.started),
                "origin": self.origin, "source": self.source, "parent": self.parent}


def check_path(path: str, must_exist: bool) -> None:
    """Refuse a symlink or a non-regular file; a missing file when it must exist."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if must_exist:
            raise JournalError(path, "no such file") from None
        return
    except OSError as exc:
        raise JournalError(path, exc.strerror or str(exc)) from None
    if stat.S_ISLNK(st.st_mode):
        raise JournalError(path, "is a symbolic link; refusing to follow it (give the "
                                 "real path)")
    if not stat.S_ISREG(st.st_mode):
        raise JournalError(path, "is not a regular file")


def _uri(path: str, **params) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"file:{quote(os.path.abspath(path))}?{query}"


class ReadinessJournal:
    """Append-only transition log for VM ``vm_name`` in the SQLite file ``path``.

    Args:
        run, origin, source, parent: this VM instance, recorded once in ``runs``
            (``run=None``: a reader, or a writer that records no run).
        create: False opens an existing journal read-only (``kvmfilter journal``).

    Raises:
        JournalError: the file cannot be created or written, or is not a
            kvmfilter journal (checked here, before any guest runs).
    """

    def __init__(self, path: str, vm_name: str = "vm", *, create: bool = True,
                 run: Optional[str] = None, origin: str = "boot",
                 source: Optional[str] = None, parent: Optional[str] = None):
        self.path = path
        self.vm_name = vm_name
        self.run = run
        check_path(path, must_exist=not create)
        try:
            self._db = self._connect(create)
            self._check_ours(create)
            if create:
                self._db.executescript(_SCHEMA)
                self._upgrade()
                self._db.execute(f"PRAGMA application_id={APPLICATION_ID}")
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                if run is not None:
                    self._db.execute("INSERT INTO runs (run, vm, started, origin, source, "
                                     "parent) VALUES (?, ?, ?, ?, ?, ?)",
                                     (run, vm_name, time.time(), origin, source, parent))
            self._db.execute("SELECT vm, vcpu, old, new, time FROM transitions LIMIT 1")
        except (sqlite3.Error, OSError, JournalError) as exc:
            db = getattr(self, "_db", None)
            if db is not None:
                db.close()
            if isinstance(exc, JournalError):
                raise
            reason = _reason(exc) if isinstance(exc, sqlite3.Error) else exc.strerror or str(exc)
            raise JournalError(path, reason) from None
        self._lock = threading.Lock()

    def _connect(self, create: bool) -> sqlite3.Connection:
        if create:
            db = sqlite3.connect(_uri(self.path, nofollow=1), uri=True,
                                 check_same_thread=False, isolation_level=None, timeout=10.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            return db
        # Reading only: never write to (or need write access to) the file.  A WAL
        # journal on read-only media cannot get its -shm file: read it immutable.
        db = sqlite3.connect(_uri(self.path, mode="ro", nofollow=1), uri=True,
                             check_same_thread=False, timeout=10.0)
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.OperationalError as exc:
            db.close()
            if "unable to open" not in str(exc) and "readonly" not in str(exc):
                raise
        return sqlite3.connect(_uri(self.path, mode="ro", immutable=1, nofollow=1), uri=True,
                               check_same_thread=False, timeout=10.0)

    def _check_ours(self, create: bool) -> None:
        app_id = self._db.execute("PRAGMA application_id").fetchone()[0]
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        objects = self._db.execute("SELECT type, name FROM sqlite_master").fetchall()
        tables = {name for kind, name in objects if kind == "table"}
        if app_id not in (0, APPLICATION_ID):
            raise JournalError(self.path, f"an SQLite database of another application "
                                          f"(application_id {app_id:#x})")
        if version > SCHEMA_VERSION:
            raise JournalError(self.path, f"schema version {version}, this kvmfilter "
                                          f"knows up to {SCHEMA_VERSION}")
        strange = sorted(f"{kind} {name}" for kind, name in objects
                         if kind in ("trigger", "view"))
        if strange:
            raise JournalError(self.path, f"has {', '.join(strange)}: a kvmfilter journal "
                                          "has none (they could change its history)")
        if tables - _OURS:
            raise JournalError(self.path, "an SQLite database of something else "
                                          "(refusing to add a table to it)")
        if not create and "transitions" not in tables:
            raise JournalError(self.path, "not a kvmfilter journal (no transitions table)")

    def _upgrade(self) -> None:
        """Schema 1 (no runs) -> 2: add the columns; old rows keep run NULL."""
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(transitions)")}
        if "run" not in columns:
            self._db.execute("ALTER TABLE transitions ADD COLUMN run TEXT")
        if "carried" not in columns:
            self._db.execute("ALTER TABLE transitions ADD COLUMN carried INTEGER NOT NULL "
                             "DEFAULT 0")

    def record(self, t: Transition) -> None:
        """Append one transition and commit it (fsync'd: synchronous=FULL).

        Raises:
            JournalError: the commit failed (disk full, database locked ...);
                nothing was recorded.
        """
        try:
            with self._lock:
                self._db.execute("INSERT INTO transitions (vm, vcpu, old, new, time, run) "
                                 "VALUES (?, ?, ?, ?, ?, ?)",
                                 (self.vm_name, t.vcpu, t.old, t.new, t.time, self.run))
        except sqlite3.Error as exc:
            raise JournalError(self.path, f"cannot record a transition: {_reason(exc)}") \
                from None

    def continue_history(self, carried: Iterable[Transition], parent: Optional[str]) -> int:
        """A restored VM's history: copy the transitions its stream carried,
        unless this journal already holds the run they came from (the same
        journal on the same host: nothing is written twice).  Returns how many
        were copied; they are marked ``carried``.
        """
        carried = list(carried)
        try:
            with self._lock:
                if parent is not None and self._db.execute(
                        "SELECT 1 FROM transitions WHERE run = ? LIMIT 1",
                        (parent,)).fetchone():
                    return 0
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT INTO transitions (vm, vcpu, old, new, time, run, carried) "
                    "VALUES (?, ?, ?, ?, ?, ?, 1)",
                    [(self.vm_name, t.vcpu, t.old, t.new, t.time, parent) for t in carried])
                self._db.execute("COMMIT")
                return len(carried)
        except sqlite3.Error as exc:
            raise JournalError(self.path, f"cannot record the carried history: "
                                          f"{_reason(exc)}") from None

    def rows(self, vm: Optional[str] = None) -> list[JournalRow]:
        args: tuple = ()
        try:
            with self._lock:
                columns = {r[1] for r in self._db.execute("PRAGMA table_info(transitions)")}
        except sqlite3.Error as exc:
            raise JournalError(self.path, _reason(exc)) from None
        run = "run" if "run" in columns else "NULL"  # a schema-1 journal, read-only
        carried = "carried" if "carried" in columns else "0"
        query = f"SELECT id, vm, vcpu, old, new, time, {run}, {carried} FROM transitions"
        if vm is not None:
            query += " WHERE vm = ?"
            args = (vm,)
        try:
            with self._lock:
                return [JournalRow(*row[:7], bool(row[7]))
                        for row in self._db.execute(query + " ORDER BY id", args)]
        except sqlite3.Error as exc:
            raise JournalError(self.path, _reason(exc)) from None

    def runs(self, vm: Optional[str] = None) -> list[RunRow]:
        query = "SELECT run, vm, started, origin, source, parent FROM runs"
        args: tuple = ()
        if vm is not None:
            query += " WHERE vm = ?"
            args = (vm,)
        try:
            with self._lock:
                if not self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'runs'") \
                        .fetchone():
                    return []  # a schema-1 journal, read-only
                return [RunRow(*row) for row in self._db.execute(query + " ORDER BY started",
                                                                 args)]
        except sqlite3.Error as exc:
            raise JournalError(self.path, _reason(exc)) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
