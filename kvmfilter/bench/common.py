"""What every benchmark case shares: summaries, interleaving, and how busy the
host was while it ran.

These hosts drift 10-15% between runs and have 2 cores, so cases are compared
only inside one run, interleaved over rounds, and cases record the CPU time
they got per second of wall time: a target whose case could not get the cores
it needs is marked unreliable, not passed or failed.  The run also records the
load averages before and after.
"""
from __future__ import annotations

import math
import os
import platform
import resource
import shutil
import statistics
import sys
import time

from ..migrate.progress import ENDED


def summarize(samples: list[float], unit: str) -> dict:
    return {f"median_{unit}": statistics.median(samples), "min": min(samples),
            "max": max(samples), "samples": len(samples)}


def paired(ours: list, theirs: list) -> dict:
    """Rounds run back to back, compared pair by pair: in how many ours was
    lower, higher, the same; and ``p``, the chance of ours being higher in
    that many rounds or more if neither were really higher (a one-sided sign
    test).  A median ratio above 1 with a large ``p`` is noise the run could
    not resolve, not a difference."""
    lower = sum(a < b for a, b in zip(ours, theirs))
    higher = sum(a > b for a, b in zip(ours, theirs))
    n = lower + higher
    p = sum(math.comb(n, k) for k in range(higher, n + 1)) / 2 ** n
    return {"lower": lower, "higher": higher, "ties": len(ours) - n, "p": round(p, 4)}


def interleave(cases: dict, rounds: int) -> dict:
    """Run every case once per round, in turn; {name: [samples]}."""
    samples: dict = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            samples[name].append(case())
    return samples


def marginal(measure, count):
    """A case whose sample is the cost per unit, (T(2n) - T(n)) / n in ns, with
    the CPU share of the longer run: ``measure(k)`` runs k units and returns
    seconds.  Set-up, thread start and any first-accesses slow path cancel out."""
    def sample():
        (short, _), (long, share) = timed(lambda: measure(count))(), \
            timed(lambda: measure(2 * count))()
        return (long - short) / count * 1e9, share
    return sample


def kvmfilter_command() -> list[str]:
    """How to start this installation's ``kvmfilter`` (its script, else ``-m``)."""
    exe = shutil.which("kvmfilter", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "kvmfilter"]


def host_info(kvm) -> dict:
    from ..vm.probe import _backend
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "backend": _backend(),
            "python": platform.python_version(), "api_version": kvm.get_api_version()}


def cpu_seconds() -> float:
    """CPU time this process and its waited-for children have had."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(case):
    """Wrap ``case()`` to also record the CPU share it got: (result, cpu_s / wall_s)."""
    def run():
        cpu, wall = cpu_seconds(), time.monotonic()
        result = case()
        return result, (cpu_seconds() - cpu) / max(time.monotonic() - wall, 1e-9)
    return run


def host_load() -> dict:
    """The load averages and CPU count, recorded with every run."""
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}


def unreliable(cpu_share: float, cores_needed: float, slack: float = 0.15) -> str | None:
    """Why a result cannot be judged, or None: the case could not get the cores
    it needs (another process took them), so its numbers measure the neighbours.

    ``cpu_share``: the median CPU time the case got per second of wall time.
    """
    if cpu_share < cores_needed * (1 - slack):
        return (f"the case got {cpu_share:.2f} CPUs of the {cores_needed} it needs "
                f"(load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")
    return None


def _event_time(ev: dict) -> float:
    return ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6


def event_time(client, name: str, timeout: float = 5.0) -> float:
    """When ``client``'s VMM sent its first event ``name`` (QMP timestamp:
    the host's wall clock, the same for both VMMs and for this process);
    waits for it, collecting events with ``query-status``."""
    deadline = time.monotonic() + timeout
    while True:
        for ev in client.events:
            if ev.get("event") == name:
                return _event_time(ev)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {name} event within {timeout:g} s")
        client.execute("query-status")  # collects the events sent meanwhile


POLL_S = 0.005


def migrate_over_qmp(source, dest, uri: str, params: dict, who: str, timeout: float = 120,
                     failed=RuntimeError) -> dict:
    """Drive one live migration the way a QEMU user does, for either VMM: set
    ``params``, ``migrate`` to ``uri``, poll ``query-migrate`` until it ends,
    wait for the destination to run.  ``source``, ``dest``: ``QmpClient``s.
    ``failed(message)`` makes the exception for a migration that did not
    complete (QEMU's adds its destination's log).

    Returns the numbers both VMMs report, and two measured the same way for
    both, on one clock: ``paused_ms``, how long the guest was stopped (the
    source's STOP event to the destination's RESUME), and ``move_ms``, how
    long the move took (``migrate`` sent to the destination's RESUME).  Each
    VMM's own ``total-time`` ends at its source's completion: QEMU's before
    its destination has loaded the device state, kvmfilter's after its
    destination has loaded everything.
    """
    def execute(client, command, arguments=None):
        reply = client.execute(command, arguments)
        if "error" in reply:
            raise RuntimeError(f"{who} {command}: {reply['error'].get('desc')}")
        return reply["return"]

    execute(source, "migrate-set-parameters", params)
    source.events.clear()  # the STOP to look for is the one this migration sends
    began = time.time()
    execute(source, "migrate", {"uri": uri})
    deadline = time.monotonic() + timeout
    while (info := execute(source, "query-migrate")).get("status") not in ENDED:
        if time.monotonic() > deadline:
            source.execute("migrate_cancel")
            raise RuntimeError(f"{who} migration still {info.get('status')} "
                               f"after {timeout:g} s")
        time.sleep(POLL_S)
    if info["status"] != "completed":
        raise failed(f"{who} migration {info['status']}: "
                     f"{info.get('error-desc', 'no error-desc')}")
    # QEMU 7.2 says "completed" a moment before it computes total-time and
    # downtime (migration_completion sets the state; migration_iteration_finish
    # then takes the lock and calculates them): a query in between reads 0 for
    # both - 1 QEMU migration in 40 here.  Ask again until they are there.
    settled = time.monotonic() + 1
    while not info.get("total-time") and time.monotonic() < settled:
        time.sleep(POLL_S / 5)
        info = execute(source, "query-migrate")
    end = time.monotonic() + 10  # both destinations resume on their own
    while (state := execute(dest, "query-status")["status"]) != "running":
        if time.monotonic() > end:
            raise RuntimeError(f"{who} destination is {state!r} after migration")
        time.sleep(POLL_S)
    resumed = event_time(dest, "RESUME")
    return {"total_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
            "paused_ms": (resumed - event_time(source, "STOP")) * 1000,
            "move_ms": (resumed - began) * 1000,
            "downtime_to_started_ms": info.get("x-downtime-to-started"),
            "setup_ms": info.get("setup-time"),
            "transferred_bytes": info.get("ram", {}).get("transferred"),
            "downtime_phases_ms": info.get("x-downtime-phases")}
