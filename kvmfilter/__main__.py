"""``python -m kvmfilter`` and the ``kvmfilter`` command.

Kept tiny on purpose: a Ctrl-C that arrives while the CLI is still importing
(click, structlog, cffi: tens of milliseconds) ends the process with one line
and status 130 instead of a KeyboardInterrupt traceback.  ``cli.main`` puts
Python's own handler back once it can report the interruption itself.
"""
import _signal  # not signal: that one builds its enums first (milliseconds)
import os


def _interrupted_early(signum, frame):
    os.write(2, b"kvmfilter: interrupted\n")
    os._exit(130)


def main() -> None:
    _signal.signal(_signal.SIGINT, _interrupted_early)
    from .cli import main as cli_main
    try:
        cli_main()
    except SystemExit as exc:
        _exit(exc.code)
    _exit(0)


def _exit(status) -> None:
    """Exit as ``sys.exit(status)`` would - output flushed, logging shut down -
    without tearing the interpreter down: that teardown took 35 ms on our
    hosts, a fifth of a ``kvmfilter run``, after the work was done (every
    command closes what it opened, and its threads, before it returns)."""
    import logging
    import sys

    if status is None:
        code = 0
    elif isinstance(status, int):
        code = status
    else:  # sys.exit("message"): printed, status 1
        print(status, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 120  # what Python exits with when the final flush fails
    os._exit(code)


if __name__ == "__main__":
    main()
