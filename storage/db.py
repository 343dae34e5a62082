"""One aiosqlite connection, and the short transactions every store method runs in.

A single connection is shared by every task of the process, so an `asyncio.Lock` makes
transactions take turns: without it two tasks would interleave statements inside one
SQLite transaction. Other processes (a second bot, the learner worker) are kept in order by
SQLite's own write lock: `BEGIN IMMEDIATE` takes it up front, `busy_timeout` waits for it,
and a few retries cover the cases where SQLite answers SQLITE_BUSY without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from storage.errors import (
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    StoreBusyError,
    StoreClosedError,
    StoreError,
)

log = logging.getLogger(__name__)

_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
_SYNCHRONOUS = {"OFF", "NORMAL", "FULL", "EXTRA"}


Params = Iterable[Any] | Mapping[str, Any]  # positional `?` values or named `:name` values


def _bind(params: Params) -> tuple[Any, ...] | dict[str, Any]:
    return dict(params) if isinstance(params, Mapping) else tuple(params)


class Tx:
    """The statements a transaction body may run; only valid inside `write()`/`read()`."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def rows(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        return list(await self._conn.execute_fetchall(sql, _bind(params)))

    async def row(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        rows = await self.rows(sql, params)
        return rows[0] if rows else None

    async def run(self, sql: str, params: Params = ()) -> int:
        """Execute one statement and return how many rows it changed."""
        cursor = await self._conn.execute(sql, _bind(params))
        changed = cursor.rowcount
        await cursor.close()
        return changed


class Database:
    """The connection plus the lock; `write()` and `read()` are the only ways in."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_ms: int = 30_000,
        synchronous: str = "FULL",
        begin_retries: int = 5,
        retry_delay_s: float = 0.05,
    ) -> None:
        if synchronous.upper() not in _SYNCHRONOUS:
            raise InvalidArgumentError(f"synchronous must be one of {sorted(_SYNCHRONOUS)}")
        if busy_timeout_ms < 0 or begin_retries < 0 or retry_delay_s < 0:
            raise InvalidArgumentError("busy timeout, retries and delay must not be negative")
        self.path = Path(path)
        self._busy_timeout_ms = int(busy_timeout_ms)
        self._synchronous = synchronous.upper()
        self._begin_retries = begin_retries
        self._retry_delay_s = retry_delay_s
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    async def open(self) -> None:
        """Connect and set the per-connection pragmas (WAL is stored in the file itself)."""
        if self._conn is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the folder for {self.path}: {exc}") from exc
        conn = aiosqlite.connect(self.path, isolation_level=None)
        try:
            await conn
            conn.row_factory = sqlite3.Row
            await conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            await conn.execute("PRAGMA foreign_keys = ON")
            await conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            # Deleted rows are overwritten, not left in free pages: /forget means gone.
            await conn.execute("PRAGMA secure_delete = ON")
            mode = (await (await conn.execute("PRAGMA journal_mode = WAL")).fetchone() or [""])[0]
        except sqlite3.Error as exc:
            await _close_quietly(conn)
            raise StoreError(f"cannot open the database {self.path}: {exc}") from exc
        if str(mode).lower() != "wal":
            log.warning("database %s is in %s mode, not WAL", self.path, mode)
        self._conn = conn

    async def close(self) -> None:
        """Wait for the running transaction, then close; idempotent."""
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await _close_quietly(conn)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Tx]:
        """`BEGIN IMMEDIATE` ... `COMMIT`; leaving the block means the data is committed."""
        async with self._transaction(self._begin_immediate) as tx:
            yield tx

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Tx]:
        """A deferred transaction: every query in the block sees the same committed snapshot."""
        async with self._transaction(_begin_deferred) as tx:
            yield tx

    @asynccontextmanager
    async def _transaction(
        self, begin: Callable[[aiosqlite.Connection], Awaitable[None]]
    ) -> AsyncIterator[Tx]:
        """BEGIN, the body, COMMIT; ROLLBACK on any error, a cancelled task included.

        A task cancelled while awaiting BEGIN or COMMIT does not stop the statement: it still
        runs on the connection thread. The ROLLBACK queued behind it makes sure the next lock
        holder never finds a transaction left open.
        """
        async with self._lock:
            conn = self._connection()
            try:
                await begin(conn)
                yield Tx(conn)
                await conn.execute("COMMIT")
            except BaseException as exc:
                await _rollback_quietly(conn)
                if isinstance(exc, sqlite3.Error):
                    raise translate(exc) from exc
                raise

    async def checkpoint(self, *, timeout_ms: int = 1_000) -> bool:
        """Copy the WAL into the main file and truncate it, so deleted data leaves the WAL too.

        Best effort: another process reading or writing can keep it from completing within
        `timeout_ms`; returns whether it did.
        """
        async with self._lock:
            conn = self._connection()
            try:
                await conn.execute(f"PRAGMA busy_timeout = {int(timeout_ms)}")
                rows = await conn.execute_fetchall("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("checkpoint failed: %s", exc)
                return False
            finally:
                await conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        busy = next(iter(rows))[0] if rows else 1
        return busy == 0

    def _connection(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise StoreClosedError("the store is not started (use `async with Store(path)`)")
        return self._conn

    async def _begin_immediate(self, conn: aiosqlite.Connection) -> None:
        for attempt in range(self._begin_retries + 1):
            try:
                await conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise translate(exc) from exc
                if attempt == self._begin_retries:
                    raise StoreBusyError(
                        f"the database {self.path} stayed locked by another process "
                        f"({self._begin_retries} retries after waiting {self._busy_timeout_ms} ms)"
                    ) from exc
                log.info("database busy, retrying BEGIN IMMEDIATE (attempt %d)", attempt + 1)
                await asyncio.sleep(self._retry_delay_s * 2**attempt)


async def _begin_deferred(conn: aiosqlite.Connection) -> None:
    await conn.execute("BEGIN")


def is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _BUSY_CODES
    return "locked" in str(exc) or "busy" in str(exc)


def translate(exc: sqlite3.Error) -> StoreError:
    """A clear store error for a raw SQLite one (the constraint names say which rule broke)."""
    text = str(exc)
    if isinstance(exc, sqlite3.IntegrityError):
        if "FOREIGN KEY" in text:
            return NotFoundError("a referenced row does not exist")
        if "UNIQUE" in text:
            return ConflictError(f"already stored ({text})")
        return InvalidArgumentError(f"rejected by the schema ({text})")
    if isinstance(exc, sqlite3.OperationalError) and is_busy(exc):
        return StoreBusyError(f"the database is locked by another process ({text})")
    return StoreError(f"database error: {text}")


async def _rollback_quietly(conn: aiosqlite.Connection) -> None:
    # The ROLLBACK is queued on the connection thread before this coroutine first yields, so
    # even a second cancellation cannot leave the transaction open for the next lock holder.
    try:
        await conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # no transaction was open (BEGIN failed, or COMMIT already ran)
    except ValueError:
        pass  # the connection was closed underneath us


async def _close_quietly(conn: aiosqlite.Connection) -> None:
    try:
        await conn.close()
    except (sqlite3.Error, ValueError) as exc:
        log.warning("closing the database failed: %s", exc)
