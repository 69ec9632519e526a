"""L5: the commands around ``kvmfilter serve``: migrate, serve, query, watch."""
from __future__ import annotations

import os
import signal
import sys

import click

from . import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, Failure, QmpCommandParam, _emit_json, _open_kvm,
               cli, socket_option)
from .guest import _incoming_overrides, _incoming_uri, _options, run_options


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

    from ..daemon.client import QmpClientError
    from ..migrate.progress import ENDED
    with _connect(socket_path, timeout=30.0) as client:
        try:
            if downtime_limit is not None:
                _check_reply(client.execute("migrate-set-parameters",
                                            {"downtime-limit": downtime_limit}), "migrate")
            _check_reply(client.execute("migrate", {"uri": uri}), "migrate")
            tty = sys.stderr.isatty()
            while True:
                info = _check_reply(client.execute("query-migrate"), "query-migrate")
                if info.get("status") in ENDED:
                    break
                if tty:
                    _progress(info)
                # Ask again as soon as the MIGRATION event says it ended, or
                # after 0.1 s (the progress line; a server that sends no
                # MIGRATION events, as QEMU without the events capability).
                client.wait_event("MIGRATION", lambda data: data.get("status") in ENDED)
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
              "(wait for QMP migrate-incoming).  Status is inmigrate until it arrives.  "
              "With unix:, tcp: or defer, --memory, --vcpus, --plain-memory, "
              "--no-migration-control and --no-map-gpa-range say the source's VM (as "
              "QEMU's destination is started with the source's machine): it is built "
              "before the daemon answers QMP, and a stream for another VM is refused.")
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
    from ..daemon.metrics import check_metrics_path
    from ..daemon.notify import activated_socket
    from ..daemon.server import serve as run_daemon
    from ..vm.vmm import Vmm

    # Until the daemon's loop takes over SIGTERM/SIGINT: a stop during set-up is
    # a clean exit 0 (nothing has run, nothing to flush), not death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(EXIT_OK))
    if metrics_file:
        check_metrics_path(metrics_file)
    uri = None
    if incoming is not None:
        uri = None if incoming == "defer" else _incoming_uri(incoming, ("file", "unix", "tcp"))
        overrides = _incoming_overrides(ctx, kwargs, may_prepare=uri is None or
                                        uri.scheme != "file", hlt_parks=True)
        vmm = None
    else:
        if kwargs["image"] is None:
            kwargs["image"] = "bundled:ready_wait"
        vmm = Vmm(None, _options(hlt_parks=True, **kwargs))  # image, journal checked first
    incoming_job = None
    try:
        try:
            listen_socket = activated_socket()
        except ValueError as exc:
            raise Failure(f"socket activation: {exc}", EXIT_USAGE) from None
        kvm = _open_kvm()
        if uri is not None and uri.scheme == "file":  # a snapshot: restore before serving
            from ..migrate.destination import restore_file
            vmm, _ = restore_file(kvm, uri.path, **overrides)
        elif uri is not None:
            from ..migrate.destination import Incoming
            incoming_job = Incoming(kvm, uri, **overrides)
            incoming_job.listen()  # the address is taken (or refused) before we go on
            incoming_job.set_up()  # the VM is built before QMP answers
        status = run_daemon(vmm, kvm, socket_path, metrics_file, listen_socket,
                            incoming_job, kwargs["name"],
                            overrides if incoming is not None else {})
    finally:
        if vmm is not None:
            vmm.close()
        if incoming_job is not None:
            incoming_job.close()  # a VM built for a source that never came
    sys.exit(status)


def _connect(socket_path: str, timeout):
    import stat

    from ..daemon.client import QmpClient, QmpClientError
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

    from ..daemon.client import QmpClientError
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

    from ..daemon.client import QmpClientError
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
