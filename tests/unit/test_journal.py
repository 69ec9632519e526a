"""ReadinessJournal: SQLite WAL, one row per transition, clear errors."""
import os
import pathlib
import sqlite3
import subprocess

import pytest

from kvmfilter.policy.journal import JournalError, ReadinessJournal
from kvmfilter.policy.readiness import MigrationControl, Op, Transition

WRMSR = Op.WRMSR


def test_transitions_round_trip(tmp_path):
    path = str(tmp_path / "j.db")
    mc = MigrationControl()
    with ReadinessJournal(path, "vm-a") as j:
        mc.add_recorder(j.record)
        for data in (1, 1, 0, 2, 1):
            mc.access(3, WRMSR, data)
    with ReadinessJournal(path, create=False) as j:
        rows = j.rows()
    assert [(r.vm, r.vcpu, r.old, r.new) for r in rows] == [
        ("vm-a", 3, 0, 1), ("vm-a", 3, 1, 0), ("vm-a", 3, 0, 1)]
    assert rows[0].to_json()["time"].endswith("Z")
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_many_vms_one_file(tmp_path):
    path = str(tmp_path / "j.db")
    for name in ("a", "b"):
        mc = MigrationControl()
        with ReadinessJournal(path, name) as j:
            mc.add_recorder(j.record)
            mc.access(0, WRMSR, 1)
    with ReadinessJournal(path, create=False) as j:
        assert [r.vm for r in j.rows()] == ["a", "b"]
        assert [r.vm for r in j.rows("b")] == ["b"]


def test_committed_before_access_returns(tmp_path):
    path = str(tmp_path / "j.db")
    mc = MigrationControl()
    with ReadinessJournal(path, "vm") as j:
        mc.add_recorder(j.record)
        mc.access(0, WRMSR, 1)
        # Another connection (another process after a crash) already sees it.
        other = sqlite3.connect(path)
        assert other.execute("SELECT count(*) FROM transitions").fetchone()[0] == 1
        other.close()


def test_corrupt_file_is_refused(tmp_path):
    path = tmp_path / "bad.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JournalError, match="not an SQLite database"):
        ReadinessJournal(str(path))


def test_foreign_database_is_refused(tmp_path):
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE users (id INTEGER)")
    con.commit()
    con.close()
    with pytest.raises(JournalError, match="something else"):
        ReadinessJournal(str(path))


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(JournalError, match=str(tmp_path / "nope")):
        ReadinessJournal(str(tmp_path / "nope" / "j.db"))


def test_unwritable_place_is_refused():
    # /proc refuses new files even to root, unlike a chmod'ed directory.
    with pytest.raises(JournalError, match="/proc/kvmfilter-journal.db"):
        ReadinessJournal("/proc/kvmfilter-journal.db")


def test_reading_a_missing_journal(tmp_path):
    with pytest.raises(JournalError, match="no such file"):
        ReadinessJournal(str(tmp_path / "none.db"), create=False)


# -- hardening (files in world-writable places, as root) -----------------------------

def test_a_planted_symlink_is_refused_and_nothing_is_created(tmp_path):
    target = tmp_path / "elsewhere.db"
    link = tmp_path / "j.db"
    link.symlink_to(target)
    with pytest.raises(JournalError, match="symbolic link"):
        ReadinessJournal(str(link))
    assert not target.exists()


@pytest.mark.parametrize("kind", ["fifo", "dev_null", "directory"])
def test_non_regular_files_are_refused_without_blocking(tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
    elif kind == "directory":
        path = tmp_path
    else:
        path = pathlib.Path("/dev/null")
    for create in (True, False):
        with pytest.raises(JournalError, match="not a regular file"):
            ReadinessJournal(str(path), create=create)
    assert not pathlib.Path("/dev/null-journal").exists()
    assert not pathlib.Path("/dev/null-wal").exists()


def test_another_applications_database_is_refused(tmp_path):
    path = tmp_path / "app.db"
    con = sqlite3.connect(path)
    con.execute("PRAGMA application_id = 12345")
    con.commit()
    con.close()
    with pytest.raises(JournalError, match="application_id 0x3039"):
        ReadinessJournal(str(path))


def test_a_journal_with_a_trigger_is_refused(tmp_path):
    """A trigger that deletes rows passed the old "is this our file" check."""
    path = str(tmp_path / "j.db")
    ReadinessJournal(path, "vm").close()
    con = sqlite3.connect(path)
    con.execute("CREATE TRIGGER forget AFTER INSERT ON transitions "
                "BEGIN DELETE FROM transitions; END")
    con.commit()
    con.close()
    for create in (True, False):
        with pytest.raises(JournalError, match="trigger forget"):
            ReadinessJournal(path, create=create)


def test_runs_tell_instances_with_the_same_name_apart(tmp_path):
    path = str(tmp_path / "j.db")
    for run in ("run-1", "run-2"):
        mc = MigrationControl()
        with ReadinessJournal(path, "same-name", run=run) as j:
            mc.add_recorder(j.record)
            mc.access(0, WRMSR, 1)
            mc.access(0, WRMSR, 0)
    with ReadinessJournal(path, create=False) as j:
        rows = j.rows("same-name")
        runs = j.runs("same-name")
    assert [(r.run, r.old, r.new) for r in rows] == [
        ("run-1", 0, 1), ("run-1", 1, 0), ("run-2", 0, 1), ("run-2", 1, 0)]
    assert [(r.run, r.origin) for r in runs] == [("run-1", "boot"), ("run-2", "boot")]


def test_a_restored_run_continues_without_gap_or_duplicate(tmp_path):
    path = str(tmp_path / "j.db")
    mc = MigrationControl()
    with ReadinessJournal(path, "vm", run="first") as j:
        mc.add_recorder(j.record)
        mc.access(0, WRMSR, 1)
    carried = mc.transitions()
    # Restored into the same journal: the parent's rows are there already.
    with ReadinessJournal(path, "vm", run="second", origin="restore", source="file:/s",
                          parent="first") as j:
        assert j.continue_history(carried, "first") == 0
    # Into a journal on another host: the carried history is copied, marked.
    other = str(tmp_path / "other.db")
    with ReadinessJournal(other, "vm", run="third", origin="incoming",
                          source="tcp:10.0.0.1:4444", parent="first") as j:
        assert j.continue_history(carried, "first") == 1
    with ReadinessJournal(path, create=False) as j:
        assert [(r.run, r.origin, r.parent) for r in j.runs()] == [
            ("first", "boot", None), ("second", "restore", "first")]
        assert len(j.rows()) == 1
    with ReadinessJournal(other, create=False) as j:
        assert [(r.run, r.carried, r.old, r.new) for r in j.rows()] == [("first", True, 0, 1)]
        assert j.runs()[0].source == "tcp:10.0.0.1:4444"


def test_a_schema_1_journal_is_read_and_upgraded(tmp_path):
    path = str(tmp_path / "old.db")
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE transitions (id INTEGER PRIMARY KEY AUTOINCREMENT, vm TEXT NOT NULL,
            vcpu INTEGER NOT NULL, old INTEGER NOT NULL, new INTEGER NOT NULL,
            time REAL NOT NULL);
        INSERT INTO transitions (vm, vcpu, old, new, time) VALUES ('vm', 0, 0, 1, 1.0);
        PRAGMA user_version = 1;""")
    con.close()
    with ReadinessJournal(path, create=False) as j:  # read as it is
        assert [(r.run, r.new) for r in j.rows()] == [(None, 1)] and j.runs() == []
    with ReadinessJournal(path, "vm", run="new") as j:  # upgraded on write
        j.record(Transition(0, 1, 0, 2.0))
    with ReadinessJournal(path, create=False) as j:
        assert [(r.run, r.new) for r in j.rows()] == [(None, 1), ("new", 0)]


def test_a_wal_journal_on_read_only_media_is_readable(tmp_path):
    path = tmp_path / "ro" / "j.db"
    path.parent.mkdir()
    mc = MigrationControl()
    with ReadinessJournal(str(path), "vm", run="r") as j:
        mc.add_recorder(j.record)
        mc.access(0, WRMSR, 1)
    for leftover in path.parent.glob("j.db-*"):
        leftover.unlink()
    # A read-only bind mount, as a recovery host would have it.
    ro = tmp_path / "mnt"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(path.parent), str(ro)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount read-only here (needs root and mount)")
    try:
        with ReadinessJournal(str(ro / "j.db"), create=False) as j:
            assert [r.new for r in j.rows()] == [1]
    finally:
        subprocess.run(["umount", str(ro)], check=True)
