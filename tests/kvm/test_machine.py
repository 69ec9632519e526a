"""The machine on real /dev/kvm: console, debug exit, HLT, triple fault,
timeouts that win over a spinning KVM_RUN, unknown ports, garbage images."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import skip_or_fail, test_guest
from kvmfilter.vm.machine import Machine
from kvmfilter.vm.image import bundled_guest
from kvmfilter.vm.vmm import RunOptions, Vmm


def run_image(kvm, image, **kw):
    with Machine(kvm, **kw) as m:
        return m.run(image)


def test_console_and_debug_exit(kvm):
    r = run_image(kvm, bundled_guest("hello"))
    assert r.console == "hello from kvmfilter\n"
    assert (r.exit.reason, r.exit.code) == ("debug_exit", 0)
    assert r.exits["io"] == len("hello from kvmfilter\n") + 1


def test_debug_exit_code_is_the_value_written(kvm):
    r = run_image(kvm, test_guest("debug_exit_42"))
    assert (r.exit.reason, r.exit.code) == ("debug_exit", 42)


def test_hlt_stops_the_vcpu_and_the_vm(kvm):
    r = run_image(kvm, test_guest("hlt"), vcpus=3)
    assert r.exit.reason == "hlt" and r.exit.code == 0
    assert r.exits == {"hlt": 3}


def test_the_cpuid_table_is_the_same_whichever_host_cpu_built_it(kvm):
    # KVM_GET_SUPPORTED_CPUID reports the APIC ID of the CPU the ioctl ran on;
    # a VM's table (the one a migration stream carries) must not depend on it.
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        skip_or_fail("one CPU: no second host CPU to build a table on")
    tables = []
    try:
        for cpu in cpus[:2]:
            os.sched_setaffinity(0, {cpu})
            with Machine(kvm) as m:
                m.setup()
                tables.append(m.cpuid)
    finally:
        os.sched_setaffinity(0, cpus)
    assert tables[0] == tables[1]
    leaf1 = [e for e in tables[0] if e.function == 1][0]
    assert leaf1.ebx >> 16 == 0  # per vCPU: APIC ID and count are set at KVM_SET_CPUID2


def test_si_is_the_vcpu_index(kvm):
    r = run_image(kvm, test_guest("print_index"), vcpus=4)
    assert sorted(r.console) == ["0", "1", "2", "3"]
    assert r.exit.reason == "hlt"


def test_launched_vcpus_run_nothing_until_started(kvm):
    # A restored VM launches its vCPU threads while its state loads: they must
    # not enter the guest before start(), and start() must still run it.
    with Machine(kvm, vcpus=2) as m:
        m.boot(bundled_guest("hello"))
        m.launch()
        assert all(t.thread.is_alive() for t in m.threads)
        time.sleep(0.1)
        assert m.console.text() == "" and all(not t.exit_counts() for t in m.threads)
        m.start()
        r = m.wait()
    assert r.console.startswith("hello from kvmfilter\n")
    assert (r.exit.reason, r.exit.code) == ("debug_exit", 0)


def test_a_launched_machine_that_never_starts_closes_quietly(kvm, caplog):
    # An incoming migration that fails after its VM was built closes it: the
    # waiting threads end, and nothing says the (never started) guest stopped.
    caplog.set_level("INFO", logger="kvmfilter.vm")
    m = Machine(kvm, vcpus=2)
    m.boot(bundled_guest("hello"))
    m.launch()
    threads = [t.thread for t in m.threads]
    m.close()
    assert not any(t.is_alive() for t in threads)
    assert "vm_stopping" not in caplog.text


def test_triple_fault_is_shutdown(kvm):
    r = run_image(kvm, test_guest("triple_fault"))
    assert r.exit.reason == "shutdown" and r.exit.code == 1


def test_vmcall_spin_is_stopped_by_the_timeout(kvm):
    started = time.monotonic()
    r = run_image(kvm, test_guest("vmcall"), timeout=1.0)
    elapsed = time.monotonic() - started
    assert r.console == "spin\n"
    assert r.exit.reason == "timeout"
    assert elapsed < 1.0 + 1.0, f"took {elapsed:.2f} s to stop a 1 s timeout"


def test_timeout_with_many_spinning_vcpus(kvm):
    started = time.monotonic()
    r = run_image(kvm, test_guest("spin"), vcpus=4, timeout=0.5)
    assert r.exit.reason == "timeout"
    assert time.monotonic() - started < 0.5 + 2.5  # set-up of 4 vCPUs included


def test_every_unknown_port_is_counted_never_fatal(kvm):
    r = run_image(kvm, test_guest("port_flood"))
    assert (r.exit.reason, r.exit.code) == ("debug_exit", 0)  # IN 0x80 read all-ones
    assert len(r.unhandled_ports) == 65536 - 2
    assert r.unhandled_ports[0x80] == 2  # one OUT and one IN
    assert sum(r.unhandled_ports.values()) == 65536 - 2 + 1


def test_console_is_bounded(kvm):
    # rep outsw of 16 KiB into a console that keeps 4 KiB: the rest is counted.
    image = test_guest("console_flood")
    with Machine(kvm) as m:
        m.console.limit = 4096
        r = m.run(image)
    assert r.exit.reason == "debug_exit"
    assert len(r.console.encode("utf-8", "surrogateescape")) >= 4096 - 3  # decoding may merge
    assert r.console_dropped == 0x4000 - 4096


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_always_end_in_a_valid_report(kvm, seed):
    image = random.Random(seed).randbytes(4096) if seed else bytes(4096)
    with Vmm(None, RunOptions(timeout=1.0), image=image, label=f"<random {seed}>") as v:
        v.run(kvm)
        report = v.report()
    assert report["exit"]["reason"] in {"hlt", "debug_exit", "shutdown", "timeout",
                                        "internal_error", "fail_entry", "unhandled"}
    assert isinstance(report["ok"], bool)


def test_ctrl_c_during_a_run_is_a_clean_exit(kvm):
    """SIGINT while a vCPU spins in KVM_RUN: vCPUs are joined before anything is
    unmapped, then one line and exit 130 (not a crash)."""
    from daemons import kvmfilter_cmd
    from conftest import TEST_GUESTS
    p = subprocess.Popen(kvmfilter_cmd() + ["run", str(TEST_GUESTS / "vmcall.bin"),
                                            "--timeout", "30"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=15)
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert "exit: interrupted (code 1)" in out  # the partial report is printed
