"""L1: getting a thread out of KVM_RUN (cstubs/kvm_source.c explains the signal).

``kick(vcpu, thread_ident)`` sets ``immediate_exit`` and signals the thread.
A vCPU thread that called ``Vcpu.prepare_thread()`` sees the signal only
inside KVM_RUN; any other thread (the probe drives micro-guests on the main
thread) sees it wherever it is, and a no-op handler makes that harmless.
"""
from __future__ import annotations

import signal
import threading

from ._kvm import lib
from .ioctls import KvmError

_signal: int | None = None
_lock = threading.Lock()


def kick_signal() -> int:
    """The kick signal number; installs its handler on first use."""
    global _signal
    with _lock:
        if _signal is None:
            sig = lib.kvmf_install_kick_handler()
            if sig < 0:
                raise KvmError(-sig, "sigaction (vCPU kick signal)")
            _signal = sig
        return _signal


def kick(vcpu, thread_ident: int) -> None:
    """Get the thread running ``vcpu`` out of KVM_RUN, now or at its next entry.

    The thread must be alive (pthread_kill on a finished thread is undefined).
    """
    # KVM ABI: api.rst, immediate_exit: set before the signal, so a vCPU that
    # is between KVM_RUNs returns EINTR on its next entry instead of missing it.
    vcpu.run_page.immediate_exit = 1
    signal.pthread_kill(thread_ident, kick_signal())
