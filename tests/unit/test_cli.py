"""The CLI's error paths and exit statuses, in-process through main() (no guest runs)."""
import json

import pytest

from kvmfilter import cli
from kvmfilter.policy.journal import ReadinessJournal
from kvmfilter.policy.readiness import MigrationControl, Op

WRMSR = Op.WRMSR


def invoke(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        cli.main(list(args))
    out, err = capsys.readouterr()
    code = exc.value.code if exc.value.code is not None else 0
    return code, out, err


def test_help_lists_the_commands(capsys):
    code, out, _ = invoke(capsys, "--help")
    assert code == 0
    for name in cli.COMMAND_MODULES:  # listed without importing each module first
        assert f"\n  {name} " in out
    assert "Exit status" in out


def test_each_command_is_registered_by_the_module_the_lazy_table_names():
    import importlib
    for module in set(cli.COMMAND_MODULES.values()):
        importlib.import_module(f"kvmfilter.cli.{module}")
    assert set(cli.cli.commands) == set(cli.COMMAND_MODULES)  # none missing from the table
    for name, module in cli.COMMAND_MODULES.items():
        assert cli.cli.commands[name].callback.__module__ == f"kvmfilter.cli.{module}", name


def test_run_loads_neither_the_daemon_nor_the_bench_commands():
    # A fresh interpreter: this one may have imported every command module.
    import subprocess
    import sys
    probe = ("import sys, kvmfilter.cli as c; assert c.cli.get_command(None, 'run'); "
             "print(sorted(m for m in sys.modules if m.startswith('kvmfilter.cli')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "['kvmfilter.cli', 'kvmfilter.cli.guest']"


@pytest.mark.parametrize("args, needle", [
    (("run", "/nonexistent/guest.bin"), "No such file"),
    (("run", "--memory", "lots"), "is not a size"),
    (("run", "--memory", "1000"), "multiple of 4 KiB"),
    (("run", "--memory", "64K"), "outside"),
    (("run", "--vcpus", "0"), "--vcpus"),
    (("run", "--vcpus", "many"), "--vcpus"),
    (("run", "--timeout", "0"), "--timeout"),
    (("run", "--timeout", "-1"), "--timeout"),
    (("run", "--bogus"), "No such option"),
    (("frobnicate",), "No such command"),
])
def test_bad_input_exits_2_without_traceback(capsys, args, needle):
    code, out, err = invoke(capsys, *args)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err


def test_empty_image(capsys, tmp_path):
    image = tmp_path / "empty.bin"
    image.write_bytes(b"")
    code, _, err = invoke(capsys, "run", str(image))
    assert code == 2 and "empty" in err


def test_oversized_image(capsys, tmp_path):
    image = tmp_path / "big.bin"
    image.write_bytes(bytes(0xA0000 - 0x7C00 + 1))
    code, _, err = invoke(capsys, "run", str(image))
    assert code == 2 and "must fit" in err


def test_image_that_is_a_directory(capsys, tmp_path):
    code, _, err = invoke(capsys, "run", str(tmp_path))
    assert code == 2 and "Traceback" not in err


def test_corrupt_journal_exits_2_before_kvm(capsys, tmp_path, monkeypatch):
    # /dev/kvm is pointed at nothing: the journal must be refused first (exit 2, not 4).
    monkeypatch.setenv("KVMFILTER_DEV_KVM", str(tmp_path / "no-kvm"))
    bad = tmp_path / "j.db"
    bad.write_bytes(b"garbage" * 200)
    code, _, err = invoke(capsys, "run", "--journal", str(bad))
    assert code == 2
    assert str(bad) in err and "not an SQLite database" in err


def test_missing_dev_kvm_exits_4_with_a_hint(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KVMFILTER_DEV_KVM", str(tmp_path / "no-kvm"))
    code, _, err = invoke(capsys, "run")
    assert code == 4
    assert "KVM is not available" in err and "kvm module" in err
    code, _, err = invoke(capsys, "probe")
    assert code == 4


def test_dev_kvm_that_is_not_kvm_exits_4(capsys, tmp_path, monkeypatch):
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    monkeypatch.setenv("KVMFILTER_DEV_KVM", str(fake))
    code, _, err = invoke(capsys, "probe")
    assert code == 4
    assert "not a KVM device" in err and "Traceback" not in err


def test_journal_command(capsys, tmp_path):
    path = str(tmp_path / "j.db")
    mc = MigrationControl()
    with ReadinessJournal(path, "web-1") as j:
        mc.add_recorder(j.record)
        mc.access(0, WRMSR, 1)
        mc.access(1, WRMSR, 0)
    code, out, _ = invoke(capsys, "journal", path, "--json")
    assert code == 0
    doc = json.loads(out)
    assert [(t["vm"], t["vcpu"], t["from"], t["to"]) for t in doc["transitions"]] == [
        ("web-1", 0, 0, 1), ("web-1", 1, 1, 0)]
    code, out, _ = invoke(capsys, "journal", path)
    assert code == 0 and "web-1" in out and "0 -> 1" in out


def test_journal_command_on_missing_or_corrupt_file(capsys, tmp_path):
    code, _, err = invoke(capsys, "journal", str(tmp_path / "nope.db"))
    assert code == 2 and "no such file" in err
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"x" * 5000)
    code, _, err = invoke(capsys, "journal", str(bad))
    assert code == 2 and "not an SQLite database" in err


def test_exit_status_mapping_by_family():
    from kvmfilter.base import BadInput, KvmfilterError, Unavailable
    from kvmfilter.kvm.ioctls import KvmError, KvmUnavailableError
    from kvmfilter.policy.journal import JournalError
    from kvmfilter.vm.image import ImageError
    from kvmfilter.vm.machine import MissingCapabilityError
    assert cli.exit_status_for(ImageError("x"))[0] == 2
    assert cli.exit_status_for(JournalError("j", "x"))[0] == 2
    assert cli.exit_status_for(MissingCapabilityError("x"))[0] == 4
    assert cli.exit_status_for(KvmUnavailableError(2, "open /dev/kvm"))[0] == 4
    assert cli.exit_status_for(KvmError(22, "KVM_RUN"))[0] == 1
    assert cli.exit_status_for(RuntimeError("boom"))[0] == 1
    # One root: an embedder catches any kvmfilter error with one clause.
    for exc in (ImageError("x"), JournalError("j", "x"), MissingCapabilityError("x"),
                KvmError(22, "KVM_RUN")):
        assert isinstance(exc, KvmfilterError)
    assert isinstance(ImageError("x"), (BadInput, ValueError))
    assert isinstance(MissingCapabilityError("x"), Unavailable)
    assert isinstance(KvmError(22, "KVM_RUN"), OSError)


def test_size_param():
    p = cli.SizeParam()
    assert p.convert("1M", None, None) == 1 << 20
    assert p.convert("512KiB", None, None) == 512 << 10
    assert p.convert("2g", None, None) == 2 << 30
    assert p.convert("4096", None, None) == 4096


def test_dev_kvm_without_a_driver_exits_4_with_a_hint(capsys, tmp_path, monkeypatch):
    # A character device whose major (240: local/experimental use) has no driver
    # behind it: open() fails with ENXIO, as /dev/kvm does when no backend loaded.
    import os
    import stat
    node = tmp_path / "kvm"
    try:
        os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(240, 0))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD (run as root)")
    monkeypatch.setenv("KVMFILTER_DEV_KVM", str(node))
    code, _, err = invoke(capsys, "probe")
    assert code == 4
    assert "No such device or address" in err and "no KVM backend" in err


def test_every_open_failure_has_a_remedy():
    import errno
    from kvmfilter.kvm.ioctls import OPEN_HINTS, KvmError
    for err in (errno.ENOENT, errno.EACCES, errno.ENODEV, errno.ENXIO, errno.EPERM):
        assert OPEN_HINTS[err]
    message = str(KvmError(errno.EACCES, "open /dev/kvm", OPEN_HINTS[errno.EACCES]))
    assert "Permission denied" in message and "kvm' group" in message


EXIT_PROBE = ("import logging, sys; from kvmfilter.__main__ import _exit; logging.basicConfig(); "
              "print('out', end=''); sys.stderr.write('err;'); "
              "logging.getLogger('probe').warning('logged'); _exit({status!r})")


@pytest.mark.parametrize("status, code", [(None, 0), (3, 3), ("bye", 1)])
def test_the_command_exits_as_sys_exit_would(status, code):
    # `kvmfilter` ends without interpreter teardown (35 ms): output and logs
    # must still be flushed, and the status mapped as sys.exit maps it.
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", EXIT_PROBE.format(status=status)],
                       capture_output=True, text=True)
    assert (p.returncode, p.stdout) == (code, "out")
    assert p.stderr.startswith("err;") and "logged" in p.stderr
    assert ("bye" in p.stderr) == (status == "bye")


def test_an_output_that_cannot_be_flushed_is_status_120():
    import os
    import subprocess
    import sys
    r, w = os.pipe()
    os.close(r)  # nobody reads: the final flush fails (EPIPE), as `| head` gone early
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered
    try:
        p = subprocess.run([sys.executable, "-c", EXIT_PROBE.format(status=None)],
                           stdout=w, stderr=subprocess.PIPE, text=True, env=env)
    finally:
        os.close(w)
    assert p.returncode == 120, p.stderr


def test_the_command_skips_the_interpreter_teardown():
    # What the 35 ms are saved from: atexit handlers (and module teardown)
    # never run after a command; its own output still arrives.
    import subprocess
    import sys
    code = ("import atexit, os, sys; atexit.register(os.write, 2, b'teardown'); "
            "sys.argv = ['kvmfilter', '--help']; from kvmfilter.__main__ import main; main()")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and "Usage:" in p.stdout
    assert "teardown" not in p.stderr
