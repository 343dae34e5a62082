"""The schema a blank file ends with, migrations bookkeeping, and opening/closing."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from storage import migrations as mig
from storage.db import Tx
from storage.errors import MigrationError, StoreClosedError, StoreError
from storage.store import Store

EXPECTED_COLUMNS = {
    "migrations": ["name", "applied_at"],
    "users": ["id", "platform", "platform_user_id", "display_name", "is_admin", "created_at"],
    "messages": [
        "id",
        "user_id",
        "platform",
        "chat_id",
        "role",
        "content",
        "platform_message_id",
        "reply_to_id",
        "adapter_version",
        "in_context",
        "created_at",
    ],
    "platform_messages": ["platform", "chat_id", "platform_message_id", "message_id"],
    "corrections": [
        "id",
        "user_id",
        "message_id",
        "original_answer",
        "corrected_answer",
        "context",
        "rewordings",
        "status",
        "reason",
        "scope",
        "approved_by",
        "adapter_version",
        "created_at",
        "updated_at",
    ],
    "feedback": ["id", "user_id", "message_id", "rating", "created_at"],
    "adapters": [
        "version",
        "scope",
        "owner_id",
        "path",
        "parent_version",
        "status",
        "metrics",
        "reason",
        "mlflow_run_id",
        "created_at",
        "activated_at",
    ],
    "training_jobs": [
        "id",
        "target_user_id",
        "requested_by",
        "status",
        "progress",
        "result",
        "error",
        "log",
        "created_at",
        "started_at",
        "finished_at",
    ],
    "sqlite_sequence": ["name", "seq"],  # AUTOINCREMENT bookkeeping: ids are never reused
}

EXPECTED_INDEXES = {
    "messages_by_chat",
    "messages_by_reply",
    "platform_messages_by_message",
    "corrections_by_user",
    "corrections_by_status",
    "corrections_by_message",
    "corrections_by_approver",
    "feedback_by_message",
    "adapters_one_active",
    "adapters_by_owner",
    "training_jobs_by_status",
    "training_jobs_by_target",
    "training_jobs_by_requester",
}

MIGRATION_NAMES = [
    "m001_users",
    "m002_messages",
    "m003_corrections_feedback",
    "m004_adapters",
    "m005_training_jobs",
]


def _schema(path: Path) -> tuple[dict[str, list[str]], set[str]]:
    with closing(sqlite3.connect(path)) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        columns = {t: [r[1] for r in conn.execute(f"PRAGMA table_info({t})")] for t in tables}
        indexes = {
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            )
        }
    return columns, indexes


async def test_blank_database_gets_exactly_the_expected_schema(db_path: Path) -> None:
    assert not db_path.parent.exists()  # the folder is created on start
    async with Store(db_path) as store:
        assert store.applied_migrations == MIGRATION_NAMES
    columns, indexes = _schema(db_path)
    assert columns == EXPECTED_COLUMNS
    assert indexes == EXPECTED_INDEXES


async def test_reopening_does_not_rerun_migrations(db_path: Path) -> None:
    async with Store(db_path):
        pass
    with closing(sqlite3.connect(db_path)) as conn:
        first = conn.execute("SELECT name, applied_at FROM migrations ORDER BY rowid").fetchall()
    async with Store(db_path) as store:
        assert store.applied_migrations == []
    with closing(sqlite3.connect(db_path)) as conn:
        again = conn.execute("SELECT name, applied_at FROM migrations ORDER BY rowid").fetchall()
    assert [name for name, _ in first] == MIGRATION_NAMES
    assert again == first  # same rows, same timestamps


async def test_a_new_migration_is_applied_once_on_restart(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Store(db_path):
        pass
    calls = []

    async def m006_add_notes(tx: Tx) -> None:
        calls.append(1)
        await tx.run("ALTER TABLE users ADD COLUMN notes TEXT")

    monkeypatch.setattr(mig, "MIGRATIONS", [*mig.MIGRATIONS, m006_add_notes])
    async with Store(db_path) as store:
        assert store.applied_migrations == ["m006_add_notes"]
    async with Store(db_path) as store:
        assert store.applied_migrations == []
    assert calls == [1]
    columns, _ = _schema(db_path)
    assert columns["users"][-1] == "notes"


async def test_a_failing_migration_is_rolled_back_and_reported(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def m006_broken(tx: Tx) -> None:
        await tx.run("CREATE TABLE half_done (x INTEGER)")
        await tx.run("THIS IS NOT SQL")

    monkeypatch.setattr(mig, "MIGRATIONS", [*mig.MIGRATIONS, m006_broken])
    with pytest.raises(MigrationError, match="m006_broken"):
        async with Store(db_path):
            pass
    columns, _ = _schema(db_path)
    assert "half_done" not in columns  # its transaction was rolled back
    with closing(sqlite3.connect(db_path)) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM migrations")]
    assert names == MIGRATION_NAMES  # the good ones stay applied


async def test_connection_settings(db_path: Path) -> None:
    async with Store(db_path) as store:
        async with store._db.read() as tx:
            settings = {
                name: (await tx.rows(f"PRAGMA {name}"))[0][0]
                for name in ("journal_mode", "foreign_keys", "busy_timeout", "synchronous")
            }
    assert settings == {
        "journal_mode": "wal",
        "foreign_keys": 1,
        "busy_timeout": 30_000,
        "synchronous": 2,  # FULL: an acknowledged write survives a power cut
    }


async def test_using_a_closed_store_is_a_clear_error(db_path: Path) -> None:
    store = Store(db_path)
    with pytest.raises(StoreClosedError):
        await store.list_users()
    await store.start()
    await store.start()  # idempotent
    assert await store.list_users() == []
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreClosedError):
        await store.get_or_create_user("console", "x")


async def test_a_file_that_is_not_a_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"not a database, but precious" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        async with Store(path):
            pass
    assert path.read_bytes() == b"not a database, but precious" * 100


async def test_bad_settings_are_refused(db_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        Store(db_path, synchronous="SOMETIMES")


def test_the_package_exports_the_store_records_and_errors() -> None:
    """`import storage` as other packages do (a fresh interpreter, repository root on the path)."""
    root = Path(__file__).resolve().parents[2]
    code = (
        "import storage, storage.models as m, storage.errors as e; "
        "names = set(storage.__all__); "
        "public = {n for mod in (m, e) for n in dir(mod) if n[0].isupper() and "
        "getattr(getattr(mod, n), '__module__', '') == mod.__name__}; "
        "assert public | {'Store'} == names, sorted(names ^ (public | {'Store'})); "
        "assert all(getattr(storage, n) is not None for n in names); print('ok')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "ok", done.stderr
