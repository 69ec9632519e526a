"""L3: the migration-control policy - what a custom VMM embeds.

Standard library only: importing it loads no cffi module and opens nothing,
so it works without /dev/kvm (a test proves it).

- ``readiness``: ``MigrationControl`` (the MSR's rules and record).
- ``pagemap``: ``PageMap``, the guest's shared (decrypted) ranges.
- ``gate``: ``blocked_reasons`` - may the guest be moved now, and if not, why.
- ``journal``: ``ReadinessJournal``, every transition in SQLite (imported
  lazily: sqlite3 costs start-up time).
"""
from .gate import Blocker, EncryptionStatus, blocked_reasons
from .pagemap import PageMap
from .readiness import (KVM_FEATURE_MIGRATION_CONTROL, KVM_MIGRATION_READY,
                        MSR_KVM_MIGRATION_CONTROL, MigrationControl, Op, Transition, Verdict,
                        VerdictName, rfc3339)

__all__ = ["Blocker", "EncryptionStatus", "KVM_FEATURE_MIGRATION_CONTROL",
           "KVM_MIGRATION_READY", "MSR_KVM_MIGRATION_CONTROL", "MigrationControl", "Op",
           "PageMap", "Transition", "Verdict", "VerdictName", "blocked_reasons", "rfc3339"]
