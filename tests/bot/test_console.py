"""The console adapter end to end, with in-memory streams."""

from __future__ import annotations

import asyncio
import io

from bot.console import ConsoleBot
from bot.service import ChatService
from storage.models import CorrectionStatus
from storage.store import Store


async def run_console(service: ChatService, lines: str) -> str:
    output = io.StringIO()
    async with ConsoleBot(
        service, input_stream=io.StringIO(lines), output=output, user_name="tester"
    ) as bot:
        await asyncio.wait_for(bot.run(), 10)
    return output.getvalue()


async def test_chat_correct_status_quit(service: ChatService, store: Store, learner) -> None:
    script = "Capital of France?\n/correct Paris.\n/status\n/quit\nnever read\n"
    out = await run_console(service, script)

    assert "/correct <the right answer>" in out  # the banner explains corrections
    assert "/retrain" in out  # the console user is an admin by default
    assert "ouro> Paris is the capital of France.\n" in out
    corrections = await store.list_corrections()
    assert len(corrections) == 1
    correction = corrections[0]
    assert correction.corrected_answer == "Paris." and correction.status == CorrectionStatus.PENDING
    assert correction.original_answer == "Paris is the capital of France."
    assert f"Correction #{correction.id} is saved" in out
    assert f"#{correction.id} pending: Paris." in out
    assert out.rstrip().endswith("Bye.")
    assert "never read" not in out
    user = await store.find_user("console", "tester")
    assert user is not None and user.is_admin and learner.notified == [user.id]


async def test_eof_ends_and_refusals_are_shown(service: ChatService, store: Store) -> None:
    long_line = "x" * 5000
    out = await run_console(service, f"\n   \n{long_line}\n/nope\n/correct\n/forget\n")
    assert "! Your message is too long (5000 characters; the limit is 4000)" in out
    assert "! Unknown command /nope" in out
    assert "! Tell me the right answer" in out
    assert "cannot be undone" in out and "/forget confirm" in out
    assert out.rstrip().endswith("Bye.")
    user = await store.find_user("console", "tester")
    assert user is not None
    assert await store.recent_messages(user.id, "console", "console", 10) == []


async def test_admin_command_progress_is_printed(service: ChatService, learner) -> None:
    out = await run_console(service, "/retrain\n")
    assert "… step 1/3" in out and "Trained everyone" in out
    assert len(learner.retrained) == 1


async def test_non_admin_console_user(service: ChatService, learner, chat_config) -> None:
    from dataclasses import replace

    strict = ChatService(
        service.store, service.engine, learner, replace(chat_config, console_user_is_admin=False)
    )
    out = await run_console(strict, "/retrain\n/quit\n")
    assert "/retrain" not in out.split("you>")[0]  # banner without admin commands
    assert "! Only admins can start training." in out
    assert learner.retrained == []


async def test_reading_does_not_block_the_event_loop(service: ChatService) -> None:
    class SlowInput(io.StringIO):
        def readline(self, size: int = -1) -> str:
            import time

            time.sleep(0.2)  # a user thinking; must happen off the loop
            return super().readline(size)

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    async with ConsoleBot(
        service, input_stream=SlowInput("hi\n"), output=io.StringIO(), user_name="t"
    ) as bot:
        await bot.run()
    task.cancel()
    assert ticks >= 10  # the loop kept running during two 0.2 s reads (blocked: ~2)
