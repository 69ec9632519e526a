"""L5: configure logging once, for the CLI.

Library modules log through the standard ``logging`` module with an event
name as the message and fields in ``extra`` (so an embedding VMM keeps its own
logging).  The CLI routes those records through structlog: a console renderer
on a TTY, JSON lines otherwise, always to stderr.  structlog is imported on the
first record that passes the level, so a quiet run does not pay for it.
"""
from __future__ import annotations

import logging
import sys

LEVELS = ("debug", "info", "warning", "error")

# LogRecord attributes that are not user fields.
_RECORD_KEYS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class _StructlogHandler(logging.Handler):
    def __init__(self, stream, json_lines: bool):
        super().__init__()
        self.stream = stream
        self.json_lines = json_lines
        self._render = None

    def _renderer(self):
        import structlog  # deferred: costs tens of milliseconds at start-up

        processors = [structlog.processors.TimeStamper(fmt="iso", utc=True)]
        if self.json_lines:
            processors.append(structlog.processors.JSONRenderer(sort_keys=False))
        else:
            processors.append(structlog.dev.ConsoleRenderer(colors=self.stream.isatty()))
        chain = processors

        def render(event_dict):
            for proc in chain:
                event_dict = proc(None, event_dict["level"], event_dict)
            return event_dict

        return render

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._render is None:
                self._render = self._renderer()
            event = {"event": record.getMessage(), "level": record.levelname.lower(),
                     "logger": record.name}
            for key, value in vars(record).items():
                if key not in _RECORD_KEYS:
                    event[key] = value
            if record.exc_info:
                event["exception"] = logging.Formatter().formatException(record.exc_info)
            self.stream.write(str(self._render(event)) + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)


def configure(level: str = "warning", stream=None) -> None:
    """Send kvmfilter's records at ``level`` and above to stderr (once)."""
    stream = stream or sys.stderr
    root = logging.getLogger("kvmfilter")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    json_lines = not (hasattr(stream, "isatty") and stream.isatty())
    root.addHandler(_StructlogHandler(stream, json_lines))
    root.setLevel(level.upper())
    root.propagate = False
