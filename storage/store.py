"""`Store`: the one object the rest of Ouro uses for persistence.

The repository methods live in one mixin per table group (users, messages, corrections and
feedback, adapters, jobs, privacy); this class owns the connection's life cycle.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Self

from storage.adapters import AdaptersMixin
from storage.corrections import CorrectionsMixin
from storage.db import Database
from storage.jobs import JobsMixin
from storage.messages import MessagesMixin
from storage.migrations import migrate
from storage.privacy import PrivacyMixin
from storage.users import UsersMixin


class Store(UsersMixin, MessagesMixin, CorrectionsMixin, AdaptersMixin, JobsMixin, PrivacyMixin):
    """SQLite-backed store; use `async with Store(path) as store:` (or `start()`/`close()`).

    `synchronous="FULL"` fsyncs every commit, so an acknowledged correction survives a power
    cut as well as a crash; "NORMAL" is faster and still survives a killed process.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_ms: int = 30_000,
        synchronous: str = "FULL",
        begin_retries: int = 5,
    ) -> None:
        self._db = Database(
            path,
            busy_timeout_ms=busy_timeout_ms,
            synchronous=synchronous,
            begin_retries=begin_retries,
        )
        self.applied_migrations: list[str] = []

    @property
    def path(self) -> Path:
        return self._db.path

    async def start(self) -> None:
        """Open the file (creating its folder) and bring the schema up to date."""
        if self._db.is_open:
            return
        await self._db.open()
        try:
            self.applied_migrations = await migrate(self._db)
        except BaseException:
            await self._db.close()
            raise

    async def close(self) -> None:
        await self._db.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
