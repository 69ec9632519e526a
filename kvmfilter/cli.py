"""L5: the ``kvmfilter`` command line.

Exit status (docs/contracts.md): 0 success; 1 the guest or a check failed; 2
usage or bad input; 4 KVM unavailable or a required capability missing; 130
interrupted.  Human output by default, ``--json`` for one JSON document on
stdout; logs go to stderr.  Heavy modules are imported inside the commands
that need them: start-up time is part of what users pay per run.
"""
from __future__ import annotations

import os
import re
import signal
import sys

import click

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_KVM = 4
EXIT_INTERRUPTED = 130

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
        from .vm.machine import validate_memory
        size = super().convert(value, param, ctx)
        try:
            validate_memory(size)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return size


class ImageParam(click.ParamType):
    """A guest image path, or bundled:NAME (completed by the shell)."""
    name = "IMAGE"

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem
        from .vm.image import bundled_names
        if "bundled:".startswith(incomplete) or incomplete.startswith("bundled:"):
            return [CompletionItem(n) for n in bundled_names() if n.startswith(incomplete)]
        return [CompletionItem(incomplete, type="file")]


class QmpCommandParam(click.ParamType):
    """A QMP command name (completed from the daemon's command table)."""
    name = "COMMAND"

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem
        from .daemon.commands import COMMANDS
        return [CompletionItem(n) for n in COMMANDS.names() if n.startswith(incomplete)]


class Failure(Exception):
    """An error with its exit status, reported on one line without a traceback."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def exit_status_for(exc: BaseException) -> tuple[int, str]:
    """The one place that maps an exception to (exit status, message), by family."""
    from .base import BadInput, KvmfilterError, Unavailable

    if isinstance(exc, Failure):
        return exc.status, str(exc)
    if isinstance(exc, BadInput):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, Unavailable):
        if isinstance(exc, OSError):  # /dev/kvm
            return EXIT_NO_KVM, f"KVM is not available: {exc}"
        return EXIT_NO_KVM, f"{exc} (kvmfilter probe shows what this host supports)"
    if isinstance(exc, KvmfilterError):
        if isinstance(exc, OSError):  # an ioctl
            return EXIT_FAILED, f"KVM refused: {exc}"
        return EXIT_FAILED, str(exc)
    if isinstance(exc, ValueError):
        return EXIT_USAGE, str(exc)
    return EXIT_FAILED, f"internal error: {type(exc).__name__}: {exc}"


def socket_option(f):
    return click.option("--socket", "socket_path", envvar="KVMFILTER_SOCKET", required=True,
                        type=click.Path(dir_okay=False),
                        help="The daemon's socket; default $KVMFILTER_SOCKET.")(f)


def _open_kvm():
    from .kvm.ioctls import Kvm
    return Kvm()


def _emit_json(doc) -> None:
    import json
    click.echo(json.dumps(doc, indent=2))


# -- logging options: on the group and after any subcommand -----------------------------

def _set_logging(ctx, param, value):
    if value is None:
        return
    state = ctx.find_root().meta.setdefault("kvmfilter.logging", {"level": "warning",
                                                                   "format": "auto"})
    state[param.name] = value
    from . import logs
    logs.configure(state["level"], state["format"])


def logging_options(default: bool):
    def decorate(f):
        f = click.option("--log-format", "format", type=click.Choice(["auto", "console", "json"]),
                         default="auto" if default else None, expose_value=False,
                         callback=_set_logging, show_default=default,
                         help="Logs on stderr: console (a TTY's default) or JSON lines.")(f)
        return click.option("--log-level", "level",
                            type=click.Choice(["debug", "info", "warning", "error"]),
                            default="warning" if default else None, expose_value=False,
                            callback=_set_logging, show_default=default,
                            help="Log records at this level and above.")(f)
    return decorate


class _Group(click.Group):
    def command(self, *args, **kwargs):
        parent = super().command

        def decorate(f):
            return parent(*args, **kwargs)(logging_options(False)(f))
        return decorate


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@logging_options(True)
@click.version_option(package_name="kvmfilter")
def cli() -> None:
    """kvmfilter: KVM's migration-control MSR (0x4b564d08), implemented in userspace.

    Exit status: 0 success, 1 the guest or a check failed, 2 usage or bad
    input, 4 KVM unavailable or a required capability missing, 130
    interrupted.  Shell completion: eval "$(_KVMFILTER_COMPLETE=bash_source
    kvmfilter)" (zsh_source, fish_source for those shells).
    """


# -- probe ----------------------------------------------------------------------------

@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def probe(as_json: bool) -> None:
    """What this host's KVM advertises and what really works, proved by micro-guests."""
    from .base import Unavailable
    from .vm.probe import probe as run_probe

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
    from .vm.vmm import RunOptions

    return RunOptions(image=image, memory=memory, vcpus=vcpus, timeout=timeout,
                      migration_control=not no_migration_control,
                      map_gpa_range=not no_map_gpa_range, plain_memory=plain_memory,
                      journal=journal, name=name, hlt_parks=hlt_parks)


def _gate_hints(vmm) -> dict:
    from .render import GATE_HINTS
    return {b.text: GATE_HINTS[b.code] for b in vmm.blockers() if b.code in GATE_HINTS}


# Options that shape the VM: with --incoming the stream's configuration decides them.
VM_SHAPE = ("image", "memory", "vcpus", "no_migration_control", "no_map_gpa_range",
            "plain_memory")


def _incoming_overrides(ctx, kwargs: dict, **fixed) -> dict:
    """What an incoming VM takes from the command line; a usage error for any
    option the stream's configuration decides."""
    from click.core import ParameterSource
    given = [name for name in VM_SHAPE if kwargs.get(name) and (
        name == "image" or ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE)]
    if given:
        raise click.UsageError(f"--incoming takes the VM's configuration from the stream; "
                               f"drop {', '.join(n.replace('_', '-') for n in given)}")
    overrides = {"journal": kwargs["journal"], "timeout": kwargs["timeout"], **fixed}
    if ctx.get_parameter_source("name") is ParameterSource.COMMANDLINE:
        overrides["name"] = kwargs["name"]
    return overrides


def _incoming_uri(text: str, schemes):
    from .migrate.transport import parse_uri
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
    from . import render
    from .vm.vmm import Vmm

    if as_json and as_tap:
        raise click.UsageError("--json and --tap both want stdout; choose one")
    if incoming is not None:
        from .migrate.destination import restore_file
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
    from .policy.journal import ReadinessJournal

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
    from .migrate.inspect import inspect_file

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


@cli.command()
@socket_option
@click.argument("uri")
@click.option("--downtime-limit", type=click.IntRange(0, 2_000_000), metavar="MS",
              help="The longest the guest may stay stopped (QEMU's downtime-limit); "
              "default: the daemon's (300 ms).")
@click.option("--json", "as_json", is_flag=True, help="Print query-migrate's final answer.")
def migrate(socket_path: str, uri: str, downtime_limit: int | None, as_json: bool) -> None:
    """Move (or save) the VM served on --socket to URI: unix:PATH, tcp:HOST:PORT or
    file:PATH, and wait for the outcome.

    Only a guest that announced READY is moved; the migration fails (and the
    source runs on) if it takes that back.  Exit 0 when completed, 1 when
    refused or failed.
    """
    import json
    import time

    from .daemon.client import QmpClientError
    with _connect(socket_path, timeout=30.0) as client:
        try:
            if downtime_limit is not None:
                _check_reply(client.execute("migrate-set-parameters",
                                            {"downtime-limit": downtime_limit}), "migrate")
            _check_reply(client.execute("migrate", {"uri": uri}), "migrate")
            tty = sys.stderr.isatty()
            while True:
                info = _check_reply(client.execute("query-migrate"), "query-migrate")
                if info.get("status") in ("completed", "failed", "cancelled"):
                    break
                if tty:
                    _progress(info)
                time.sleep(0.1)
        except (EOFError, QmpClientError) as exc:
            raise Failure(f"{socket_path}: lost the daemon during the migration: {exc}",
                          EXIT_FAILED) from None
    if tty:
        click.echo("", err=True)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    ram = info.get("ram", {})
    if info["status"] == "completed":
        if not as_json:
            click.echo(f"completed: total {info.get('total-time')} ms, downtime "
                       f"{info.get('downtime')} ms, {ram.get('transferred')} bytes, "
                       f"{info.get('x-rounds')} rounds"
                       + (f" (pre-copy {info['x-precopy']})" if info.get("x-precopy") else ""))
        return
    click.echo(f"kvmfilter: migrate: {info['status']}: {info.get('error-desc', '')}", err=True)
    sys.exit(EXIT_FAILED)


def _check_reply(reply: dict, command: str):
    if "error" in reply:
        err = reply["error"]
        raise Failure(f"{command}: {err.get('desc')}", EXIT_FAILED)
    return reply.get("return")


def _progress(info: dict) -> None:
    ram = info.get("ram", {})
    click.echo(f"\r{info.get('status')}: round {info.get('x-rounds', 0)}, "
               f"{ram.get('transferred', 0) / 1e6:.1f} MB sent, "
               f"{ram.get('mbps', 0):.0f} Mbit/s, {ram.get('remaining', 0) / 1e6:.1f} MB "
               "dirty   ", nl=False, err=True)


# -- the daemon -----------------------------------------------------------------------

def serve_options(f):
    return run_options(f, timeout_default=None)


@cli.command()
@serve_options
@click.option("--socket", "socket_path", envvar="KVMFILTER_SOCKET", required=True,
              type=click.Path(dir_okay=False),
              help="Unix socket to serve (created mode 0600); default $KVMFILTER_SOCKET.  "
              "Under systemd socket activation, the passed socket is served instead.")
@click.option("--metrics-file", type=click.Path(dir_okay=False),
              help="Prometheus textfile to keep current (replaced atomically, mode 0644).")
@click.option("--incoming", metavar="URI",
              help="Take the VM from a migration instead of booting IMAGE: unix:PATH or "
              "tcp:HOST:PORT (listen for one source), file:PATH (a snapshot), or defer "
              "(wait for QMP migrate-incoming).  Status is inmigrate until it arrives.")
@click.pass_context
def serve(ctx, socket_path: str, metrics_file: str | None, incoming: str | None,
          **kwargs) -> None:
    """Run IMAGE (default: bundled:ready_wait) as a daemon with a QMP control
    socket, until `quit`, SIGTERM or SIGINT.

    In a daemon HLT waits for the power button (`system_powerdown`) instead of
    ending the vCPU, so the default guest - it announces READY and waits in
    HLT - costs no CPU.  bundled:readiness_cycle toggles readiness for a demo.
    Commands: see `kvmfilter query --socket S query-commands`.  Exit 0 after a
    clean shutdown; 2 if the socket is served by another process.
    """
    from .daemon.metrics import check_metrics_path
    from .daemon.notify import activated_socket
    from .daemon.server import serve as run_daemon
    from .vm.vmm import Vmm

    # Until the daemon's loop takes over SIGTERM/SIGINT: a stop during set-up is
    # a clean exit 0 (nothing has run, nothing to flush), not death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(EXIT_OK))
    if metrics_file:
        check_metrics_path(metrics_file)
    uri = None
    if incoming is not None:
        overrides = _incoming_overrides(ctx, kwargs, hlt_parks=True)
        uri = None if incoming == "defer" else _incoming_uri(incoming, ("file", "unix", "tcp"))
        vmm = None
    else:
        if kwargs["image"] is None:
            kwargs["image"] = "bundled:ready_wait"
        vmm = Vmm(None, _options(hlt_parks=True, **kwargs))  # image, journal checked first
    try:
        try:
            listen_socket = activated_socket()
        except ValueError as exc:
            raise Failure(f"socket activation: {exc}", EXIT_USAGE) from None
        kvm = _open_kvm()
        incoming_job = None
        if uri is not None and uri.scheme == "file":  # a snapshot: restore before serving
            from .migrate.destination import restore_file
            vmm, _ = restore_file(kvm, uri.path, **overrides)
        elif uri is not None:
            from .migrate.destination import Incoming
            incoming_job = Incoming(kvm, uri, **overrides)
            incoming_job.listen()  # the address is taken (or refused) before we go on
        status = run_daemon(vmm, kvm, socket_path, metrics_file, listen_socket,
                            incoming_job, kwargs["name"],
                            overrides if incoming is not None else {})
    finally:
        if vmm is not None:
            vmm.close()
    sys.exit(status)


def _connect(socket_path: str, timeout):
    import stat

    from .daemon.client import QmpClient, QmpClientError
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
    except (OSError, EOFError, QmpClientError) as exc:
        raise Failure(f"{socket_path}: not a kvmfilter daemon ({exc})", EXIT_FAILED) from None


@cli.command()
@socket_option
@click.argument("command", type=QmpCommandParam())
@click.option("--arguments", "arguments", default=None, metavar="JSON",
              help="The command's arguments, a JSON object.")
@click.option("--timeout", type=click.FloatRange(min=0.001), default=30.0, show_default=True,
              help="Seconds to wait for the daemon (connecting and the reply).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the whole reply ({\"return\": ...} or {\"error\": ...}).")
def query(socket_path: str, command: str, arguments: str | None, timeout: float,
          as_json: bool) -> None:
    """Execute COMMAND on a daemon; print its return value as JSON (exit 1 on an error)."""
    import json

    from .daemon.client import QmpClientError
    args = None
    if arguments is not None:
        try:
            args = json.loads(arguments)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--arguments") from None
        if not isinstance(args, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--arguments")
    with _connect(socket_path, timeout=timeout) as client:
        try:
            reply = client.execute(command, args)
        except (EOFError, QmpClientError) as exc:
            raise Failure(f"{socket_path}: no reply to {command}: "
                          f"{exc or type(exc).__name__}", EXIT_FAILED) from None
    if as_json:
        _emit_json(reply)
    if "error" in reply:
        err = reply["error"]
        click.echo(f"kvmfilter: {command}: {err.get('class')}: {err.get('desc')}", err=True)
        sys.exit(EXIT_FAILED)
    if not as_json:
        _emit_json(reply.get("return"))


@cli.command()
@socket_option
@click.option("--json", "as_json", is_flag=True,
              help="JSON lines (the default; the flag is accepted for symmetry).")
def watch(socket_path: str, as_json: bool) -> None:
    """Print the daemon's events as JSON lines until it shuts down.

    Exit 0 when the stream ends with SHUTDOWN; 1 when it ends any other way
    (the daemon dropped this client, or died).
    """
    import json

    from .daemon.client import QmpClientError
    with _connect(socket_path, timeout=None) as client:
        last = None
        for msg in client.events:
            click.echo(json.dumps(msg))
            last = msg.get("event")
        while True:
            try:
                msg = client.read()
            except (EOFError, QmpClientError) as exc:
                if last == "SHUTDOWN":
                    return
                reason = "closed the connection" if isinstance(exc, EOFError) else str(exc)
                raise Failure(f"{socket_path}: the event stream ended without SHUTDOWN: "
                              f"the daemon {reason} (too slow a reader is dropped)",
                              EXIT_FAILED) from None
            if "event" in msg:
                click.echo(json.dumps(msg))
                sys.stdout.flush()
                last = msg["event"]


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
              help="Interleaved rounds per case.")
def bench(as_json: bool, seconds: float, only: tuple, rounds: int) -> None:
    """Measure the MSR exit path against a C loop and the in-kernel floor,
    start-up, vCPU scaling, the page map, and live migration and snapshots
    side by side with QEMU, interleaved in one run (see BENCHMARKS.md).

    Exit 1 when a target is missed (the report says which and by how much); a
    target the host was too busy to judge is UNRELIABLE, one whose comparator
    (QEMU) is missing is N/A, and neither fails the run.
    """
    from .bench import GROUPS, format_report, run_all

    report = run_all(_open_kvm(), seconds, only=only or GROUPS, rounds=rounds)
    if as_json:
        _emit_json(report)
    else:
        click.echo(format_report(report))
    sys.exit(EXIT_OK if all(t["pass"] for t in report["targets"]) else EXIT_FAILED)


# -- entry point ----------------------------------------------------------------------

def main(argv=None) -> None:
    """Entry point: every error becomes one line on stderr and its exit status."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # __main__ set a quieter one
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
    except (click.Abort, KeyboardInterrupt):  # click.Abort is its form of Ctrl-C
        click.echo("kvmfilter: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit:
        raise
    except BaseException as exc:
        status, message = exit_status_for(exc)
        if status == EXIT_FAILED and message.startswith("internal error"):
            import logging
            logging.getLogger("kvmfilter.cli").error("internal_error", exc_info=exc)
        click.echo(f"kvmfilter: error: {message}", err=True)
        sys.exit(status)
