"""L5: the ``kvmfilter`` command line.

Exit status (docs/contracts.md): 0 success; 1 the guest or a check failed; 2
usage or bad input; 4 KVM unavailable or a required capability missing; 130
interrupted.  Human output by default, ``--json`` for one JSON document on
stdout; logs go to stderr.  Heavy modules are imported inside the commands
that need them: start-up time is part of what users pay per run.

This module has the group, the exit statuses, the shared option types and
``main``; the commands are in ``guest`` (probe, run, journal, inspect),
``daemon`` (serve, query, watch, migrate) and ``bench``, each module imported
when one of its commands is asked for (``COMMAND_MODULES``).
"""
from __future__ import annotations

import importlib
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
        from ..vm.machine import validate_memory
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
        from ..vm.image import bundled_names
        if "bundled:".startswith(incomplete) or incomplete.startswith("bundled:"):
            return [CompletionItem(n) for n in bundled_names() if n.startswith(incomplete)]
        return [CompletionItem(incomplete, type="file")]


class QmpCommandParam(click.ParamType):
    """A QMP command name (completed from the daemon's command table)."""
    name = "COMMAND"

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem
        from ..daemon.commands import COMMANDS
        return [CompletionItem(n) for n in COMMANDS.names() if n.startswith(incomplete)]


class Failure(Exception):
    """An error with its exit status, reported on one line without a traceback."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def exit_status_for(exc: BaseException) -> tuple[int, str]:
    """The one place that maps an exception to (exit status, message), by family."""
    from ..base import BadInput, KvmfilterError, Unavailable

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
    from ..kvm.ioctls import Kvm
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
    from .. import logs
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


# The module that registers each command, imported when the command is asked
# for: `kvmfilter run` then loads neither the daemon's commands nor the
# bench's (importing the CLI and finding `run`: 98.1 -> 95.0 ms here, medians
# of 40 fresh interpreters, alternating).
COMMAND_MODULES = {"probe": "guest", "run": "guest", "journal": "guest", "inspect": "guest",
                   "serve": "daemon", "query": "daemon", "watch": "daemon",
                   "migrate": "daemon", "bench": "bench"}


class _Group(click.Group):
    def command(self, *args, **kwargs):
        parent = super().command

        def decorate(f):
            return parent(*args, **kwargs)(logging_options(False)(f))
        return decorate

    def list_commands(self, ctx) -> list[str]:
        return sorted(COMMAND_MODULES)

    def get_command(self, ctx, name: str):
        module = COMMAND_MODULES.get(name)
        if module is not None and name not in self.commands:
            importlib.import_module(f"{__package__}.{module}")  # it registers its commands
        return super().get_command(ctx, name)


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

