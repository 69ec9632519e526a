"""What every layer shares: the error root, its families, and string enums.

Standard library only, and imports nothing of kvmfilter's, so every package
(the pure policy included) may import it.

Errors: every exception kvmfilter raises on purpose derives from
``KvmfilterError``, so an embedder can catch one thing.  Three families say
what kind of failure it is; the CLI maps them to exit statuses in one place:

- ``BadInput`` (also a ``ValueError``): the caller's input is wrong - an image,
  an option, a journal or snapshot file.  Exit 2.
- ``Unavailable``: the host cannot do it - no /dev/kvm, a missing capability.
  Exit 4.
- anything else derived from ``KvmfilterError``: the operation failed.  Exit 1.
"""
from __future__ import annotations

import functools
from enum import Enum


class KvmfilterError(Exception):
    """Root of every error kvmfilter raises on purpose."""


class BadInput(KvmfilterError, ValueError):
    """The input given to kvmfilter is unusable (CLI exit status 2)."""


class Unavailable(KvmfilterError):
    """This host cannot do what was asked (CLI exit status 4)."""


class StrEnum(str, Enum):
    """A string enum whose members are their values everywhere a str goes.

    JSON, f-strings, ``str()`` and hashing all see the value, so a member and
    the plain string are interchangeable as dict keys and the JSON kvmfilter
    prints stays byte-identical.
    """

    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__

    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


@functools.lru_cache(maxsize=None)
def version() -> str:
    """kvmfilter's version, from the installed package's metadata (the one source)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version
    try:
        return _version("kvmfilter")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"
