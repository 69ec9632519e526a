"""kvmfilter: KVM's migration-control MSR (0x4b564d08), implemented in userspace.

Empty on purpose: importing ``kvmfilter`` loads no cffi module.  The layers are
packages - ``kvmfilter.kvm`` (KVM itself), ``kvmfilter.policy`` (what an
embedder imports), ``kvmfilter.vm`` (a VM in this process),
``kvmfilter.migrate`` (snapshots and live migration), ``kvmfilter.daemon``
(``kvmfilter serve``) - see docs/architecture.md.
"""
import logging as _logging

# A library logs; it does not decide where logs go.  Without this, Python's
# last-resort handler prints kvmfilter's warnings bare on an embedder's stderr.
_logging.getLogger("kvmfilter").addHandler(_logging.NullHandler())
