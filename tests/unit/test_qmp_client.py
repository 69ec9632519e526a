"""The QMP client's event wait against a scripted server (no KVM, no daemon)."""
import json
import os
import shutil
import socket
import tempfile
import threading
import time

import pytest

from kvmfilter.daemon.client import QmpClient, QmpClientError

GREETING = {"QMP": {"version": {}, "capabilities": []}}


def event(name, **data):
    return {"event": name, "data": data, "timestamp": {"seconds": 1, "microseconds": 0}}


@pytest.fixture
def server():
    """A server that greets, accepts qmp_capabilities, then sends what the
    test puts in ``send`` (a list of (delay_s, message)) and holds the line."""
    where = tempfile.mkdtemp(prefix="kvmf-qmp-", dir="/tmp")  # a socket path is short
    path = os.path.join(where, "qmp.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    script: list = []
    done = threading.Event()

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.sendall(json.dumps(GREETING).encode() + b"\r\n")
            conn.recv(4096)  # qmp_capabilities
            conn.sendall(b'{"return": {}}\r\n')
            for delay, msg in script:
                time.sleep(delay)
                conn.sendall(json.dumps(msg).encode() + b"\r\n")
            done.wait(10)

    thread = threading.Thread(target=serve, daemon=True)
    yield path, script, thread
    done.set()
    thread.join(10)
    listener.close()
    shutil.rmtree(where)


def test_wait_event_returns_the_match_and_keeps_every_event(server):
    path, script, thread = server
    script += [(0, event("MIGRATION_PASS", **{"pass": 1})),
               (0, event("MIGRATION", status="active")),
               (0.05, event("MIGRATION", status="completed"))]
    thread.start()
    with QmpClient(path, timeout=5) as c:
        ev = c.wait_event("MIGRATION", lambda d: d.get("status") == "completed", timeout=5)
        assert ev["data"] == {"status": "completed"}
        assert [e["event"] for e in c.events] == ["MIGRATION_PASS", "MIGRATION", "MIGRATION"]
        # Kept: asked again, it is found without reading.
        assert c.wait_event("MIGRATION", lambda d: d.get("status") == "completed") is ev
        assert c.wait_event("MIGRATION_PASS", timeout=0)["data"] == {"pass": 1}


def test_wait_event_gives_up_after_its_timeout_and_the_client_goes_on(server):
    path, script, thread = server
    script += [(0, event("MIGRATION", status="active")),
               (1.0, event("SHUTDOWN", reason="host-qmp-quit"))]
    thread.start()
    with QmpClient(path, timeout=5) as c:
        assert c.wait_event("MIGRATION", lambda d: d.get("status") == "completed",
                            timeout=0.1) is None
        # Back well before the next event (1 s later) came in.
        assert [e["data"] for e in c.events] == [{"status": "active"}]
        assert c.timeout == 5 and c.sock.gettimeout() == 5  # its own timeout back
        assert c.wait_event("SHUTDOWN", timeout=5)["data"] == {"reason": "host-qmp-quit"}


def test_a_reply_while_waiting_for_an_event_is_a_protocol_error(server):
    path, script, thread = server
    script += [(0, {"return": {}})]
    thread.start()
    with QmpClient(path, timeout=5) as c:
        with pytest.raises(QmpClientError, match="a reply nobody asked for"):
            c.wait_event("MIGRATION", timeout=5)
