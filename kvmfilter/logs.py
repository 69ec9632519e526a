"""L5: configure logging once, for the CLI.

Library modules log through the standard ``logging`` module with an event name
as the message and fields in ``extra``, so an embedding VMM keeps its own
logging; the package's logger has a ``NullHandler``, so an embedder that
configures nothing sees nothing.

The CLI renders those records through structlog's ``ProcessorFormatter``:
a console renderer (colours on a TTY, honouring ``NO_COLOR``/``FORCE_COLOR``)
or JSON lines, always on stderr, tracebacks as structured data.  structlog is
imported on the first record that passes the level, so a quiet run does not
pay for it.
"""
from __future__ import annotations

import logging
import os
import sys

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("auto", "console", "json")

# LogRecord attributes that are not user fields.
_RECORD_KEYS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}


def _from_record(logger, method_name, event_dict):
    """Level, logger name and ``extra`` fields of the stdlib record behind an
    event (written here rather than taken from structlog, whose helpers for
    this arrived in different releases)."""
    record = event_dict.get("_record")
    if record is not None:
        event_dict["level"] = record.levelname.lower()
        event_dict["logger"] = record.name
        for key, value in vars(record).items():
            if key not in _RECORD_KEYS and key not in event_dict:
                event_dict[key] = value
    return event_dict


def colours_wanted(stream) -> bool:
    """NO_COLOR (any value) wins, then FORCE_COLOR, then whether it is a TTY."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return hasattr(stream, "isatty") and stream.isatty()


class _LazyFormatter(logging.Formatter):
    """Builds the structlog ProcessorFormatter on the first record it formats."""

    def __init__(self, json_lines: bool, colours: bool):
        super().__init__()
        self.json_lines = json_lines
        self.colours = colours
        self._inner = None

    def _build(self) -> logging.Formatter:
        import structlog  # deferred: costs tens of milliseconds at start-up

        processors = structlog.processors
        if self.json_lines:
            # Structured tracebacks where this structlog has them (22.1+).
            tracebacks = getattr(processors, "dict_tracebacks", processors.format_exc_info)
            json_renderer = processors.JSONRenderer()

            def render(logger, name, event_dict):
                event_dict.pop("_from_structlog", None)
                return json_renderer(logger, name, tracebacks(logger, name, event_dict))
        else:
            console = structlog.dev.ConsoleRenderer(colors=self.colours)

            def render(logger, name, event_dict):
                event_dict.pop("_from_structlog", None)
                return console(logger, name, event_dict)
        pre_chain = [processors.TimeStamper(fmt="iso", utc=True), _from_record]
        return structlog.stdlib.ProcessorFormatter(processor=render,
                                                   foreign_pre_chain=pre_chain)

    def format(self, record: logging.LogRecord) -> str:
        if self._inner is None:
            self._inner = self._build()
        return self._inner.format(record)


def configure(level: str = "warning", fmt: str = "auto", stream=None) -> None:
    """Send kvmfilter's records at ``level`` and above to ``stream`` (stderr)."""
    stream = stream or sys.stderr
    root = logging.getLogger("kvmfilter")
    for handler in list(root.handlers):
        if not isinstance(handler, logging.NullHandler):
            root.removeHandler(handler)
    tty = hasattr(stream, "isatty") and stream.isatty()
    json_lines = fmt == "json" or (fmt == "auto" and not tty)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_LazyFormatter(json_lines, colours_wanted(stream)))
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
