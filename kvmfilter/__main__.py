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
    cli_main()


if __name__ == "__main__":
    main()
