"""CPUID tables without KVM: the per-CPU fields are cleared from the table a VM
keeps (and sends in a migration stream) and set for each vCPU."""
from kvmfilter.kvm.cpuid import CpuidEntry, per_vcpu, vcpu_neutral


def table(apic_id: int) -> list[CpuidEntry]:
    """What KVM_GET_SUPPORTED_CPUID said on host CPU ``apic_id`` (values from ours)."""
    return [CpuidEntry(0, 0, 0, 0x10, 0x68747541, 0x444D4163, 0x69746E65),
            CpuidEntry(1, 0, 0, 0xA00F11, 0x20800 | apic_id << 24, 0x81202000, 0x78BFBFF),
            CpuidEntry(0xB, 0, 1, 1, 1, 0x100, apic_id),
            CpuidEntry(0xB, 1, 1, 0, 0, 0x201, apic_id),
            CpuidEntry(0x1F, 0, 1, 0, 1, 0x100, apic_id)]


def test_neutral_tables_from_different_host_cpus_are_equal():
    assert table(0) != table(1)
    assert vcpu_neutral(table(0)) == vcpu_neutral(table(1))


def test_neutral_clears_only_the_per_cpu_fields():
    neutral = vcpu_neutral(table(1))
    assert neutral[0] == table(1)[0]
    assert neutral[1] == table(1)[1]._replace(ebx=0x0800)  # [15:0] kept: CLFLUSH size, brand
    assert [e.edx for e in neutral[2:]] == [0, 0, 0]
    assert [e[:6] for e in neutral[2:]] == [e[:6] for e in table(1)[2:]]


def test_per_vcpu_sets_apic_ids_and_count():
    entries = per_vcpu(vcpu_neutral(table(1)), index=3, count=4)
    leaf1 = entries[1]
    assert leaf1.ebx >> 24 == 3 and (leaf1.ebx >> 16) & 0xFF == 4
    assert leaf1.ebx & 0xFFFF == 0x0800
    assert [e.edx for e in entries[2:]] == [3, 3, 3]
    assert entries[0] == table(1)[0]
