"""query-migrate's numbers without KVM: read by the QMP loop while the
migration thread writes them."""
import sys
import threading
import time

from kvmfilter.migrate.progress import Stats


def test_query_migrate_reads_the_phases_while_the_job_adds_them():
    stats = Stats(1 << 20)
    stats.status = "active"
    done = threading.Event()

    def job():  # the migration thread closes phase after phase
        n = 0
        while not done.is_set():
            stats.stop_phases[f"phase-{n}"] = 0.001
            n += 1
            if len(stats.stop_phases) > 64:
                stats.stop_phases.clear()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    thread = threading.Thread(target=job)
    thread.start()
    try:
        deadline = time.monotonic() + 1.0
        reads = 0
        while time.monotonic() < deadline:
            phases = stats.to_json().get("x-downtime-phases", {})
            assert all(v == 1.0 for v in phases.values())
            reads += 1
    finally:
        done.set()
        thread.join()
        sys.setswitchinterval(old)
    assert reads > 100
