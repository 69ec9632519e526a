"""L0-L2: KVM itself.  The only package that imports the cffi module (``_kvm``).

- ``ioctls``: ``Kvm`` -> ``Vm`` -> ``Vcpu``, one method per ioctl.
- ``memory``: host memory backing guest RAM.
- ``kick``: getting a thread out of KVM_RUN.
- ``msr_filter``, ``cpuid``: the filter model and CPUID tables.
- ``exits``: typed exits decoded from a run page, replies written back.
- ``fastpath``: the Python half of the C MSR and console fast path.

Nothing is imported here: ``import kvmfilter.kvm.exits`` loads what it needs.
"""
