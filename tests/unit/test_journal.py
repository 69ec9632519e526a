"""ReadinessJournal: SQLite WAL, one row per transition, clear errors."""
import sqlite3

import pytest

from kvmfilter.policy.journal import JournalError, ReadinessJournal
from kvmfilter.policy.readiness import MigrationControl, Op

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
