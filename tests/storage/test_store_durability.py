"""An acknowledged correction survives the process being killed right after."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

from storage.models import User
from storage.store import Store

WRITER = Path(__file__).with_name("store_writer.py")
ROOT = Path(__file__).resolve().parents[2]


async def test_sigkill_mid_stream_loses_no_acknowledged_correction(
    db_path: Path, store: Store, alice: User
) -> None:
    await store.close()  # the child is the only writer
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WRITER),
        str(db_path),
        str(alice.id),
        "0",  # write until killed
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    acknowledged: list[int] = []
    try:
        assert await asyncio.wait_for(child.stdout.readline(), timeout=30) == b"ready\n"
        while len(acknowledged) < 40:
            line = await asyncio.wait_for(child.stdout.readline(), timeout=30)
            assert line, "the writer died early"
            acknowledged.append(int(line))
    finally:
        child.send_signal(signal.SIGKILL)  # mid-stream: it is writing the next one
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    async with Store(db_path) as reopened:
        stored = await reopened.list_corrections(user_id=alice.id)
    assert set(acknowledged) <= {c.id for c in stored}
    assert all(c.corrected_answer.startswith("new ") and c.context for c in stored)  # whole rows
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
