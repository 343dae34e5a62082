"""The schema, as named migration functions applied in order and recorded by name.

Each migration runs in its own `BEGIN IMMEDIATE` transaction together with the row that
records it, so a crash leaves it either fully applied and recorded or not at all, and two
processes starting at once apply it once. Never edit a migration that has shipped: append
a new one. (The pattern is simonw/llm's `llm/migrations.py`.)

Ids are AUTOINCREMENT so an id is never handed out twice, even after `forget_user` deleted
the newest rows: a worker finishing job 7, or a client correcting message 7, can never reach
someone else's row that inherited the number.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Sequence

from storage.checks import now
from storage.db import Database, Tx
from storage.errors import MigrationError, StoreError

Migration = Callable[[Tx], Awaitable[None]]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


async def migrate(db: Database, migrations: Sequence[Migration] | None = None) -> list[str]:
    """Apply the migrations this file lacks (default: all of `MIGRATIONS`); returns their names."""
    migrations = MIGRATIONS if migrations is None else migrations
    async with db.write() as tx:
        await tx.run(
            "CREATE TABLE IF NOT EXISTS migrations ("
            " name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
    async with db.read() as tx:
        done = {row["name"] for row in await tx.rows("SELECT name FROM migrations")}
    applied = []
    for fn in migrations:
        name = fn.__name__
        if name in done:
            continue
        async with db.write() as tx:
            if await tx.row("SELECT 1 FROM migrations WHERE name = ?", (name,)):
                continue  # another process applied it meanwhile
            try:
                await fn(tx)
            except (sqlite3.Error, StoreError, ValueError) as exc:
                raise MigrationError(f"migration {name} failed: {exc}") from exc
            await tx.run("INSERT INTO migrations (name, applied_at) VALUES (?, ?)", (name, now()))
        applied.append(name)
    return applied


async def _script(tx: Tx, *statements: str) -> None:
    # Not executescript(): it would COMMIT the surrounding transaction first.
    for statement in statements:
        await tx.run(statement)


@migration
async def m001_users(tx: Tx) -> None:
    await _script(
        tx,
        """CREATE TABLE users (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            platform TEXT NOT NULL CHECK (platform <> ''),
            platform_user_id TEXT NOT NULL CHECK (platform_user_id <> ''),
            display_name TEXT,
            is_admin INTEGER NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
            created_at TEXT NOT NULL,
            UNIQUE (platform, platform_user_id)
        )""",
    )


@migration
async def m002_messages(tx: Tx) -> None:
    await _script(
        tx,
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            platform TEXT NOT NULL,
            chat_id TEXT NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            content TEXT NOT NULL,
            platform_message_id TEXT,
            reply_to_id INTEGER REFERENCES messages (id) ON DELETE SET NULL,
            adapter_version TEXT,
            in_context INTEGER NOT NULL DEFAULT 1 CHECK (in_context IN (0, 1)),
            created_at TEXT NOT NULL
        )""",
        # recent_messages / last_bot_message / clear_context: newest turns of one chat
        "CREATE INDEX messages_by_chat ON messages (user_id, platform, chat_id, id)",
        "CREATE INDEX messages_by_reply ON messages (reply_to_id) WHERE reply_to_id IS NOT NULL",
        """CREATE TABLE platform_messages (
            platform TEXT NOT NULL,
            chat_id TEXT NOT NULL,
            platform_message_id TEXT NOT NULL CHECK (platform_message_id <> ''),
            message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            PRIMARY KEY (platform, chat_id, platform_message_id)
        )""",
        "CREATE INDEX platform_messages_by_message ON platform_messages (message_id)",
    )


@migration
async def m003_corrections_feedback(tx: Tx) -> None:
    await _script(
        tx,
        """CREATE TABLE corrections (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            message_id INTEGER REFERENCES messages (id) ON DELETE SET NULL,
            original_answer TEXT NOT NULL,
            corrected_answer TEXT NOT NULL CHECK (trim(corrected_answer) <> ''),
            context TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(context)),
            rewordings TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(rewordings)),
            status TEXT NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'accepted', 'rejected', 'trained')),
            reason TEXT,
            scope TEXT NOT NULL DEFAULT 'personal'
                CHECK (scope IN ('personal', 'shared_candidate', 'shared_approved')),
            approved_by INTEGER REFERENCES users (id) ON DELETE SET NULL,
            adapter_version TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        "CREATE INDEX corrections_by_user ON corrections (user_id, status, id)",
        "CREATE INDEX corrections_by_status ON corrections (status, scope, id)",
        "CREATE INDEX corrections_by_message ON corrections (message_id)",
        "CREATE INDEX corrections_by_approver ON corrections (approved_by)"
        " WHERE approved_by IS NOT NULL",
        """CREATE TABLE feedback (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            rating TEXT NOT NULL CHECK (rating IN ('up', 'down')),
            created_at TEXT NOT NULL,
            UNIQUE (user_id, message_id)
        )""",
        "CREATE INDEX feedback_by_message ON feedback (message_id)",
    )


@migration
async def m004_adapters(tx: Tx) -> None:
    await _script(
        tx,
        """CREATE TABLE adapters (
            version TEXT PRIMARY KEY CHECK (version <> ''),
            scope TEXT NOT NULL CHECK (scope IN ('personal', 'shared')),
            owner_id INTEGER REFERENCES users (id) ON DELETE CASCADE,
            path TEXT NOT NULL CHECK (path <> ''),
            parent_version TEXT,
            status TEXT NOT NULL CHECK (status IN ('candidate', 'active', 'rejected', 'retired')),
            metrics TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metrics)),
            reason TEXT,
            mlflow_run_id TEXT,
            created_at TEXT NOT NULL,
            activated_at TEXT,
            CHECK ((scope = 'shared') = (owner_id IS NULL))
        )""",
        # At most one active version per (scope, owner); NULL owners would never collide.
        "CREATE UNIQUE INDEX adapters_one_active ON adapters (scope, ifnull(owner_id, 0))"
        " WHERE status = 'active'",
        "CREATE INDEX adapters_by_owner ON adapters (owner_id, scope, status)",
    )


@migration
async def m005_training_jobs(tx: Tx) -> None:
    await _script(
        tx,
        """CREATE TABLE training_jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            target_user_id INTEGER REFERENCES users (id) ON DELETE CASCADE,
            requested_by INTEGER REFERENCES users (id) ON DELETE CASCADE,
            status TEXT NOT NULL DEFAULT 'queued'
                CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
            progress TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(progress)),
            result TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(result)),
            error TEXT,
            log TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT
        )""",
        "CREATE INDEX training_jobs_by_status ON training_jobs (status, id)",
        "CREATE INDEX training_jobs_by_target ON training_jobs (target_user_id)",
        "CREATE INDEX training_jobs_by_requester ON training_jobs (requested_by)",
    )
