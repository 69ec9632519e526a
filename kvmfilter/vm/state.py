"""L4: the state of a paused VM - what a snapshot or a migration carries besides RAM.

Three parts, each a section of the stream (docs/stream-format.md):

- the configuration: memory size, vCPUs, run options, name, the CPUID table
  the guest was given, struct sizes (``config``; first, so the destination can
  build the VM and its RAM before pages arrive);
- every vCPU's architectural state and the VM clock (``capture``);
- kvmfilter's own state, which KVM cannot return (``kvmfilter_state``): the
  migration-control MSR lives behind the filter in userspace, so
  ``KVM_GET_MSRS`` knows nothing of it; the readiness record, the page map,
  the power button and the console go with it.

``capture`` works only on a paused machine (every vCPU parked outside
KVM_RUN): asking a running VM is a ``StateError``, not a race.
"""
from __future__ import annotations

import os
import socket
import time
from collections import namedtuple

from ..base import BadInput, version
from ..kvm import vcpu_state
from ..kvm.cpuid import CpuidEntry
from ..policy.pagemap import PageMap
from .machine import MAX_VCPUS, MissingCapabilityError, validate_memory
from .vmm import RunOptions, Vmm

VmState = namedtuple("VmState", "vcpus clock")

# MSRs to restore after all others (Firecracker: the TSC deadline is checked
# against the TSC when written, so it must follow MSR_IA32_TSC).
DEFERRED_MSRS = (0x6E0,)  # MSR_IA32_TSC_DEADLINE


def config(vmm: Vmm) -> dict:
    """The CONF section: enough to build the same VM elsewhere."""
    o = vmm.options
    return {
        "kvmfilter": version(),
        "created": time.time(),
        "host": socket.gethostname(),
        "vm": {"name": o.name, "label": vmm.label, "memory": o.memory, "vcpus": o.vcpus,
               "migration_control": o.migration_control, "map_gpa_range": o.map_gpa_range,
               "plain_memory": o.plain_memory, "fast_path": o.fast_path},
        "cpuid": [list(e) for e in vmm.machine.cpuid],
        "structs": vcpu_state.struct_sizes(),
        "source": {"run": vmm.run_id, "pid": os.getpid()},
    }


def msr_indices(vmm: Vmm) -> list[int]:
    """The MSRs to carry, in restore order (deferred ones last)."""
    indices = vmm.machine.kvm.get_msr_index_list()
    return ([i for i in indices if i not in DEFERRED_MSRS]
            + [i for i in indices if i in DEFERRED_MSRS])


def capture(vmm: Vmm) -> VmState:
    """Every vCPU's state and the clock of a paused VM (StateError otherwise)."""
    machine = vmm.machine
    vcpus = machine.capture_vcpus(msr_indices(vmm))
    return VmState(vcpus, machine.vm.get_clock())


def kvmfilter_state(vmm: Vmm) -> dict:
    """The KVMF section: kvmfilter's own state, taken with the vCPUs parked."""
    return {"control": vmm.control.export_state(),
            "page_map": vmm.page_map.export_state(),
            "power_button": vmm.power_button.pressed,
            "console": vmm.machine.console.export_state(),
            "run": vmm.run_id, "name": vmm.options.name}


def options_from(conf: dict, **overrides) -> RunOptions:
    """RunOptions for the VM ``conf`` describes; ``overrides`` (not None) win.

    Raises:
        BadInput: the configuration is malformed or out of range.
    """
    try:
        vm = conf["vm"]
        memory, vcpus = int(vm["memory"]), int(vm["vcpus"])
        validate_memory(memory)
        if not 1 <= vcpus <= MAX_VCPUS:
            raise ValueError(f"{vcpus} vCPUs")
        options = RunOptions(image=None, memory=memory, vcpus=vcpus, timeout=None,
                             migration_control=bool(vm["migration_control"]),
                             map_gpa_range=bool(vm["map_gpa_range"]),
                             plain_memory=bool(vm["plain_memory"]),
                             name=str(vm["name"]), fast_path=bool(vm.get("fast_path", True)))
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInput(f"the configuration is malformed: {exc}") from None
    return _overridden(options, overrides)


def _overridden(options: RunOptions, overrides: dict) -> RunOptions:
    """``options`` with the command line's ``overrides`` that are not None.

    An incoming VM starts from no time limit (``timeout=None``): ``run``'s
    default of 10 s comes with its command line, and ``serve`` has none (a
    migrated daemon guest used to stop after 10 s)."""
    for key, value in overrides.items():
        if value is not None:
            setattr(options, key, value)
    return options


def cpuid_from(conf: dict) -> list[CpuidEntry]:
    try:
        return [CpuidEntry(*(int(x) for x in e)) for e in conf["cpuid"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInput(f"the configuration's CPUID table is malformed: {exc}") from None


def _check_structs(conf: dict) -> None:
    sizes = vcpu_state.struct_sizes()
    theirs = conf.get("structs", {})
    for name, size in theirs.items():
        if name in sizes and sizes[name] != size and name != "struct kvm_xsave":
            raise BadInput(f"{name} is {size} bytes in the stream, {sizes[name]} here")


def build(kvm, conf: dict, origin: str, source: str, **overrides) -> Vmm:
    """A VM set up from a CONF section - RAM ready for pages, no vCPU started,
    no image (the restore path never resets a vCPU).

    Raises:
        BadInput: a malformed configuration, or structs of another size.
    """
    _check_structs(conf)
    label, parent = _lineage(conf)
    return _launched(Vmm(kvm, options_from(conf, **overrides), image=False, label=label,
                         cpuid=cpuid_from(conf), origin=origin, source=source,
                         parent=parent))


def _lineage(conf: dict) -> tuple[str, object]:
    """(label, parent run) of the stream's VM."""
    return str(conf["vm"].get("label", "<restored>")), (conf.get("source") or {}).get("run")


def _launched(vmm: Vmm) -> Vmm:
    """``vmm`` with its vCPU threads waiting (they wait while the state loads),
    or closed if that fails."""
    try:
        vmm.machine.launch()
    except BaseException:
        vmm.close()
        raise
    return vmm


# What a VM prepared ahead of its stream must share with the stream's VM.
SHAPE = ("memory", "vcpus", "migration_control", "map_gpa_range", "plain_memory", "fast_path")


def prepare(kvm, shape: dict, origin: str, source: str, journal=None,
            **overrides) -> Vmm:  # journal: opened by adopt, once the parent is known
    """A VM of ``shape`` (RunOptions fields: memory, vcpus ...) set up before
    its stream arrives, as a QEMU destination is started with the source's
    machine: the build is then off the migration's clock.  ``adopt`` gives
    it the stream's configuration; the journal opens there, once the parent
    run is known.

    Raises:
        ValueError: a shape out of range.
    """
    options = _overridden(RunOptions(image=None, timeout=None, **shape), overrides)
    return _launched(Vmm(kvm, options, image=False, label="<incoming>", origin=origin,
                         source=source))


def adopt(vmm: Vmm, conf: dict, journal=None, name=None, **overrides) -> Vmm:
    """The ``prepare``d VM, given the configuration of the stream's VM
    (``journal``, ``name``: the command line's, as ``build`` takes them).

    Raises:
        BadInput: the stream's VM has another shape (the prepared VM is left
            for the caller to close), a malformed configuration, structs of
            another size, or a CPUID table this host cannot honour.
    """
    _check_structs(conf)
    theirs = options_from(conf)
    different = [f"{field.replace('_', '-')} {getattr(theirs, field)!r} (prepared: "
                 f"{getattr(vmm.options, field)!r})"
                 for field in SHAPE if getattr(theirs, field) != getattr(vmm.options, field)]
    if different:
        raise BadInput("the stream's VM is not the one this destination prepared: "
                       + ", ".join(different))
    # Usually the stream's table is the one the VM was prepared with (same host
    # kind, same kvmfilter): comparing the JSON lists costs 10 us, parsing and
    # setting them again 0.5 ms on the migration's critical path.
    if conf.get("cpuid") != [list(e) for e in vmm.machine.cpuid]:
        try:
            vmm.machine.set_cpuid(cpuid_from(conf))
        except MissingCapabilityError as exc:
            raise BadInput(str(exc)) from None
    vmm.label, vmm.parent = _lineage(conf)
    vmm.options.name = name or theirs.name
    if journal:
        vmm.open_journal(journal)
    return vmm


def warm_up(kvm) -> None:
    """Build a small VM, save and restore its vCPUs, and discard it.

    A process's first VM costs about 1 ms more to build and load than the next
    (cffi parses each struct type on its first use; code paths are cold in the
    CPU and the kernel).  A destination does this while it waits for its
    source, so the build on its migration's critical path does not pay it.
    """
    vmm = Vmm(kvm, RunOptions(image=None, plain_memory=True, timeout=None), image=False,
              label="<warm-up>")
    try:
        vmm.machine.launch()
        state = capture(vmm)
        vmm.machine.restore_vcpus(state.vcpus)
        vmm.machine.vm.set_clock(vcpu_state.clock_for_restore(state.clock))
    finally:
        vmm.close()


def apply(vmm: Vmm, state: VmState, kvmf: dict) -> None:
    """Give a built VM its vCPU state, clock and kvmfilter state (before start).

    Raises:
        BadInput: malformed kvmfilter state.
        ValueError, KvmError: KVM refused a part of the vCPU state.
    """
    machine = vmm.machine
    try:
        control, page_map = kvmf["control"], kvmf["page_map"]
        pressed = bool(kvmf["power_button"])
        console = kvmf["console"]
    except (KeyError, TypeError) as exc:
        raise BadInput(f"kvmfilter state is malformed: missing {exc}") from None
    vmm.control.load_state(control)
    vmm.page_map.load_state(PageMap.from_state(page_map, vmm.options.memory))
    try:
        machine.console.import_state(console)
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInput(f"console state is malformed: {exc}") from None
    if pressed:
        vmm.power_button.press()
    machine.restore_vcpus(state.vcpus)
    if state.clock:
        machine.vm.set_clock(vcpu_state.clock_for_restore(state.clock))
    if vmm.journal is not None:
        vmm.journal.continue_history(vmm.control.transitions(), vmm.parent)
    vmm.restored = True

