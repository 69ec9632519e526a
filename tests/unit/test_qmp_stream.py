"""QMP framing without a daemon: the JSON stream splitter and QEMU's request checks."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmfilter.daemon.commands import Param, check_arguments
from kvmfilter.daemon.qmp import JsonStream, ParseError, QmpError, check_request

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)


def feed_all(stream, data: bytes, cuts):
    out, last = [], 0
    for cut in sorted(set(cuts)) + [len(data)]:
        out += stream.feed(data[last:cut])
        last = cut
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(objects, min_size=1, max_size=6), st.data())
def test_any_split_and_any_separators_give_the_same_objects(values, data):
    seps = [data.draw(st.sampled_from(["", " ", "\n", "\r\n\t "])) for _ in values]
    text = "".join(json.dumps(v, separators=(",", ":")) + sep
                   for v, sep in zip(values, seps)).encode()
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10))
    assert feed_all(JsonStream(), text, cuts) == values


def test_one_byte_at_a_time():
    text = b'{"execute":"x","arguments":{"s":"a\\"b}{"}}[1]'
    stream = JsonStream()
    out = []
    for i in range(len(text)):
        out += stream.feed(text[i:i + 1])
    assert out == [{"execute": "x", "arguments": {"s": 'a"b}{'}}, [1]]


def errors(items):
    return [x.desc for x in items if isinstance(x, ParseError)]


def test_qemu_style_recovery():
    stream = JsonStream()
    assert stream.feed(b"{not json\n") == []  # answered when its braces balance ...
    assert errors(stream.feed(b"}")) == ["JSON parse error, Expecting property name "
                                         "enclosed in double quotes: line 1 column 2 (char 1)"]
    out = stream.feed(b'@abc\x01{"id":9}')  # a stray byte; skip to a structural char
    assert errors(out) == ["JSON parse error, stray '@'", "JSON parse error, stray '\x01'"]
    assert out[-1] == {"id": 9}
    out = stream.feed(b'"unterminated\n{"id":7}')  # a raw newline cannot be in a string
    assert errors(out) == ["JSON parse error, stray '\"unterminated\n'"] and out[-1] == {"id": 7}


def test_limits_are_answered_and_the_stream_goes_on():
    stream = JsonStream(max_request=100)
    out = stream.feed(b'{"a":"' + b"x" * 500 + b'"}{"ok":1}')
    assert errors(out) == ["request longer than 100 bytes"] and out[-1] == {"ok": 1}
    out = JsonStream().feed(b"[" * 2000 + b"]" * 2000 + b'{"ok":2}')
    assert errors(out) == ["JSON nesting depth limit exceeded"] and out[-1] == {"ok": 2}
    out = stream.feed(b"1" * 5000 + b' {"ok":3}')
    assert len(errors(out)) == 1 and out[-1] == {"ok": 3}


def test_a_long_string_in_pieces_is_scanned_once():
    """16 MiB arriving 64 KiB at a time: linear, not quadratic (a hostile server)."""
    import time
    stream = JsonStream(max_request=16 << 20)
    stream.feed(b'{"return": "')
    started = time.monotonic()
    chunk = b"x" * 65536
    out = []
    for _ in range(300):
        out += stream.feed(chunk)
    assert errors(out) == ["request longer than 16777216 bytes"]
    assert time.monotonic() - started < 10


def test_request_checks_use_qemus_words():
    assert check_request({"execute": "x", "arguments": {"a": 1}, "id": [1]}) == ("x", {"a": 1})
    for req, desc in [([1], "QMP input must be a JSON object"),
                      ({"execute": 1}, "QMP input member 'execute' must be a string"),
                      ({"execute": "x", "arguments": 1},
                       "QMP input member 'arguments' must be an object"),
                      ({"execute": "x", "bogus": 1}, "QMP input member 'bogus' is unexpected"),
                      ({"id": 1}, "QMP input lacks member 'execute'")]:
        with pytest.raises(QmpError) as exc:
            check_request(req)
        assert exc.value.desc == desc


def test_argument_schemas():
    params = (Param("uri", "str", True), Param("n", "int"), Param("on", "bool"))
    assert check_arguments(params, {"uri": "x", "n": 3, "on": True})
    for args, desc in [({}, "Parameter 'uri' is missing"),
                       ({"uri": "x", "z": 1}, "Parameter 'z' is unexpected"),
                       ({"uri": 1}, "Invalid parameter type for 'uri', expected: string"),
                       ({"uri": "x", "n": True},
                        "Invalid parameter type for 'n', expected: integer"),
                       ({"uri": "x", "on": 1},
                        "Invalid parameter type for 'on', expected: boolean")]:
        with pytest.raises(QmpError) as exc:
            check_arguments(params, args)
        assert exc.value.desc == desc


def test_an_over_limit_string_in_pieces_then_the_next_request():
    stream = JsonStream(max_request=1000)
    text = b'{"execute": "' + b"x" * 5000 + b'"}{"execute": "next"}'
    out = []
    for i in range(0, len(text), 700):
        out += stream.feed(text[i:i + 700])
    assert errors(out) == ["request longer than 1000 bytes"]
    assert out[-1] == {"execute": "next"}
