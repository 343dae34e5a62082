"""Many writers at once: tasks sharing one Store, several Stores, several processes."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import pytest

from storage.errors import StoreBusyError
from storage.models import User
from storage.store import Store

WRITER = Path(__file__).with_name("store_writer.py")
ROOT = Path(__file__).resolve().parents[2]


def _correction_ids(db_path: Path) -> list[int]:
    with closing(sqlite3.connect(db_path)) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM corrections ORDER BY id")]


async def _write(store: Store, user_id: int, count: int, tag: str) -> list[int]:
    ids = []
    for index in range(count):
        made = await store.add_correction(user_id, None, "old", f"{tag}-{index}", [])
        ids.append(made.id)
    return ids


async def test_twenty_tasks_times_fifty_corrections_none_lost(db_path: Path) -> None:
    # NORMAL skips the per-commit fsync (FULL is the default): this test is about the lock.
    async with Store(db_path, synchronous="NORMAL") as store:
        user = await store.get_or_create_user("console", "me")
        results = await asyncio.gather(*(_write(store, user.id, 50, f"t{t}") for t in range(20)))
        acknowledged = sorted(i for ids in results for i in ids)
        assert len(acknowledged) == len(set(acknowledged)) == 1000
        stored = await store.list_corrections(user_id=user.id)
    assert sorted(c.id for c in stored) == acknowledged == _correction_ids(db_path)
    assert {c.corrected_answer for c in stored} == {
        f"t{t}-{i}" for t in range(20) for i in range(50)
    }


async def test_two_stores_on_one_file_write_concurrently(db_path: Path) -> None:
    async with Store(db_path) as one, Store(db_path) as two:
        user = await one.get_or_create_user("console", "me")
        same = await two.get_or_create_user("console", "me")
        assert same.id == user.id
        results = await asyncio.gather(
            *(
                _write(store, user.id, 25, f"{name}{t}")
                for t in range(4)
                for name, store in (("one", one), ("two", two))
            )
        )
    acknowledged = sorted(i for ids in results for i in ids)
    assert len(acknowledged) == 200 and acknowledged == _correction_ids(db_path)


async def test_another_process_writing_at_the_same_time(
    db_path: Path, alice: User, store: Store
) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WRITER),
        str(db_path),
        str(alice.id),
        "100",
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    ours = await _write(store, alice.id, 100, "parent")
    out, err = await asyncio.wait_for(child.communicate(), timeout=60)
    assert child.returncode == 0, err.decode()
    theirs = [int(line) for line in out.decode().split()[1:]]
    assert len(theirs) == 100
    assert sorted(ours + theirs) == _correction_ids(db_path)


async def test_begin_retries_while_another_process_holds_the_write_lock(
    db_path: Path, alice: User
) -> None:
    async with Store(db_path, busy_timeout_ms=20, begin_retries=6) as store:
        with closing(sqlite3.connect(db_path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            loop = asyncio.get_running_loop()
            loop.call_later(0.3, other.execute, "COMMIT")
            made = await store.add_correction(alice.id, None, "old", "new", [])
        assert made.id in _correction_ids(db_path)


async def test_busy_for_too_long_is_a_clear_error_and_writes_nothing(
    db_path: Path, alice: User
) -> None:
    async with Store(db_path, busy_timeout_ms=10, begin_retries=1) as store:
        with closing(sqlite3.connect(db_path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreBusyError, match="locked by another process"):
                await store.add_correction(alice.id, None, "old", "new", [])
            other.execute("COMMIT")
        assert _correction_ids(db_path) == []
        made = await store.add_correction(alice.id, None, "old", "new", [])  # works again
        assert _correction_ids(db_path) == [made.id]


async def test_cancelled_writers_leave_no_open_transaction(db_path: Path) -> None:
    """Cancel tasks at many points (waiting for the lock, in BEGIN, the body, COMMIT)."""
    async with Store(db_path, synchronous="NORMAL") as store:
        user = await store.get_or_create_user("console", "me")
        acknowledged: set[int] = set()
        for spins in (0, 1, 2, 3, 5, 8, 13, 21, 34):
            tasks = [
                asyncio.create_task(store.add_correction(user.id, None, "old", f"n{i}", []))
                for i in range(8)
            ]
            for _ in range(spins):
                await asyncio.sleep(0)
            for task in tasks[::2]:
                task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            errors = [o for o in outcomes if isinstance(o, Exception)]
            assert errors == []  # only CancelledError (a BaseException) or a stored row
            acknowledged |= {o.id for o in outcomes if not isinstance(o, BaseException)}
        assert store._db._conn is not None and not store._db._conn.in_transaction
        after = await store.add_correction(user.id, None, "old", "after", [])
    stored = set(_correction_ids(db_path))
    assert acknowledged | {after.id} <= stored  # every acknowledged row is there
