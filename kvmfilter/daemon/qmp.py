"""L5: the QMP wire protocol - framing, greeting, errors and events.

QMP is a stream of JSON objects, not lines: a request may arrive in pieces,
several may arrive in one read, and nothing needs to separate them (QEMU's
``qemu.qmp`` client sends no newline).  ``JsonStream`` splits the byte stream
the way QEMU's json-streamer does: it lexes tokens, counts braces and brackets
outside strings, and hands each complete top-level value to the JSON parser.
Replies and events are written one per line.

Limits (each answered with an error, after which the stream goes on):
a request of more than ``MAX_REQUEST`` bytes, or nested deeper than
``MAX_NESTING``, is skipped to its end; a character that cannot start any JSON
token is a parse error on its own.
"""
from __future__ import annotations

import json
import re
import time
from typing import Any, Optional

from ..base import KvmfilterError

MAX_REQUEST = 64 * 1024
MAX_NESTING = 1024  # QEMU's MAX_NESTING (qobject/json-streamer.c)
MAX_SCALAR = 4096  # no real number or keyword comes near it


class QmpError(KvmfilterError):
    """An error reply: ``{"error": {"class": cls, "desc": desc}}``."""

    def __init__(self, desc: str, cls: str = "GenericError"):
        super().__init__(desc)
        self.cls = cls
        self.desc = desc

    def reply(self, id_: Any = None, has_id: bool = False) -> dict:
        msg: dict = {"error": {"class": self.cls, "desc": self.desc}}
        if has_id:
            msg["id"] = id_
        return msg


class ParseError(QmpError):
    """A request that is not JSON (``JsonStream`` yields these)."""


def event(name: str, data: Optional[dict] = None, now: Optional[float] = None) -> dict:
    """An event message with QMP's timestamp."""
    now = time.time() if now is None else now
    msg: dict = {"event": name, "timestamp": {"seconds": int(now),
                                              "microseconds": int(now % 1 * 1_000_000)}}
    if data is not None:
        msg["data"] = data
    return msg


def encode(msg: dict) -> bytes:
    """One message, one line."""
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


# -- framing ------------------------------------------------------------------------

_TOKEN = re.compile(rb"""
    (?P<ws>[ \t\n\r]+)
  | (?P<open>[{\[])
  | (?P<close>[}\]])
  | (?P<punct>[:,])
  | (?P<string>"(?:[^"\\\x00-\x1f]|\\[^\x00-\x1f])*")
  | (?P<scalar>-?[0-9][0-9.eE+-]*|[a-zA-Z]+)
""", re.VERBOSE)
# A string that has not ended (yet): its longest valid prefix, and its body
# from a given point on (so a long string arriving in pieces is scanned once).
_STRING_PREFIX = re.compile(rb'"(?:[^"\\\x00-\x1f]|\\[^\x00-\x1f])*\\?')
_STRING_BODY = re.compile(rb'(?:[^"\\\x00-\x1f]|\\[^\x00-\x1f])*')
# After a lexical error QEMU skips to a structural character, a control
# character other than tab, or 0xFE/0xFF, and lexes that afresh
# (qobject/json-lexer.c, IN_RECOVERY).
_RECOVERY = re.compile(rb"[^\x00-\x08\x0a-\x1f{}\[\]:,\xfe\xff]*")
# Skipping an over-limit value: the next byte that matters, inside and outside strings.
_SKIP_IN_STRING = re.compile(rb'[\\"\x00-\x1f]')
_SKIP_OUTSIDE = re.compile(rb'["{}\[\]]')


class JsonStream:
    """Split a byte stream into JSON values, the way QEMU's json-streamer does.

    ``feed(data)`` returns what completed: decoded values, or ``ParseError``
    for each request that could not be decoded.  Objects may be split across
    reads, several may come in one read, whitespace between them is optional.
    As in QEMU, a value is parsed once its braces and brackets balance, so
    ``{not json`` is answered only when its ``}`` arrives; a byte that cannot
    start any token is answered at once, and the input up to the next
    structural or control character is skipped.
    """

    def __init__(self, max_request: int = MAX_REQUEST, max_nesting: int = MAX_NESTING):
        self.max_request = max_request
        self.max_nesting = max_nesting
        self._tail = b""       # an incomplete token, waiting for more bytes
        self._tail_scanned = 0  # how much of an incomplete string is known good
        self._msg = bytearray()  # the tokens of the value being collected
        self._depth = 0
        self._recovering = False  # after a lexical error
        self._skipping = False  # over a limit: track the value's end, keep nothing
        self._skip_string = False
        self._skip_escape = False

    def feed(self, data: bytes) -> list:
        out: list = []
        scanned = self._tail_scanned
        if scanned:  # an unfinished string: extend it in place, scan only what is new
            text = self._tail
            text += data
            body = _STRING_BODY.match(text, scanned).end()
            if body == len(text) or (body == len(text) - 1 and text[body] == 0x5C):
                self._tail_scanned = 0
                self._wait(text, out, body)
                return out
            text = bytes(text)
        else:
            text = self._tail + data
        self._tail, self._tail_scanned = b"", 0
        pos, end = 0, len(text)
        while pos < end:
            if self._skipping:
                pos = self._skip(text, pos)
                continue
            if self._recovering:
                pos = _RECOVERY.match(text, pos).end()
                self._recovering = pos == end
                continue
            m = _TOKEN.match(text, pos)
            if m is None and pos == end - 1 and text[pos] == 0x2D:  # '-': a number begins
                self._wait(text[pos:], out)
                return out
            if m is None:
                pos = self._lexical_error(text, pos, out)
                if pos < 0:  # a string that has not ended yet
                    return out
                continue
            kind = m.lastgroup
            if kind == "scalar" and m.end() == end:  # a number or keyword may go on
                if end - pos > MAX_SCALAR:
                    out.append(ParseError("JSON parse error, a number or keyword longer "
                                          f"than {MAX_SCALAR} bytes"))
                    self._reset()
                    self._recovering = True
                    return out
                self._wait(text[pos:], out)
                return out
            pos = m.end()
            if self._depth == 0 and self._msg:  # a top-level scalar ended
                self._emit(out)
            if kind == "ws":
                continue
            if kind == "open":
                self._depth += 1
                if self._depth > self.max_nesting:
                    out.append(ParseError("JSON nesting depth limit exceeded"))
                    self._start_skipping()
                    continue
            elif kind == "close":
                self._depth -= 1
            self._msg += m.group()
            if len(self._msg) > self.max_request:
                out.append(ParseError(f"request longer than {self.max_request} bytes"))
                if self._depth > 0:
                    self._start_skipping()  # inside a structure: to its end
                else:
                    self._reset()  # a whole top-level token: nothing more to skip
                continue
            if self._depth <= 0 and kind == "close":
                self._emit(out)
        return out

    def _lexical_error(self, text: bytes, pos: int, out: list) -> int:
        """Report the bad token at ``pos`` and start recovery; -1 to wait for more."""
        bad_end = pos + 1
        if text[pos:pos + 1] == b'"':
            prefix = _STRING_PREFIX.match(text, pos).end()
            if prefix == len(text):
                self._wait(text[pos:], out, prefix - pos - (text[prefix - 1] == 0x5C))
                return -1
            bad_end = prefix + 1  # the string up to and with its bad byte
        token = text[pos:bad_end].decode("utf-8", "replace")
        out.append(ParseError(f"JSON parse error, stray '{token}'"))
        self._reset()
        self._recovering = True
        return bad_end

    def _wait(self, tail: bytes, out: list, scanned: int = 0) -> None:
        """Keep an incomplete token for the next read, within the size limit;
        ``scanned``: for a string, how many of its bytes are known good."""
        if len(self._msg) + len(tail) > self.max_request:
            out.append(ParseError(f"request longer than {self.max_request} bytes"))
            self._tail, self._tail_scanned = b"", 0
            self._start_skipping()
            if scanned:  # inside a string whose bytes so far are good: skip from here
                self._skip_string = True
                self._skip_escape = scanned == len(tail) - 1  # it ends in a backslash
            else:
                out += self.feed(tail)  # rescanned in skip mode, so its strings are tracked
            return
        # A bytearray, so a long string arriving in pieces is extended, not copied.
        if scanned and not isinstance(tail, bytearray):
            tail = bytearray(tail)
        self._tail, self._tail_scanned = tail, scanned

    def _emit(self, out: list) -> None:
        text = bytes(self._msg)
        self._reset()
        try:
            out.append(json.loads(text))
        except (ValueError, RecursionError) as exc:
            out.append(ParseError(f"JSON parse error, {exc}"))

    def _reset(self) -> None:
        self._msg = bytearray()
        self._depth = 0

    def _start_skipping(self) -> None:
        """Drop the value being collected and consume the rest of it, keeping
        only its depth and whether we are inside a string."""
        self._skipping = True
        self._skip_string = self._skip_escape = False
        self._msg = bytearray()

    def _skip(self, text: bytes, pos: int) -> int:
        """Consume the rest of an over-limit value; return where it ended."""
        end = len(text)
        depth = self._depth
        in_string, escape = self._skip_string, self._skip_escape
        while pos < end:
            if in_string:
                if escape:
                    escape, pos = False, pos + 1
                    continue
                m = _SKIP_IN_STRING.search(text, pos)
                if m is None:
                    pos = end
                    break
                pos = m.end()
                if m.group() == b"\\":
                    escape = True
                    continue
                in_string = False  # a quote, or a byte no string may hold
            else:
                m = _SKIP_OUTSIDE.search(text, pos)
                if m is None:
                    pos = end
                    break
                pos = m.end()
                c = m.group()
                if c == b'"':
                    in_string = True
                    continue
                depth += 1 if c in b"{[" else -1
            if depth <= 0:
                self._skipping = False
                depth = 0
                break
        self._depth = depth
        self._skip_string, self._skip_escape = in_string, escape
        return pos


def check_request(req: Any) -> tuple[str, dict]:
    """The command name and arguments of a request, as QEMU checks them
    (qapi/qmp-dispatch.c); raises QmpError with QEMU's wording."""
    if not isinstance(req, dict):
        raise QmpError("QMP input must be a JSON object")
    for key, value in req.items():
        if key == "execute":
            if not isinstance(value, str):
                raise QmpError("QMP input member 'execute' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise QmpError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise QmpError(f"QMP input member '{key}' is unexpected")
    if "execute" not in req:
        raise QmpError("QMP input lacks member 'execute'")
    return req["execute"], req.get("arguments", {})
