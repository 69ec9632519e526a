"""L5: the commands that run a guest or read what one left: probe, run, journal,
inspect."""
from __future__ import annotations

import sys

import click

from . import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_NO_KVM, EXIT_OK, EXIT_USAGE, Failure,
               GuestMemorySize, ImageParam, _emit_json, _open_kvm, cli, exit_status_for)


# -- probe ----------------------------------------------------------------------------

@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def probe(as_json: bool) -> None:
    """What this host's KVM advertises and what really works, proved by micro-guests."""
    from ..base import Unavailable
    from ..vm.probe import probe as run_probe

    try:
        report = run_probe(_open_kvm())
    except Unavailable as exc:
        if not as_json:
            raise
        _, message = exit_status_for(exc)
        _emit_json({"ok": False, "error": message, "api_version": None, "features": {}})
        sys.exit(EXIT_NO_KVM)
    if as_json:
        _emit_json(report)
    else:
        click.echo(f"KVM API version {report['api_version']}, backend {report['backend']}")
        for name, f in report["features"].items():
            state = ("working" if f["working"] else
                     "advertised, NOT working" if f["advertised"] else "not advertised")
            click.echo(f"  {name:<15} {state}")
            click.echo(f"  {'':<15} {f['detail']}")
        click.echo("migration control: " + ("supported" if report["ok"] else "NOT supported"))
    if not report["ok"]:
        sys.exit(EXIT_NO_KVM)


# -- run ------------------------------------------------------------------------------

def run_options(f, timeout_default=10.0):
    """The options `run` and `serve` share."""
    decorators = [
        click.argument("image", required=False, type=ImageParam()),
        click.option("--timeout", type=click.FloatRange(min=0.001, max=366 * 86400),
                     default=timeout_default, show_default=timeout_default is not None,
                     help="Seconds before the VM is stopped (even if KVM_RUN spins)"
                     + ("." if timeout_default is not None else "; default: no limit.")),
        click.option("--memory", type=GuestMemorySize(), default="1M", show_default=True,
                     help="Guest RAM (multiple of 4 KiB, 1 MiB .. 1 TiB)."),
        click.option("--vcpus", type=click.IntRange(1, 64), default=1, show_default=True,
                     help="vCPUs; each starts at 0x7C00 with SI = its index."),
        click.option("--no-migration-control", is_flag=True,
                     help="Leave CPUID 0x40000001 bit 17 clear: every access to "
                     "0x4b564d08 gets #GP."),
        click.option("--no-map-gpa-range", is_flag=True,
                     help="Do not enable the KVM_HC_MAP_GPA_RANGE exit (CPUID bit 16 clear)."),
        click.option("--plain-memory", is_flag=True,
                     help="Model a VM without encrypted memory: the MSR starts at 1 "
                     "and no page map is tracked."),
        click.option("--journal", type=click.Path(dir_okay=False),
                     help="SQLite file to append every readiness transition to."),
        click.option("--name", default="vm", show_default=True,
                     help="VM name in the journal and metrics."),
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


def _options(image, timeout, memory, vcpus, no_migration_control, no_map_gpa_range,
             plain_memory, journal, name, hlt_parks=False):
    from ..vm.vmm import RunOptions

    return RunOptions(image=image, memory=memory, vcpus=vcpus, timeout=timeout,
                      migration_control=not no_migration_control,
                      map_gpa_range=not no_map_gpa_range, plain_memory=plain_memory,
                      journal=journal, name=name, hlt_parks=hlt_parks)


def _gate_hints(vmm) -> dict:
    from ..render import GATE_HINTS
    return {b.text: GATE_HINTS[b.code] for b in vmm.blockers() if b.code in GATE_HINTS}


# Options that shape the VM: with --incoming the stream's configuration decides them.
VM_SHAPE = ("image", "memory", "vcpus", "no_migration_control", "no_map_gpa_range",
            "plain_memory")


def _incoming_overrides(ctx, kwargs: dict, may_prepare: bool = False, **fixed) -> dict:
    """What an incoming VM takes from the command line; a usage error for any
    option the stream's configuration decides.

    ``may_prepare`` (serve --incoming unix:, tcp:, defer): the VM's shape
    options are allowed, as a QEMU destination is started with the source's
    machine, and become ``prepare``: the VM is built before the source
    connects, and a stream for another shape is refused.
    """
    from click.core import ParameterSource
    given = [name for name in VM_SHAPE if kwargs.get(name) and (
        name == "image" or ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE)]
    if given and (not may_prepare or "image" in given):
        raise click.UsageError(f"--incoming takes the VM's configuration from the stream; "
                               f"drop {', '.join(n.replace('_', '-') for n in given)}")
    overrides = {"journal": kwargs["journal"], "timeout": kwargs["timeout"], **fixed}
    if given:
        overrides["prepare"] = {
            "memory": kwargs["memory"], "vcpus": kwargs["vcpus"],
            "migration_control": not kwargs["no_migration_control"],
            "map_gpa_range": not kwargs["no_map_gpa_range"],
            "plain_memory": kwargs["plain_memory"]}
    if ctx.get_parameter_source("name") is ParameterSource.COMMANDLINE:
        overrides["name"] = kwargs["name"]
    return overrides


def _incoming_uri(text: str, schemes):
    from ..migrate.transport import parse_uri
    try:
        return parse_uri(text, schemes)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--incoming") from None


@cli.command()
@run_options
@click.option("--incoming", metavar="file:PATH",
              help="Restore the VM saved in PATH (a snapshot: `migrate` to file:) and "
              "run it instead of booting IMAGE.")
@click.option("--json", "as_json", is_flag=True, help="Print the run report as JSON.")
@click.option("--tap", "as_tap", is_flag=True,
              help="Print strict TAP 13 (the guest's results, the host's checks, the "
              "exit) and nothing else on stdout.")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False),
              help="Also write the results as JUnit XML to this file (for CI).")
@click.pass_context
def run(ctx, incoming, as_json: bool, as_tap: bool, junit_path, **kwargs) -> None:
    """Run IMAGE (default: the bundled conformance guest) and report.

    IMAGE is a flat real-mode binary loaded at 0x7C00 (see README), or
    bundled:NAME for a guest shipped with kvmfilter.  Exit 0 when the guest
    halts or exits through port 0xF4 with code 0 and every host-side check
    passes; 1 otherwise; 130 when interrupted (the partial report is printed).
    """
    from .. import render
    from ..vm.vmm import Vmm

    if as_json and as_tap:
        raise click.UsageError("--json and --tap both want stdout; choose one")
    if incoming is not None:
        from ..migrate.destination import restore_file
        uri = _incoming_uri(incoming, ("file",))
        overrides = _incoming_overrides(ctx, kwargs, hlt_parks=False)
        kvm = _open_kvm()
        vmm, _ = restore_file(kvm, uri.path, **overrides)
    else:
        vmm, kvm = Vmm(None, _options(**kwargs)), None  # image and journal checked first
    interrupted = False
    with vmm:
        try:
            vmm.run(kvm or _open_kvm())
        except KeyboardInterrupt:
            if vmm.result is None:
                raise
            interrupted = True
        report = vmm.report()
        hints = _gate_hints(vmm)
    if junit_path:
        try:
            with open(junit_path, "wb") as f:
                f.write(render.junit(report))
        except OSError as exc:
            raise Failure(f"--junit {junit_path}: {exc.strerror or exc}", EXIT_USAGE) from None
    if as_json:
        _emit_json(report)
    elif as_tap:
        click.echo(render.tap(report))
    else:
        click.echo(render.human(report, hints))
    if interrupted:
        click.echo("kvmfilter: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(EXIT_OK if report["ok"] else EXIT_FAILED)


# -- journal --------------------------------------------------------------------------

@cli.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--vm", "vm_name", help="Only this VM's transitions.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def journal(path: str, vm_name: str | None, as_json: bool) -> None:
    """Print the readiness history recorded in the journal PATH.

    Each VM instance is a run: a boot, or a restore or incoming migration that
    continues the run it came from.  Transitions a restore copied from its
    stream (the journal did not hold them yet) are marked "carried".
    """
    from ..policy.journal import ReadinessJournal

    with ReadinessJournal(path, create=False) as j:
        rows = j.rows(vm_name)
        runs = j.runs(vm_name)
    if as_json:
        _emit_json({"path": path, "runs": [r.to_json() for r in runs],
                    "transitions": [r.to_json() for r in rows]})
        return
    for r in runs:
        started = r.to_json()["started"]
        how = ("booted" if r.origin == "boot" else
               f"{'restored' if r.origin == 'restore' else 'migrated in'} from {r.source}"
               + (f", continuing run {r.parent[:8]}" if r.parent else ""))
        click.echo(f"run {r.run[:8]}  {r.vm}  {how}  ({started})")
    if not rows:
        click.echo(f"{path}: no transitions recorded")
    for r in rows:
        t = r.to_json()
        click.echo(f"{t['time']}  {r.vm}  vCPU {r.vcpu}: {r.old} -> {r.new}"
                   f"  ({'ready' if r.new else 'not ready'})"
                   + (f"  [run {r.run[:8]}{', carried' if r.carried else ''}]"
                      if r.run else ""))


# -- snapshots and migration ----------------------------------------------------------

@cli.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def inspect(path: str, as_json: bool) -> None:
    """Show what the snapshot PATH holds, verifying every checksum (exit 2 if damaged)."""
    from ..migrate.inspect import inspect_file

    info = inspect_file(path)
    if as_json:
        _emit_json(info)
        return
    f, vm = info["format"], info["config"].get("vm", {})
    click.echo(f"{path}: kvmfilter stream version {f['version']}, {f['sections']} sections, "
               f"{f['bytes']} bytes, checksums verified")
    src = info["config"].get("source", {})
    click.echo(f"VM {vm.get('name')!r} ({vm.get('label')}): {vm.get('memory')} bytes of "
               f"memory, {vm.get('vcpus')} vCPUs; saved by kvmfilter "
               f"{info['config'].get('kvmfilter')} on {info['config'].get('host')} "
               f"(run {src.get('run')})")
    ram = info["ram"]
    click.echo(f"RAM: {ram['pages']} pages with data ({ram['bytes']} bytes) in "
               f"{ram['ranges_total']} ranges, {ram['zero_pages']} zero pages")
    for v in info["vcpus"]:
        click.echo(f"vCPU {v['index']}: {v.get('mode')} mode, RIP {v.get('rip', 0):#x}, "
                   f"{v['msrs']} MSRs")
    r = info["readiness"]
    if r:
        click.echo(f"migration control: {'advertised' if r['advertised'] else 'not advertised'}"
                   f", value {r['value']}, {'READY' if r['ready'] else 'not ready'} since "
                   f"{r['since']}; {r['transitions_total']} transitions, "
                   f"{r['accesses_total']} accesses")
        for t in r["transitions"][-10:]:
            click.echo(f"  {t['time']}  vCPU {t['vcpu']}: {t['from']} -> {t['to']}")
    pm = info["page_map"] or {}
    if pm.get("tracking"):
        shared = sum(e - b for b, e in pm.get("ranges", []))
        click.echo(f"page map: {shared} bytes shared in {len(pm.get('ranges', []))} ranges")
