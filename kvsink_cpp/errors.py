"""One exception hierarchy carrying the C core's status and reason.

Every error raised from the C core is a KvsinkError with `.status` (the
kvs_status value); the subclasses also derive from the builtin exception a
Python user would expect (a malformed file is a ValueError, a missing file an
OSError, ...).
"""
from __future__ import annotations


class KvsinkError(Exception):
    """A failure reported by the kvsink C core."""

    status = 7  # KVS_ERR_INTERNAL unless a subclass says otherwise


class InvalidArgumentError(KvsinkError, ValueError):
    status = 1


class KvsinkIOError(KvsinkError, OSError):
    status = 2


class GGUFFormatError(KvsinkError, ValueError):
    """The GGUF file is malformed."""

    status = 3


class UnsupportedError(KvsinkError):
    """Valid input that kvsink_cpp does not implement."""

    status = 4


class KvsinkMemoryError(KvsinkError, MemoryError):
    status = 5


class ContextFullError(KvsinkError, ValueError):
    """More tokens than the context can hold (a ValueError, as llama-cpp-python
    raises for a prompt longer than the context)."""

    status = 6


class CancelledError(KvsinkError):
    """An evaluation stopped by Llama.cancel() (kvs_context_set_cancel)."""

    status = 8


class KvsinkWarning(UserWarning):
    """A notice about how a model runs (e.g. no sink profile), filterable with
    the warnings module."""


_BY_STATUS = {cls.status: cls for cls in (InvalidArgumentError, KvsinkIOError, GGUFFormatError,
                                          UnsupportedError, KvsinkMemoryError, ContextFullError, CancelledError)}


def raise_for_status(status: int, reason: str) -> None:
    cls = _BY_STATUS.get(status, KvsinkError)
    exc = cls(reason or f"kvsink call failed with status {status}")
    exc.status = status
    raise exc
