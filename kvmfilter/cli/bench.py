"""L5: ``kvmfilter bench`` (the measurements are in ``kvmfilter.bench``)."""
from __future__ import annotations

import sys

import click

from . import EXIT_FAILED, EXIT_OK, _emit_json, _open_kvm, cli


# -- bench ----------------------------------------------------------------------------

@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--seconds", type=click.FloatRange(min=5, max=600), default=60.0,
              show_default=True, help="Rough time budget of the MSR cases; sets the "
              "exits per case.")
@click.option("--only", multiple=True, metavar="GROUP",
              type=click.Choice(["msr", "startup", "scaling", "page-map", "migration",
                                 "snapshot"]),
              help="Run only this group (repeatable): msr, startup, scaling, page-map, "
                   "migration, snapshot.  Default: all.")
@click.option("--rounds", type=click.IntRange(1, 50), default=5, show_default=True,
              help="Interleaved rounds per case (10x as many for live migration of guests "
                   "up to 32 MiB: one such move differs from the next by 2-3 ms).")
def bench(as_json: bool, seconds: float, only: tuple, rounds: int) -> None:
    """Measure the MSR exit path against a C loop and the in-kernel floor,
    start-up, vCPU scaling, the page map, and live migration and snapshots
    side by side with QEMU, interleaved in one run (see BENCHMARKS.md).

    Exit 1 when a target is missed (the report says which and by how much); a
    target the host was too busy to judge is UNRELIABLE, one whose comparator
    (QEMU) is missing is N/A, and neither fails the run.
    """
    from ..bench import GROUPS, format_report, run_all

    report = run_all(_open_kvm(), seconds, only=only or GROUPS, rounds=rounds)
    if as_json:
        _emit_json(report)
    else:
        click.echo(format_report(report))
    sys.exit(EXIT_OK if all(t["pass"] for t in report["targets"]) else EXIT_FAILED)
