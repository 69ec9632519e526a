"""L4: one VM in this process.

- ``image``: the guest-image contract; ``devices``: the port table and the
  built-in devices; ``dispatch``: one exit -> an ``Outcome``;
  ``vcpu_thread``: a vCPU as a state machine; ``ram``: guest RAM and the pages
  ever written; ``machine``: the VM and its run state; ``handlers``: the MSR
  and hypercall handlers that call the policy; ``vmm``: ``Vmm``, the lifecycle
  API everything above this layer uses; ``report``: the run report;
  ``state``: a paused VM's state, captured and restored; ``probe``: what the
  host's KVM really does.
"""
