"""The suite's own guard: a test that blocks is ended by its time limit (conftest.py)."""
import subprocess
import sys
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_a_blocked_test_is_ended_not_left_hanging(tmp_path):
    probe = tmp_path / "test_blocks.py"
    probe.write_text("import socket, pytest\n"
                     "@pytest.mark.time_limit(1)\n"
                     "def test_blocks():\n"
                     "    a, b = socket.socketpair()\n"
                     "    a.recv(1)\n")
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "--rootdir", str(tmp_path), str(probe)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 1
    assert "TimeoutError: the test ran longer than 1 s" in p.stdout
