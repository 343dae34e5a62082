"""Fixtures for the store tests: a real SQLite file per test, opened and closed properly."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest

from storage.models import Message, User
from storage.store import Store


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "ouro.sqlite"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    async with Store(db_path) as opened:
        yield opened


@pytest.fixture
async def alice(store: Store) -> User:
    return await store.get_or_create_user("telegram", "100", "alice")


@pytest.fixture
async def bob(store: Store) -> User:
    return await store.get_or_create_user("discord", "200", "bob")


@pytest.fixture
async def answer(store: Store, alice: User) -> Message:
    """A bot answer to alice, after her question."""
    question = await store.add_message(alice.id, "telegram", "chat1", "user", "capital of France?")
    return await store.add_message(
        alice.id, "telegram", "chat1", "assistant", "Lyon", reply_to_id=question.id
    )


@pytest.fixture
def raw(db_path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection to the same file, for looking behind the store's back."""
    with closing(sqlite3.connect(db_path)) as conn:
        yield conn


@pytest.fixture
def count_rows(db_path: Path) -> Callable[[], dict[str, int]]:
    """Rows per data table, read through a separate connection (what is really committed)."""
    return lambda: _count_rows(db_path)


def _count_rows(db_path: Path) -> dict[str, int]:
    with closing(sqlite3.connect(db_path)) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name NOT IN ('migrations', 'sqlite_sequence')"
            )
        ]
        return {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in tables
        }
