"""QMP as real clients speak it: QEMU's own qemu.qmp and qmp-shell against a real
daemon, and the wire rules of docs/contracts.md (a JSON stream, QEMU's wording)."""
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from daemons import DaemonProcess, poll, raw, send, short_tmp  # noqa: F401


@pytest.fixture
def daemon(kvm, short_tmp):
    d = DaemonProcess(short_tmp, "bundled:readiness_cycle")
    yield d
    d.kill()


def test_qemu_qmp_client_runs_every_command(daemon):
    """Connect, negotiate (it sends no newline), every command, an error, events."""
    from qemu.qmp import ExecuteError, QMPClient

    async def session():
        client = QMPClient("kvmfilter-test")
        await client.connect(daemon.socket)
        out = {"greeting": client.greeting}
        names = [c["name"] for c in await client.execute("query-commands")]
        out["names"] = names
        with client.listener() as events:
            out["status"] = await client.execute("query-status")
            out["version"] = await client.execute("query-version")
            out["readiness"] = await client.execute("query-migration-readiness")
            out["page_map"] = await client.execute("query-page-map")
            out["migrate"] = await client.execute("query-migrate")
            out["params"] = await client.execute("query-migrate-parameters")
            await client.execute("migrate-set-parameters", {"downtime-limit": 100})
            out["params2"] = await client.execute("query-migrate-parameters")
            await client.execute("stop")
            out["paused"] = (await client.execute("query-status"))["status"]
            await client.execute("cont")
            await client.execute("migrate_cancel")
            try:
                await client.execute("migrate", {"uri": 42})
            except ExecuteError as exc:
                out["error"] = (exc.error_class, str(exc))
            try:
                await client.execute("no-such-command")
            except ExecuteError as exc:
                out["not_found"] = exc.error_class
            seen = []
            async for ev in events:
                seen.append(ev["event"])
                if "MIGRATION_READINESS_CHANGED" in seen and "RESUME" in seen:
                    break
            out["events"] = seen
            await client.execute("system_powerdown")
            await client.execute("quit")
        await client.disconnect()
        return out

    out = asyncio.run(asyncio.wait_for(session(), 60))
    assert set(out["greeting"].QMP.version["qemu"]) == {"major", "minor", "micro"}
    assert {"qmp_capabilities", "query-status", "migrate", "migrate-incoming",
            "query-migrate-parameters", "system_powerdown", "quit"} <= set(out["names"])
    assert out["status"]["status"] == "running"
    assert out["version"]["package"].startswith("kvmfilter")
    assert "blocked-reasons" in out["readiness"]
    assert "shared-bytes" in out["page_map"]
    assert out["migrate"] == {}
    assert out["params"]["downtime-limit"] == 300 and out["params2"]["downtime-limit"] == 100
    assert out["paused"] == "paused"
    assert out["error"] == ("GenericError", "Invalid parameter type for 'uri', expected: string")
    assert out["not_found"] == "CommandNotFound"
    assert "STOP" in out["events"] and "RESUME" in out["events"]
    assert daemon.proc.wait(15) == 0


def test_qmp_shell_runs_a_command(daemon):
    shell = shutil.which("qmp-shell", path=os.path.dirname(sys.executable))
    assert shell, "qmp-shell comes with qemu.qmp, a test dependency"
    p = subprocess.run([shell, "-p", daemon.socket], input="query-status\n",
                       capture_output=True, text=True, timeout=30,
                       env={**os.environ, "HOME": str(daemon.socket.rsplit("/", 1)[0])})
    assert p.returncode == 0, p.stderr
    assert "Connected to QEMU" in p.stdout and '"status": "running"' in p.stdout


def test_requests_are_a_json_stream_not_lines(daemon):
    s, f, _ = raw(daemon.socket)
    # No newline at all, and two objects in one write.
    s.sendall(b'{"execute":"qmp_capabilities"}{"execute":"query-status","id":1}')
    assert json.loads(f.readline()) == {"return": {}}
    assert json.loads(f.readline())["id"] == 1
    # One object split across writes, whitespace anywhere.
    s.sendall(b'  {"execute":\n "query-')
    time.sleep(0.1)
    s.sendall(b'version", "id": "x"}\t')
    assert json.loads(f.readline())["id"] == "x"
    s.close()


def test_errors_use_qemus_wording(daemon):
    s, f, _ = raw(daemon.socket)
    before = send(s, f, {"execute": "query-status"})
    assert before["error"] == {"class": "CommandNotFound", "desc": "Expecting capabilities "
                               "negotiation with 'qmp_capabilities'"}
    bad_cap = send(s, f, {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
    assert bad_cap["error"]["desc"] == "Capability oob not available"
    unknown = send(s, f, {"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}})
    assert unknown["error"]["desc"] == "Parameter 'null' does not accept value 'x'"  # sic, QEMU
    assert send(s, f, {"execute": "qmp_capabilities", "arguments": {"enable": []},
                       "id": 7}) == {"return": {}, "id": 7}
    cases = [
        ({"execute": "qmp_capabilities"}, "CommandNotFound",
         "Capabilities negotiation is already complete, command ignored"),
        ({"execute": "query-status", "x": 1}, "GenericError",
         "QMP input member 'x' is unexpected"),
        ({"execute": 42}, "GenericError", "QMP input member 'execute' must be a string"),
        ({"execute": "stop", "arguments": [1]}, "GenericError",
         "QMP input member 'arguments' must be an object"),
        ({"arguments": {}}, "GenericError", "QMP input lacks member 'execute'"),
        ([1, 2], "GenericError", "QMP input must be a JSON object"),
        ({"execute": "stop", "arguments": {"x": 1}}, "GenericError",
         "Parameter 'x' is unexpected"),
        ({"execute": "migrate", "arguments": {}}, "GenericError",
         "Parameter 'uri' is missing"),
        ({"execute": "migrate-set-parameters", "arguments": {"downtime-limit": "9"}},
         "GenericError", "Invalid parameter type for 'downtime-limit', expected: integer"),
        ({"execute": "no-such"}, "CommandNotFound", "The command no-such has not been found"),
    ]
    for request, cls, desc in cases:
        reply = send(s, f, request)
        assert reply["error"] == {"class": cls, "desc": desc}, request
    # Garbage: answered when its braces balance (as QEMU does), then the stream goes on.
    s.sendall(b"{not json\n")
    s.sendall(b"}\n")
    assert json.loads(f.readline())["error"]["desc"].startswith("JSON parse error")
    assert "stray" in send(s, f, b"@\n")["error"]["desc"]
    huge = b'{"execute": "' + b"x" * (1 << 20) + b'"}'
    assert "longer than" in send(s, f, huge)["error"]["desc"]
    deep = send(s, f, b"[" * 30000)
    assert deep["error"]["desc"] == "JSON nesting depth limit exceeded"
    s.sendall(b"]" * 30000)
    assert send(s, f, {"execute": "query-status", "id": 9})["return"]["status"] == "running"
    s.close()


def test_events_before_negotiation_are_not_sent(daemon):
    s, f, _ = raw(daemon.socket)
    s.settimeout(1.5)
    try:
        line = f.readline()
    except socket.timeout:
        line = b""
    assert line == b""  # nothing until qmp_capabilities, though the guest toggles
    s.close()


def test_many_vanishing_clients_and_one_that_never_reads(daemon):
    hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hog.connect(daemon.socket)
    try:  # requests whose replies it never reads: the daemon may drop it mid-way
        hog.sendall(b'{"execute": "qmp_capabilities"}' + b'{"execute": "query-commands"}' * 20000)
    except (BrokenPipeError, ConnectionResetError):
        pass
    for i in range(50):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(daemon.socket)
        if i % 2:
            s.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-st')
        s.close()
    started = time.monotonic()
    with daemon.client() as c:
        assert c.execute("query-status")["return"]["status"] == "running"
    assert time.monotonic() - started < 5.0
    hog.close()
    assert daemon.proc.poll() is None


def test_one_clients_burst_does_not_starve_another(daemon):
    """Requests are served one at a time per client, yielding between them."""
    burst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    burst.connect(daemon.socket)
    burst.sendall(b'{"execute": "qmp_capabilities"}'
                  + b'{"execute": "query-migration-readiness"}' * 5000)
    started = time.monotonic()
    with daemon.client() as c:
        c.execute("query-status")
    took = time.monotonic() - started
    burst.close()
    assert took < 2.0, f"a second client waited {took:.1f} s behind another's burst"
