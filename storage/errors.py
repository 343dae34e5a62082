"""Errors the store raises: callers catch these, never a raw `sqlite3` error.

Every subclass of `InvalidArgumentError` is also a `ValueError`, so a caller that only
knows "bad input" can catch that; the transaction it came from was rolled back.
"""

from __future__ import annotations


class StoreError(Exception):
    """Anything the store refuses or cannot do; nothing was written."""


class InvalidArgumentError(StoreError, ValueError):
    """An argument is malformed: unknown status, wrong type, naive datetime, bad JSON."""


class NotFoundError(InvalidArgumentError, LookupError):
    """A referenced row (user, message, correction, adapter, job) does not exist."""


class ConflictError(InvalidArgumentError):
    """The write contradicts what is stored: a reused adapter version, a finished job."""


class StoreClosedError(StoreError):
    """The store was used before `start()` or after `close()`."""


class StoreBusyError(StoreError):
    """Another process held the write lock for longer than the busy timeout and retries."""


class MigrationError(StoreError):
    """A schema migration failed; it was rolled back and the store did not start."""
