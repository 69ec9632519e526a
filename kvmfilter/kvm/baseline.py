"""L0: the minimal C service loop the benchmarks compare kvmfilter against.

``kvmf_bench_c_loop`` (cstubs/kvm_source.c) accepts every WRMSR of one MSR,
answers every RDMSR with 1, and stops at the first OUT to port 0xF4: the least
a VMM can do per exit.  Not used by kvmfilter itself.
"""
from __future__ import annotations

from ._kvm import lib
from .ioctls import KvmError


def c_loop(vcpu, msr_index: int) -> tuple[int, float]:
    """Drive ``vcpu`` with the C loop: (MSR exits serviced, seconds)."""
    started = lib.kvmf_monotonic()
    n = lib.kvmf_bench_c_loop(vcpu.fd, vcpu.run_page, msr_index)
    elapsed = lib.kvmf_monotonic() - started
    if n < 0:
        raise KvmError(-n, "KVM_RUN (benchmark C loop)")
    return n, elapsed
