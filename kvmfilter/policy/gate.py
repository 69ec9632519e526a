"""L3: the migration gate - every reason a guest may not be moved now, in one place.

A guest may be live-migrated (or snapshotted) exactly when ``blocked_reasons``
is empty.  The reasons come from three facts:

- the migration-control MSR: was the feature offered, has the guest written
  KVM_MIGRATION_READY?
- the memory model: a VM with encrypted memory must also have told the host,
  through KVM_HC_MAP_GPA_RANGE, which of its pages are shared - the stream
  depends on it (docs/migration.md);
- whether this VMM can receive that report at all (``EncryptionStatus``).

Each reason has a stable ``code`` (for programs, and for the CLI to add a hint
naming its own options) and a sentence for people, worded for any VMM that
embeds the policy.
"""
from __future__ import annotations

from collections import namedtuple
from typing import Optional

from ..base import StrEnum


class EncryptionStatus(StrEnum):
    """Can this VMM learn the guest's page encryption status?"""
    NOT_NEEDED = "not-needed"    # the VM has no encrypted memory
    ENABLED = "enabled"          # KVM_HC_MAP_GPA_RANGE exits reach the VMM
    DISABLED = "disabled"        # the VMM chose not to enable them
    UNAVAILABLE = "unavailable"  # the host's KVM cannot deliver them
    UNKNOWN = "unknown"          # nobody said (an embedder's default)


class Blocker(namedtuple("Blocker", "code text")):
    __slots__ = ()


NOT_OFFERED = "migration-control-not-offered"
NOT_READY = "guest-not-ready"
STATUS_UNREPORTED = "page-encryption-status-unreportable"
STATUS_NOT_RECEIVED = "page-encryption-status-not-received"


def blocked_reasons(control, page_map=None, encryption_status: Optional[str] = None,
                    detail: str = "") -> list[Blocker]:
    """Why the guest may not be migrated now (empty: it may).

    Args:
        control: the ``MigrationControl``.
        page_map: the ``PageMap`` of shared pages (None: none is kept).
        encryption_status: an ``EncryptionStatus``; None means NOT_NEEDED for
            a VM without encrypted memory and UNKNOWN otherwise.
        detail: why the status is unavailable, when the caller knows.
    """
    if encryption_status is None:
        encryption_status = (EncryptionStatus.UNKNOWN if control.encrypted_memory
                             else EncryptionStatus.NOT_NEEDED)
    reasons = []
    if not control.advertised:
        reasons.append(Blocker(NOT_OFFERED, (
            "The guest was not offered migration control (CPUID 0x40000001 bit 17 "
            "is clear), so it cannot announce that it is ready.")))
    elif not control.ready:
        reasons.append(Blocker(NOT_READY, (
            "The guest has not announced that it is ready for live migration "
            "(MSR_KVM_MIGRATION_CONTROL is 0); wait for it to write KVM_MIGRATION_READY.")))
    if not control.encrypted_memory or not control.advertised:
        return reasons
    if encryption_status in (EncryptionStatus.DISABLED, EncryptionStatus.UNAVAILABLE,
                             EncryptionStatus.UNKNOWN):
        why = {EncryptionStatus.DISABLED: "the VMM did not enable the KVM_HC_MAP_GPA_RANGE exit",
               EncryptionStatus.UNAVAILABLE: "this host's KVM does not deliver the "
                                             "KVM_HC_MAP_GPA_RANGE exit",
               EncryptionStatus.UNKNOWN: "nothing tracks the KVM_HC_MAP_GPA_RANGE "
                                         "reports"}[encryption_status]
        reasons.append(Blocker(STATUS_UNREPORTED, (
            f"The page encryption status of this encrypted-memory guest cannot be "
            f"reported ({why}{': ' + detail if detail else ''}), so which of its pages "
            "are shared is unknown.")))
    elif page_map is None or page_map.updates == 0:
        reasons.append(Blocker(STATUS_NOT_RECEIVED, (
            "The guest has not reported its page encryption status yet (no "
            "KVM_HC_MAP_GPA_RANGE received), so which of its pages are shared is "
            "unknown; wait for it.")))
    return reasons
