"""How the bench drives one migration over QMP, against scripted replies (no VMM)."""
import time

from kvmfilter.bench.common import migrate_over_qmp


class ScriptedQmp:
    """Answers each command from its own script, in order (the last answer
    repeats); ``events``: sent once ``migrate`` is asked (at once without it)."""

    def __init__(self, scripts: dict, events=()):
        self.scripts = {name: list(replies) for name, replies in scripts.items()}
        self.later = list(events)
        self.events = [] if "migrate" in scripts else self.later
        self.asked: list[str] = []

    def execute(self, command, arguments=None):
        self.asked.append(command)
        if command == "migrate":
            self.events += self.later
        replies = self.scripts[command]
        return {"return": replies.pop(0) if len(replies) > 1 else replies[0]}


def event(name, at):
    return {"event": name, "timestamp": {"seconds": int(at),
                                         "microseconds": int(at % 1 * 1e6)}}


def test_a_completed_status_read_before_qemu_has_timed_it_is_asked_again():
    # QEMU 7.2 sets "completed" a moment before it computes total-time and
    # downtime: a query in between reads 0 for both.
    now = time.time()
    source = ScriptedQmp({
        "migrate-set-parameters": [{}], "migrate": [{}],
        "query-migrate": [{"status": "active"},
                          {"status": "completed", "total-time": 0, "downtime": 0},
                          {"status": "completed", "total-time": 7, "downtime": 3,
                           "setup-time": 1, "ram": {"transferred": 4096}}],
        "query-status": [{"status": "postmigrate"}]}, events=[event("STOP", now + 0.004)])
    dest = ScriptedQmp({"query-status": [{"status": "running"}]},
                       events=[event("RESUME", now + 0.007)])
    out = migrate_over_qmp(source, dest, "unix:/nowhere", {"downtime-limit": 300}, "QEMU")
    assert (out["total_ms"], out["downtime_ms"], out["setup_ms"]) == (7, 3, 1)
    assert source.asked.count("query-migrate") == 3
    assert abs(out["paused_ms"] - 3) < 0.01


def test_a_completed_migration_is_asked_once():
    now = time.time()
    source = ScriptedQmp({
        "migrate-set-parameters": [{}], "migrate": [{}],
        "query-migrate": [{"status": "completed", "total-time": 9, "downtime": 2}],
        "query-status": [{"status": "postmigrate"}]}, events=[event("STOP", now)])
    dest = ScriptedQmp({"query-status": [{"status": "running"}]},
                       events=[event("RESUME", now + 0.002)])
    out = migrate_over_qmp(source, dest, "unix:/nowhere", {}, "kvmfilter")
    assert out["total_ms"] == 9 and source.asked.count("query-migrate") == 1
