"""L5: the ``kvmfilter`` command line.

Exit status (design.md): 0 success; 1 the guest or a check failed; 2 usage or
bad input; 4 KVM unavailable or a required capability missing.  Human output
by default, ``--json`` for one JSON document on stdout; logs go to stderr.
Heavy modules are imported inside the commands that need them: start-up time
is part of what users pay per run.
"""
from __future__ import annotations

import os
import re
import sys

import click

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_KVM = 4

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class SizeParam(click.ParamType):
    """A byte count: 1048576, 1M, 1MiB, 512K, 2G (binary units)."""
    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = _SIZE.match(str(value))
        if not m:
            self.fail(f"{value!r} is not a size (examples: 1M, 512K, 2G, 1048576)", param, ctx)
        return int(m.group(1)) * _UNITS[m.group(2).lower()]


class GuestMemorySize(SizeParam):
    """A size the machine accepts as guest RAM (checked by machine.validate_memory)."""

    def convert(self, value, param, ctx):
        from .machine import validate_memory
        size = super().convert(value, param, ctx)
        try:
            validate_memory(size)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return size


class Failure(Exception):
    """An error with its exit status, reported on one line without a traceback."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def exit_status_for(exc: BaseException) -> tuple[int, str]:
    """The one place that maps an exception to (exit status, message)."""
    from .cpuid import CpuidError
    from .journal import JournalError
    from .kvm import KvmError
    from .machine import ImageError, MissingCapabilityError

    if isinstance(exc, Failure):
        return exc.status, str(exc)
    if isinstance(exc, (ImageError, JournalError)):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, (MissingCapabilityError, CpuidError)):
        return EXIT_NO_KVM, f"{exc} (kvmfilter probe shows what this host supports)"
    if isinstance(exc, KvmError):
        if exc.ioctl.startswith("open "):
            return EXIT_NO_KVM, f"KVM is not available: {exc}"
        return EXIT_FAILED, f"KVM refused: {exc}"
    if isinstance(exc, ValueError):
        return EXIT_USAGE, str(exc)
    return EXIT_FAILED, f"internal error: {type(exc).__name__}: {exc}"


def _open_kvm():
    from .kvm import Kvm
    return Kvm()


def _emit_json(doc) -> None:
    import json
    click.echo(json.dumps(doc, indent=2))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="warning", show_default=True, help="Log records at this level and "
              "above go to stderr (console on a TTY, JSON lines otherwise).")
@click.version_option(package_name="kvmfilter")
def cli(log_level: str) -> None:
    """kvmfilter: KVM's migration-control MSR (0x4b564d08), implemented in userspace.

    Exit status: 0 success, 1 the guest or a check failed, 2 usage or bad
    input, 4 KVM unavailable or a required capability missing.
    """
    from . import logs
    logs.configure(log_level)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def probe(as_json: bool) -> None:
    """What this host's KVM advertises and what really works, proved by micro-guests."""
    from .probe import probe as run_probe

    report = run_probe(_open_kvm())
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


def run_options(f, timeout_default=10.0):
    """The options `run` and `serve` share."""
    decorators = [
        click.argument("image", required=False),
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
             plain_memory, journal, name):
    from .vmm import RunOptions

    return RunOptions(image=image, memory=memory, vcpus=vcpus, timeout=timeout,
                      migration_control=not no_migration_control,
                      map_gpa_range=not no_map_gpa_range, plain_memory=plain_memory,
                      journal=journal, name=name)


@cli.command()
@run_options
@click.option("--json", "as_json", is_flag=True, help="Print the run report as JSON.")
def run(as_json: bool, **kwargs) -> None:
    """Run IMAGE (default: the bundled conformance guest) and report.

    IMAGE is a flat real-mode binary loaded at 0x7C00 (see README), or
    bundled:NAME for a guest shipped with kvmfilter (conformance, hello,
    readiness_cycle).  Exit 0
    when the guest halts or exits through port 0xF4 with code 0 and every
    host-side check passes; 1 otherwise.
    """
    from .vmm import Vmm

    options = _options(**kwargs)
    with Vmm(None, options) as vmm:  # image and journal are checked before KVM is opened
        vmm.run(_open_kvm())
        report = vmm.report()
    if as_json:
        _emit_json(report)
    else:
        _print_report(report)
    sys.exit(EXIT_OK if report["ok"] else EXIT_FAILED)


def _print_report(r: dict) -> None:
    if r["console"]:
        click.echo(r["console"], nl=not r["console"].endswith("\n"))
    ex = r["exit"]
    click.echo(f"exit: {ex['reason']} (code {ex['code']})"
               + (f": {ex['detail']}" if ex["detail"] else ""))
    m = r["migration"]
    click.echo(f"migration control: {'advertised' if m['advertised'] else 'not advertised'}, "
               f"value {m['value']}, {'READY' if m['ready'] else 'not ready'}; "
               f"{m['accesses_total']} accesses ({m['verdicts']['ok']} ok, "
               f"{m['verdicts']['gp']} #GP), {len(m['transitions'])} transitions")
    for t in m["transitions"]:
        click.echo(f"  {t['time']}  vCPU {t['vcpu']}: {t['from']} -> {t['to']}")
    for reason in m["blocked_reasons"]:
        click.echo(f"blocked: {reason}")
    p = r["page_map"]
    if p["tracking"]:
        click.echo(f"page map: {p['shared_bytes']} bytes shared in {p['ranges']} ranges "
                   f"(hypercall exit: {p['hypercall_exit']})")
    if r["unhandled_ports"]:
        click.echo(f"unhandled ports: {len(r['unhandled_ports'])} ports, "
                   f"{sum(r['unhandled_ports'].values())} accesses")
    for c in r["checks"]:
        click.echo(f"check: {'ok' if c['ok'] else 'FAILED'} - {c['name']} "
                   f"(guest {c['guest']}, host {c['host']})")
    click.echo(f"result: {'ok' if r['ok'] else 'FAILED'}")


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--vm", "vm_name", help="Only this VM's transitions.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def journal(path: str, vm_name: str | None, as_json: bool) -> None:
    """Print the readiness history recorded in the journal PATH."""
    from .journal import ReadinessJournal

    with ReadinessJournal(path, create=False) as j:
        rows = j.rows(vm_name)
    if as_json:
        _emit_json({"path": path, "transitions": [r.to_json() for r in rows]})
        return
    if not rows:
        click.echo(f"{path}: no transitions recorded")
    for r in rows:
        t = r.to_json()
        click.echo(f"{t['time']}  {r.vm}  vCPU {r.vcpu}: {r.old} -> {r.new}"
                   f"  ({'ready' if r.new else 'not ready'})")


def serve_options(f):
    return run_options(f, timeout_default=None)


@cli.command()
@serve_options
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False),
              help="Unix socket to serve (created mode 0600).")
@click.option("--metrics-file", type=click.Path(dir_okay=False),
              help="Prometheus textfile to keep current (written atomically).")
def serve(socket_path: str, metrics_file: str | None, **kwargs) -> None:
    """Run IMAGE (default: bundled:readiness_cycle) as a daemon with a QMP-style
    control socket, until `quit`, SIGTERM or SIGINT.

    Commands: qmp_capabilities, query-status, query-migration-readiness,
    query-page-map, query-commands, query-version, stop, cont,
    system_powerdown, quit.  Events: MIGRATION_READINESS_CHANGED,
    GUEST_STOPPED, STOP, RESUME, POWERDOWN, SHUTDOWN.  Exit 0 after a clean
    shutdown; 2 if the socket is served by another process.
    """
    import signal

    from .daemon import SocketError, serve as run_daemon
    from .vmm import Vmm

    # Until the daemon's loop takes over SIGTERM/SIGINT: a stop during set-up is
    # a clean exit 0 (nothing has run, nothing to flush), not death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(EXIT_OK))
    if kwargs["image"] is None:
        kwargs["image"] = "bundled:readiness_cycle"
    options = _options(**kwargs)
    if metrics_file:
        directory = os.path.dirname(os.path.abspath(metrics_file))
        if not os.access(directory, os.W_OK):
            raise Failure(f"--metrics-file: cannot write in {directory}", EXIT_USAGE)
    with Vmm(None, options) as vmm:
        vmm.machine.kvm = _open_kvm()
        try:
            run_daemon(vmm, socket_path, metrics_file)
        except SocketError as exc:
            raise Failure(str(exc), EXIT_USAGE) from None


def _connect(socket_path: str, timeout):
    import stat

    from .daemon import QmpClient
    try:
        if not stat.S_ISSOCK(os.stat(socket_path).st_mode):
            raise Failure(f"{socket_path} is not a socket", EXIT_USAGE)
    except FileNotFoundError:
        raise Failure(f"no daemon socket at {socket_path}", EXIT_USAGE) from None
    try:
        return QmpClient(socket_path, timeout=timeout)
    except FileNotFoundError:
        raise Failure(f"no daemon socket at {socket_path}", EXIT_USAGE) from None
    except ConnectionRefusedError:
        raise Failure(f"nothing is serving {socket_path} (a stale socket?)", EXIT_USAGE) from None
    except PermissionError:
        raise Failure(f"{socket_path}: permission denied (the socket is mode 0600)",
                      EXIT_USAGE) from None
    except (OSError, EOFError, ValueError) as exc:
        raise Failure(f"{socket_path}: not a kvmfilter daemon ({exc})", EXIT_FAILED) from None


@cli.command()
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False))
@click.argument("command")
@click.option("--arguments", "arguments", default=None, metavar="JSON",
              help="The command's arguments, a JSON object.")
def query(socket_path: str, command: str, arguments: str | None) -> None:
    """Execute COMMAND on a daemon; print its return value as JSON (exit 1 on an error)."""
    import json
    args = None
    if arguments is not None:
        try:
            args = json.loads(arguments)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--arguments") from None
        if not isinstance(args, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--arguments")
    with _connect(socket_path, timeout=30.0) as client:
        try:
            reply = client.execute(command, args)
        except (EOFError, OSError, ValueError) as exc:  # OSError includes the timeout
            raise Failure(f"{socket_path}: no reply to {command}: "
                          f"{exc or type(exc).__name__}", EXIT_FAILED) from None
    if not isinstance(reply, dict) or not ("return" in reply or "error" in reply):
        raise Failure(f"{socket_path}: not a QMP reply: {reply!r:.200}", EXIT_FAILED)
    if "error" in reply:
        err = reply["error"]
        click.echo(f"kvmfilter: {command}: {err.get('class')}: {err.get('desc')}", err=True)
        sys.exit(EXIT_FAILED)
    _emit_json(reply.get("return"))


@cli.command()
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False))
def watch(socket_path: str) -> None:
    """Print the daemon's events as JSON lines until it exits."""
    import json
    with _connect(socket_path, timeout=None) as client:
        for msg in client.events:
            click.echo(json.dumps(msg))
        while True:
            try:
                msg = client.read()
            except (EOFError, ConnectionError):
                break
            except ValueError as exc:
                raise Failure(f"{socket_path}: not a QMP message: {exc}", EXIT_FAILED) from None
            if isinstance(msg, dict) and "event" in msg:
                click.echo(json.dumps(msg))
                sys.stdout.flush()


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--seconds", type=click.FloatRange(min=5, max=600), default=60.0,
              show_default=True, help="Rough time budget; sets the exits per case.")
def bench(as_json: bool, seconds: float) -> None:
    """Measure the exit path against a C loop and the in-kernel floor, start-up,
    vCPU scaling and the page map, interleaved in one run (see BENCHMARKS.md).

    Exit 1 when a target is missed (the report says which and by how much).
    """
    from .bench import format_report, run_all

    report = run_all(_open_kvm(), seconds)
    if as_json:
        _emit_json(report)
    else:
        click.echo(format_report(report))
    sys.exit(EXIT_OK if all(t["pass"] for t in report["targets"]) else EXIT_FAILED)


def main(argv=None) -> None:
    """Entry point: every error becomes one line on stderr and its exit status."""
    try:
        status = cli.main(args=argv, prog_name="kvmfilter", standalone_mode=False)
        sys.exit(status if isinstance(status, int) else EXIT_OK)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:  # click's form of KeyboardInterrupt (and EOF on a prompt)
        click.echo("kvmfilter: interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("kvmfilter: interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except BaseException as exc:
        status, message = exit_status_for(exc)
        if status == EXIT_FAILED and message.startswith("internal error"):
            import logging
            logging.getLogger("kvmfilter.cli").error("internal_error", exc_info=exc)
        click.echo(f"kvmfilter: error: {message}", err=True)
        sys.exit(status)


if __name__ == "__main__":
    main()
