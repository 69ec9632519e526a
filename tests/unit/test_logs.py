"""Logging (kvmfilter/logs.py and the CLI's --log-level/--log-format).

The CLI runs as a real process without touching /dev/kvm: ``run --memory
512G`` logs the ``large_guest_memory`` warning while the VM is described, then
opening KVM fails (KVMFILTER_DEV_KVM names a node that does not exist) with
exit 4.  Library-level behaviour runs in fresh interpreters (``python -c``),
since logging configuration is process-wide.
"""
import json
import os
import pty
import re
import subprocess
import sys
import textwrap

import pytest

ANSI = re.compile(r"\x1b\[[0-9;]*m")
WARNING_EVENT = "large_guest_memory"


def kvmfilter_cmd() -> list:
    exe = os.path.join(os.path.dirname(sys.executable), "kvmfilter")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "kvmfilter"]


@pytest.fixture
def env(tmp_path):
    """The environment without colour preferences, and no KVM to open."""
    e = {k: v for k, v in os.environ.items()
         if k not in ("NO_COLOR", "FORCE_COLOR") and not k.startswith("KVMFILTER_")}
    e["KVMFILTER_DEV_KVM"] = str(tmp_path / "no-such-kvm")
    return e


def cli(env, *args):
    p = subprocess.run(kvmfilter_cmd() + list(args), capture_output=True, text=True,
                       env=env, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 4, p.stderr  # KVM unavailable: the run got as far as opening it
    assert "Traceback" not in p.stderr and "Logging error" not in p.stderr, p.stderr
    assert p.stdout == ""
    log = [line for line in p.stderr.splitlines() if not line.startswith("kvmfilter: ")]
    return log, p.stderr


def test_auto_is_json_lines_when_not_a_tty(env):
    log, _ = cli(env, "run", "--memory", "512G")
    assert len(log) == 1, log
    record = json.loads(log[0])
    assert record["event"] == WARNING_EVENT
    assert record["level"] == "warning" and record["logger"] == "kvmfilter.vm"
    assert record["memory"] == 512 << 30  # an `extra` field, typed
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", record["timestamp"])


def test_console_format_without_a_tty_has_no_colours(env):
    log, _ = cli(env, "--log-format", "console", "run", "--memory", "512G")
    assert len(log) == 1 and WARNING_EVENT in log[0] and "[warning" in log[0]
    assert "memory=549755813888" in log[0]
    assert not ANSI.search(log[0])
    with pytest.raises(ValueError):
        json.loads(log[0])


def test_force_color_turns_colours_on(env):
    env["FORCE_COLOR"] = "1"
    log, _ = cli(env, "--log-format", "console", "run", "--memory", "512G")
    assert ANSI.search(log[0]), log
    assert WARNING_EVENT in ANSI.sub("", log[0])


def test_no_color_wins_over_force_color(env):
    env["FORCE_COLOR"] = "1"
    env["NO_COLOR"] = "1"
    log, _ = cli(env, "--log-format", "console", "run", "--memory", "512G")
    assert WARNING_EVENT in log[0] and not ANSI.search(log[0]), log


def test_options_after_the_subcommand(env):
    log, _ = cli(env, "run", "--log-level", "info", "--log-format", "json", "--memory", "512G")
    assert json.loads(log[0])["event"] == WARNING_EVENT
    log, _ = cli(env, "run", "--log-format", "console", "--memory", "512G")
    assert log and "[warning" in log[0]
    log, stderr = cli(env, "run", "--memory", "512G", "--log-level", "error")
    assert log == [] and "KVM is not available" in stderr  # the warning is below the level
    log, _ = cli(env, "--log-level", "error", "run", "--log-level", "warning", "--memory", "512G")
    assert len(log) == 1  # the subcommand's option wins: it comes last


def run_on_a_pty(args, env):
    """Run with stderr on a pseudo-terminal; return (status, what the terminal got)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(kvmfilter_cmd() + list(args), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    proc.stdout.read()
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


def test_a_tty_gets_the_coloured_console_renderer(env):
    # structlog 21.1 raised here (colours needed colorama): the floor is 21.2.
    status, tty = run_on_a_pty(["--log-level", "info", "run", "--memory", "512G"], env)
    assert status == 4, tty
    assert "Traceback" not in tty and "Logging error" not in tty, tty
    assert ANSI.search(tty), tty
    line = next(line for line in ANSI.sub("", tty).splitlines() if WARNING_EVENT in line)
    assert "[warning" in line and not line.startswith("{")
    env["NO_COLOR"] = "1"
    status, tty = run_on_a_pty(["run", "--memory", "512G"], env)
    assert status == 4 and WARNING_EVENT in tty and not ANSI.search(tty), tty


def python(code: str, env=None):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60, env=env)


# A record with a traceback, in the given format; stdout: structlog's version.
LOG_AN_EXCEPTION = """
    import logging, sys
    from importlib.metadata import version
    from kvmfilter import logs
    logs.configure("info", "{fmt}", stream=sys.stderr)
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger("kvmfilter.test").exception("it_failed", extra={{"vcpu": 3}})
    print(version("structlog"))
"""


def test_tracebacks_are_structured_in_json():
    p = python(LOG_AN_EXCEPTION.format(fmt="json"))
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr  # one JSON line, the traceback inside it
    record = json.loads(lines[0])
    assert record["event"] == "it_failed" and record["level"] == "error"
    assert record["vcpu"] == 3
    major, minor = (int(x) for x in p.stdout.strip().split(".")[:2])
    exception = record["exception"]
    if (major, minor) >= (22, 1):  # structlog's dict_tracebacks
        assert isinstance(exception, (list, dict)), exception
        frames = exception if isinstance(exception, list) else [exception]
        assert frames[0]["exc_type"] == "ZeroDivisionError"
        assert frames[0]["frames"], frames
    else:
        assert isinstance(exception, str) and "ZeroDivisionError" in exception
    assert "exc_info" not in record


def test_console_keeps_the_traceback():
    p = python(LOG_AN_EXCEPTION.format(fmt="console"))
    assert p.returncode == 0
    assert "it_failed" in p.stderr and "ZeroDivisionError: division by zero" in p.stderr


def test_an_unconfigured_library_prints_nothing():
    # Python's last-resort handler would print a bare "careful" without the NullHandler;
    # the control line shows it still prints for a logger that is not kvmfilter's.
    p = python("""
        import logging
        import kvmfilter.policy
        logging.getLogger("kvmfilter.vm").warning("careful")
        logging.getLogger("kvmfilter").error("worse")
        logging.getLogger("someone.else").warning("control")
    """)
    assert p.returncode == 0, p.stderr
    assert p.stderr == "control\n"


QUIET_RUN = """
    import os, sys
    from kvmfilter import cli
    try:
        cli.main({args!r})
    except SystemExit as exc:
        status = exc.code
    os.write(3, repr((status, "structlog" in sys.modules)).encode())
"""


def cli_in_process(args, env):
    r, w = os.pipe()
    os.set_inheritable(w, True)
    code = textwrap.dedent(QUIET_RUN.format(args=list(args))).replace("os.write(3,",
                                                                      f"os.write({w},")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, pass_fds=(w,), timeout=60)
    os.close(w)
    with os.fdopen(r) as f:
        result = f.read()
    assert result, p.stderr
    return eval(result), p  # (status, structlog imported)


def test_a_quiet_run_does_not_import_structlog(env):
    (status, imported), p = cli_in_process(["--help"], env)
    assert status in (0, None) and "Usage" in p.stdout and imported is False
    # Records below the level: never formatted, so structlog is never imported.
    (status, imported), p = cli_in_process(
        ["--log-level", "error", "run", "--memory", "512G"], env)
    assert status == 4 and imported is False, p.stderr
    # The control: the same run at the default level formats the warning.
    (status, imported), p = cli_in_process(["run", "--memory", "512G"], env)
    assert status == 4 and imported is True and WARNING_EVENT in p.stderr
