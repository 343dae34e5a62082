"""The composition root wires real parts together: store, learner, chat service, console, CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bot.console import ConsoleBot
from model.fake import FakeEngine
from ouro.app import open_core
from ouro.settings import Settings
from storage import Store


def settings_for(tmp_path: Path, **extra: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", _env_file=None, **extra)  # type: ignore[call-arg]


async def test_console_chat_and_correction_through_the_wired_core(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, train_interval_minutes=600)
    engine = FakeEngine({"who made you?": "A cat."})
    lines = "Who made you?\n/correct The Ouro team made me.\n/status\n/quit\n"
    out = io.StringIO()
    async with open_core(settings, engine=engine, learner_in_process=False) as core:
        async with ConsoleBot(core.service, input_stream=io.StringIO(lines), output=out) as bot:
            await bot.run()
        corrections = await core.store.list_corrections()
    text = out.getvalue()
    assert "A cat." in text
    assert len(corrections) == 1
    assert corrections[0].corrected_answer == "The Ouro team made me."
    assert corrections[0].original_answer == "A cat."
    assert f"#{corrections[0].id}" in text  # the confirmation names the stored correction
    assert (settings.data_dir / "ouro.db").is_file()


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"OURO_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-m", "ouro", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=180,
    )


async def _seed(tmp_path: Path) -> int:
    async with Store(tmp_path / "data" / "ouro.db") as store:
        user = await store.get_or_create_user("telegram", "42", "ada")
        other = await store.get_or_create_user("telegram", "43", "bob")
        q = await store.add_message(user.id, "telegram", "c1", "user", "Who wrote Ouro?")
        a = await store.add_message(user.id, "telegram", "c1", "assistant", "Nobody.")
        await store.add_correction(
            user.id, a.id, "Nobody.", "The Loop team.", [{"role": "user", "content": q.content}]
        )
        await store.add_message(other.id, "telegram", "c2", "user", "Hi")
        return user.id


async def test_export_and_forget_from_the_command_line(tmp_path: Path) -> None:
    user_id = await _seed(tmp_path)
    exported = _cli(tmp_path, "export", "--user", "42", "--platform", "telegram")
    assert exported.returncode == 0, exported.stderr
    data = json.loads(exported.stdout)
    assert data["user"]["id"] == user_id
    assert [c["corrected_answer"] for c in data["corrections"]] == ["The Loop team."]

    refused = _cli(tmp_path, "export", "--user", "#999")
    assert refused.returncode != 0
    assert "no user" in refused.stderr

    forgot = _cli(tmp_path, "forget", "--user", "@ada", "--yes")
    assert forgot.returncode == 0, forgot.stderr
    async with Store(tmp_path / "data" / "ouro.db") as store:
        assert await store.get_user(user_id) is None
        assert await store.find_user("telegram", "43") is not None  # others untouched


@pytest.mark.parametrize("name", ["OURO_MAX_BATCH_SIZE=0", "OURO_LEARNER_MODE=sometimes"])
def test_bad_settings_name_the_variable(tmp_path: Path, name: str) -> None:
    key, value = name.split("=")
    env = {key: value, "PATH": "/usr/bin:/bin", "OURO_DATA_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "ouro", "run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert key in proc.stderr and "Traceback" not in proc.stderr
