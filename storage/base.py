"""What the repository mixins share: the database, and look-ups that fail clearly."""

from __future__ import annotations

import sqlite3
from enum import StrEnum
from typing import Any

from storage.db import Database, Params, Tx
from storage.errors import NotFoundError


class Repository:
    """Base of the table mixins that make up `Store`; `Store.__init__` sets `_db`."""

    _db: Database


async def require(tx: Tx, sql: str, params: Params, missing: str) -> sqlite3.Row:
    """The row `sql` selects, or `NotFoundError(missing)` (and the transaction rolls back)."""
    row = await tx.row(sql, params)
    if row is None:
        raise NotFoundError(missing)
    return row


async def require_user(tx: Tx, user_id: int, name: str = "user") -> None:
    await require(
        tx, "SELECT 1 FROM users WHERE id = ?", (user_id,), f"no {name} with id {user_id}"
    )


async def require_message(tx: Tx, message_id: int, name: str = "message") -> sqlite3.Row:
    return await require(
        tx, "SELECT * FROM messages WHERE id = ?", (message_id,), f"no {name} with id {message_id}"
    )


def where(conditions: dict[str, Any]) -> tuple[str, list[Any]]:
    """`WHERE a = ? AND b = ?` for the filters that are not None (column names are ours)."""
    used = {
        column: value.value if isinstance(value, StrEnum) else value
        for column, value in conditions.items()
        if value is not None
    }
    if not used:
        return "", []
    return " WHERE " + " AND ".join(f"{column} = ?" for column in used), list(used.values())
