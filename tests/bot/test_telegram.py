"""The Telegram adapter end to end: real PTB Application -> fake Bot API on 127.0.0.1.

The service is the real ChatService on a real SQLite Store with the FakeEngine and the
FakeLearner (tests/bot/conftest.py). To run these against another engine or learner,
override the `engine` / `learner` fixtures; `telegram` starts the adapter on whatever
`service` resolves to.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from telegram.error import InvalidToken

from bot.service import ChatService
from bot.telegram import ALLOWED_UPDATES, TelegramBot
from model.fake import FakeEngine
from storage.models import Rating, Role
from storage.store import Store

try:
    from tests.bot.fake_telegram import FakeTelegram, buttons, running_bot, stored_id
    from tests.bot.fakes import FakeLearner
except ModuleNotFoundError:  # pytest started without the repository root on sys.path
    from fake_telegram import (  # type: ignore[no-redef]
        FakeTelegram,
        buttons,
        running_bot,
        stored_id,
    )
    from fakes import FakeLearner  # type: ignore[no-redef]

Json = dict[str, Any]
ALICE = FakeTelegram.user(100, "Alice", "alice")
BOB = FakeTelegram.user(200, "Bob", "bob")
ADMIN = FakeTelegram.user(999, "Root", "root")  # an admin in conftest's chat_config
PARIS = "Paris is the capital of France."


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as fake:
        yield fake


@pytest.fixture
async def telegram(service: ChatService, tg: FakeTelegram) -> AsyncIterator[TelegramBot]:
    """The adapter polling the fake, with test-speed timings; 999 is an admin."""
    async with running_bot(service, tg, admin_ids=["999"]) as bot:
        yield bot


async def eventually(probe: Callable[[], Awaitable[Any]], within: float = 5.0) -> Any:
    """Poll `probe` until it returns something truthy (for effects no message announces)."""
    async with asyncio.timeout(within):
        while not (result := await probe()):  # noqa: ASYNC110 - the store has no events
            await asyncio.sleep(0.02)
        return result


# --- end to end ---------------------------------------------------------------------------------


async def test_private_chat_streams_answer_and_links_it(
    telegram: TelegramBot, tg: FakeTelegram, store: Store
) -> None:
    answer = await tg.answer_to(ALICE, "Capital of France?")

    assert answer["text"] == PARIS
    assert buttons(answer) == [f"{a}:{stored_id(answer)}" for a in ("up", "down", "fix")]
    stored = await store.find_by_platform_id("telegram", "100", str(answer["message_id"]))
    assert stored is not None and stored.role == Role.ASSISTANT and stored.content == PARIS
    assert stored.id == stored_id(answer)
    methods = [c.method for c in tg.calls if c.params.get("chat_id") == 100]
    assert methods.index("sendChatAction") < methods.index("sendMessage")
    assert methods.index("sendMessage") < methods.index("editMessageText")
    first = tg.calls_of("sendMessage")[0].params
    assert first["text"] == "Paris" and PARIS.startswith(first["text"])
    assert all("parse_mode" not in c.params for c in tg.calls)
    assert set(ALLOWED_UPDATES) <= set(tg.allowed_updates) and "message_reaction" in ALLOWED_UPDATES
    menu = await tg.wait_for(lambda: tg.commands.get('{"type": "default"}'))
    assert {c["command"] for c in menu} >= {"help", "correct", "status", "reset", "forget"}


async def test_answers_stream_progressively(
    telegram: TelegramBot, tg: FakeTelegram, engine: FakeEngine
) -> None:
    engine.answers["count"] = " ".join(f"word{i}" for i in range(12))
    engine.delay = 0.03
    answer = await tg.answer_to(ALICE, "count")

    edits = [
        c for c in tg.calls_of("editMessageText") if c.params["message_id"] == answer["message_id"]
    ]
    assert len(edits) >= 2  # several intermediate versions, then the final text
    assert len(edits[0].params["text"]) < len(edits[-1].params["text"]) == len(answer["text"])
    gaps = [b.at - a.at for a, b in itertools.pairwise(edits)]
    assert min(gaps) >= 0.04  # throttled to edit_interval


async def test_correct_as_reply_is_stored_before_confirming(
    telegram: TelegramBot, tg: FakeTelegram, store: Store, learner: FakeLearner
) -> None:
    answer = await tg.answer_to(ALICE, "Capital of France?")
    confirm = await tg.reply_to(
        ALICE, "/correct Paris, on the Seine.", reply_to=answer["message_id"]
    )

    assert re.search(r"Correction #\d+ is saved", confirm["text"])
    corrections = await store.list_corrections()
    assert len(corrections) == 1  # committed by the time the confirmation was sent
    assert corrections[0].corrected_answer == "Paris, on the Seine."
    assert corrections[0].message_id == stored_id(answer)
    assert corrections[0].question == "Capital of France?"
    assert learner.notified
    status = await tg.reply_to(ALICE, "/status")
    assert "1 pending" in status["text"]


async def test_correct_without_reply_targets_latest_answer(
    telegram: TelegramBot, tg: FakeTelegram, store: Store
) -> None:
    await tg.answer_to(ALICE, "hello")
    latest = await tg.answer_to(ALICE, "Capital of France?")
    await tg.reply_to(ALICE, "/correct Paris.")
    (correction,) = await store.list_corrections()
    assert correction.message_id == stored_id(latest)


async def test_pencil_button_asks_with_force_reply_and_takes_the_reply(
    telegram: TelegramBot, tg: FakeTelegram, store: Store
) -> None:
    answer = await tg.answer_to(ALICE, "Capital of France?")
    query = tg.press_button(ALICE, 100, answer["message_id"], f"fix:{stored_id(answer)}")
    prompt = await tg.wait_for_bot_message(100, "Reply to this message with the right answer")
    assert tg.client_markup[(100, prompt["message_id"])]["force_reply"] is True
    assert await tg.wait_for(lambda: query in tg.callback_answers)

    confirm = await tg.reply_to(ALICE, "Paris — obviously 🇫🇷", reply_to=prompt["message_id"])
    assert "is saved" in confirm["text"]
    (correction,) = await store.list_corrections()
    assert (correction.message_id, correction.corrected_answer) == (
        stored_id(answer), "Paris — obviously 🇫🇷",
    )  # fmt: skip


async def test_thumb_buttons_store_feedback_and_down_invites_a_correction(
    telegram: TelegramBot, tg: FakeTelegram, store: Store
) -> None:
    answer = await tg.answer_to(ALICE, "Capital of France?")
    up = tg.press_button(ALICE, 100, answer["message_id"], f"up:{stored_id(answer)}")
    toast = await tg.wait_for(lambda: tg.callback_answers.get(up))
    assert "Thanks" in toast["text"]
    assert [f.rating for f in await store.list_feedback()] == [Rating.UP]

    down = tg.press_button(ALICE, 100, answer["message_id"], f"down:{stored_id(answer)}")
    await tg.wait_for(lambda: tg.callback_answers.get(down))
    prompt = await tg.wait_for_bot_message(100, "What should I have said")
    assert [f.rating for f in await store.list_feedback()] == [Rating.DOWN]  # replaced
    assert tg.client_markup[(100, prompt["message_id"])]["force_reply"] is True
    await tg.reply_to(ALICE, "Paris.", reply_to=prompt["message_id"])
    (correction,) = await store.list_corrections()
    assert correction.message_id == stored_id(answer)


async def test_message_reactions_are_feedback(
    telegram: TelegramBot, tg: FakeTelegram, store: Store
) -> None:
    answer = await tg.answer_to(ALICE, "Capital of France?")
    tg.react(ALICE, 100, answer["message_id"], ["👍"])
    feedback = await eventually(store.list_feedback)
    assert [(f.rating, f.message_id) for f in feedback] == [(Rating.UP, stored_id(answer))]

    tg.react(ALICE, 100, answer["message_id"], ["👎"], old=["👍"])
    await tg.wait_for_bot_message(100, "What should I have said")
    assert [f.rating for f in await store.list_feedback()] == [Rating.DOWN]


async def test_group_chat_answers_only_mentions_and_replies(
    telegram: TelegramBot, tg: FakeTelegram, engine: FakeEngine
) -> None:
    group = tg.group_chat()
    ignored = tg.send_user_message(ALICE, "hello everyone", chat=group)
    other_bot = tg.send_user_message(ALICE, "/status@some_other_bot", chat=group)
    fan = tg.send_user_message(ALICE, "@ouro_test_bot_fan says hi", chat=group)
    mentioned = await tg.answer_to(ALICE, "@ouro_test_bot Capital of France?", chat=group)
    assert mentioned["text"] == PARIS  # the mention is not part of the question
    followup = await tg.answer_to(BOB, "Is that so?", chat=group, reply_to=mentioned["message_id"])
    assert followup["text"] == "You said: Is that so?"
    command = await tg.reply_to(ALICE, "/help@ouro_test_bot", chat=group)
    assert "/correct" in command["text"]

    await asyncio.sleep(0.3)
    assert tg.replies_to(ignored) == tg.replies_to(other_bot) == tg.replies_to(fan) == []
    assert [r.messages[-1].content for r in engine.requests] == [
        "Capital of France?",
        "Is that so?",
    ]


async def test_admin_retrain_edits_one_progress_message(
    telegram: TelegramBot, tg: FakeTelegram, learner: FakeLearner
) -> None:
    learner.progress_lines = 5
    sends_before = len(tg.calls_of("sendMessage"))
    sent = tg.send_user_message(ADMIN, "/retrain")
    final = await tg.wait_for_bot_message(999, "Trained everyone")
    assert final["reply_to_message"]["message_id"] == sent["message_id"]
    sends = [c for c in tg.calls_of("sendMessage")[sends_before:] if c.params["chat_id"] == 999]
    assert len(sends) == 1 and sends[0].params["text"].startswith("⏳ Retraining")
    edits = [c.params["text"] for c in tg.calls_of("editMessageText")]
    assert any("step" in text for text in edits) and edits[-1] == final["text"]
    assert learner.retrained == [(None, learner.retrained[0][1])]

    refused = await tg.reply_to(ALICE, "/retrain")
    assert "Only admins" in refused["text"] and len(learner.retrained) == 1


async def test_forget_needs_the_confirm_button_of_the_same_user(
    telegram: TelegramBot, tg: FakeTelegram, store: Store, learner: FakeLearner
) -> None:
    group = tg.group_chat()
    await tg.answer_to(ALICE, "@ouro_test_bot Capital of France?", chat=group)
    question = await tg.reply_to(ALICE, "/forget", chat=group)
    assert "cannot be undone" in question["text"]
    assert buttons(question) == ["forget:100", "keep:100"]

    query = tg.press_button(BOB, group["id"], question["message_id"], "forget:100")
    refusal = await tg.wait_for(lambda: tg.callback_answers.get(query))
    assert "Only the person who asked" in refusal["text"] and refusal["show_alert"] == "true"
    assert learner.forgotten == [] and await store.find_user("telegram", "100") is not None

    tg.press_button(ALICE, group["id"], question["message_id"], "forget:100")
    done = await tg.wait_for_bot_message(group["id"], "everything I stored about you is deleted")
    assert done["message_id"] == question["message_id"] and "reply_markup" not in done
    assert learner.forgotten and await store.find_user("telegram", "100") is None


async def test_forget_cancel_keeps_everything(
    telegram: TelegramBot, tg: FakeTelegram, store: Store, learner: FakeLearner
) -> None:
    await tg.answer_to(ALICE, "Capital of France?")
    question = await tg.reply_to(ALICE, "/forget")
    tg.press_button(ALICE, 100, question["message_id"], "keep:100")
    await tg.wait_for_bot_message(100, "Nothing was deleted")
    assert learner.forgotten == [] and await store.find_user("telegram", "100") is not None


async def test_reset_rollback_and_approve_commands(
    telegram: TelegramBot, tg: FakeTelegram, store: Store, engine: FakeEngine,
    learner: FakeLearner,
) -> None:  # fmt: skip
    answer = await tg.answer_to(ALICE, "Capital of France?")
    await tg.reply_to(ALICE, "/correct Paris.", reply_to=answer["message_id"])
    assert "Starting over" in (await tg.reply_to(ALICE, "/reset"))["text"]
    await tg.answer_to(ALICE, "hello")
    assert [m.content for m in engine.requests[-1].messages][1:] == ["hello"]

    assert "Only admins" in (await tg.reply_to(ALICE, "/rollback"))["text"]
    assert "Only admins" in (await tg.reply_to(ALICE, "/approve 1"))["text"]
    assert learner.rolled_back == []
    (correction,) = await store.list_corrections()
    approved = await tg.reply_to(ADMIN, f"/approve {correction.id}")
    assert f"Correction #{correction.id} is approved" in approved["text"]
    assert (await store.get_correction(correction.id)).scope == "shared_approved"  # type: ignore[union-attr]
    rolled = await tg.reply_to(ADMIN, "/rollback@ouro_test_bot")
    assert "Rolled back the shared adapter" in rolled["text"] and learner.rolled_back == [None]


async def test_close_lets_an_answer_in_flight_finish_and_stops_polling(
    service: ChatService, tg: FakeTelegram, store: Store, engine: FakeEngine
) -> None:
    engine.answers["slow"] = " ".join(f"w{i}" for i in range(20))
    engine.delay = 0.02
    async with running_bot(service, tg):
        tg.send_user_message(ALICE, "slow")
        await tg.wait_for_call("sendMessage")
    polls = len(tg.calls_of("getUpdates"))
    (answer,) = tg.bot_messages(100)
    assert answer["text"] == engine.answers["slow"] and buttons(answer)
    stored = await store.find_by_platform_id("telegram", "100", str(answer["message_id"]))
    assert stored is not None and stored.content == answer["text"]
    await asyncio.sleep(0.3)
    assert len(tg.calls_of("getUpdates")) == polls


async def test_a_rejected_token_is_a_clear_error_that_does_not_leak_it(
    service: ChatService, tg: FakeTelegram
) -> None:
    bot = TelegramBot(service, "123:WRONG-SECRET", base_url=tg.base_url)
    with pytest.raises(InvalidToken) as raised:
        await bot.start()
    assert "WRONG-SECRET" not in str(raised.value) and "rejected" in str(raised.value)
    await bot.close()  # closing after a failed start is harmless


async def test_fake_accepts_json_bodies_and_rejects_unknown_methods_and_tokens(
    tg: FakeTelegram,
) -> None:
    tg.private_chat(ALICE)
    async with httpx.AsyncClient(base_url=tg.base_url) as http:
        sent = await http.post(f"/bot{tg.token}/sendMessage", json={"chat_id": 100, "text": "hi"})
        assert sent.json()["result"]["text"] == "hi" and tg.bot_messages(100)[0]["text"] == "hi"
        empty = await http.post(f"/bot{tg.token}/sendMessage", json={"chat_id": 100, "text": ""})
        assert empty.status_code == 400 and "empty" in empty.json()["description"]
        assert (await http.post(f"/bot{tg.token}/noSuchMethod")).status_code == 404
        assert (await http.post("/botWRONG/getMe")).status_code == 401


# --- bad input ----------------------------------------------------------------------------------


async def test_empty_and_oversized_messages_and_corrections_are_refused(
    telegram: TelegramBot, tg: FakeTelegram, store: Store, engine: FakeEngine
) -> None:
    assert "empty" in (await tg.reply_to(ALICE, "   "))["text"]
    assert "too long" in (await tg.reply_to(ALICE, "x" * 10_000))["text"]
    answer = await tg.answer_to(ALICE, "Capital of France?")
    empty = await tg.reply_to(ALICE, "/correct", reply_to=answer["message_id"])
    assert "Tell me the right answer" in empty["text"]
    huge = await tg.reply_to(ALICE, "/correct " + "y" * 10_000, reply_to=answer["message_id"])
    assert "too long" in huge["text"]
    assert await store.list_corrections() == []
    assert len(engine.requests) == 1


async def test_long_answers_are_split_and_every_part_is_linked(
    telegram: TelegramBot, tg: FakeTelegram, store: Store, engine: FakeEngine
) -> None:
    long_answer = " ".join(f"{i:03d}" + "é" * 196 + "😀" for i in range(50))  # ~10,050 chars
    engine.answers["long please"] = long_answer
    last = await tg.answer_to(ALICE, "long please")

    parts = [m for m in tg.bot_messages(100) if m["message_id"] <= last["message_id"]]
    assert len(parts) == 3 and all(len(p["text"].encode("utf-16-le")) <= 8192 for p in parts)
    assert " ".join(p["text"] for p in parts) == long_answer
    stored = {
        await store.find_by_platform_id("telegram", "100", str(p["message_id"])) for p in parts
    }
    assert len(stored) == 1 and next(iter(stored)).content == long_answer  # type: ignore[union-attr]
    assert [bool(buttons(p)) for p in parts] == [False, False, True]


async def test_correct_must_target_the_users_own_bot_answer(
    telegram: TelegramBot, tg: FakeTelegram, store: Store
) -> None:
    nothing = await tg.reply_to(ALICE, "/correct Paris.")
    assert "no answer of mine" in nothing["text"]
    question = tg.send_user_message(ALICE, "Capital of France?")
    await tg.wait_for(lambda: tg.replies_to(question))
    own = await tg.reply_to(ALICE, "/correct Paris.", reply_to=question["message_id"])
    assert "not one of my answers" in own["text"]

    group = tg.group_chat()
    alices = await tg.answer_to(ALICE, "@ouro_test_bot Capital of France?", chat=group)
    bobs = await tg.reply_to(BOB, "/correct Lyon.", chat=group, reply_to=alices["message_id"])
    assert "only correct answers I gave to you" in bobs["text"]
    prompt_query = tg.press_button(
        BOB, group["id"], alices["message_id"], f"fix:{stored_id(alices)}"
    )
    await tg.wait_for(lambda: prompt_query in tg.callback_answers)
    prompt = await tg.wait_for_bot_message(group["id"], "@bob .*right answer")
    via_prompt = await tg.reply_to(BOB, "Lyon.", chat=group, reply_to=prompt["message_id"])
    assert "only correct answers I gave to you" in via_prompt["text"]
    assert await store.list_corrections() == []


async def test_unknown_commands_and_non_text_get_a_clear_answer(
    telegram: TelegramBot, tg: FakeTelegram
) -> None:
    unknown = await tg.reply_to(ALICE, "/frobnicate now")
    assert "Unknown command /frobnicate" in unknown["text"] and "/help" in unknown["text"]
    sticker = tg.send_user_sticker(ALICE)
    reply = await tg.wait_for(lambda: tg.first_reply(sticker))
    assert "only read text" in reply["text"]
    start = await tg.reply_to(ALICE, "/start")
    assert "/correct" in start["text"]


async def test_markdown_breaking_emoji_and_rtl_text_round_trips_as_plain_text(
    telegram: TelegramBot, tg: FakeTelegram, store: Store
) -> None:
    nasty = "*bold _it [link](http://x) `code <b>&amp; مرحبا עולם 👨‍👩‍👧 \\_ ~~"
    answer = await tg.answer_to(ALICE, nasty)
    assert answer["text"] == f"You said: {nasty}"
    await tg.reply_to(ALICE, f"/correct {nasty} ✅", reply_to=answer["message_id"])
    (correction,) = await store.list_corrections()
    assert correction.corrected_answer == f"{nasty} ✅" and correction.question == nasty
    assert all("parse_mode" not in c.params for c in tg.calls)


async def test_a_flood_is_rate_limited_without_crashing(
    telegram: TelegramBot, tg: FakeTelegram, store: Store, engine: FakeEngine
) -> None:
    sent = [tg.send_user_message(ALICE, f"message {i}") for i in range(200)]
    asked = {m["message_id"] for m in sent}

    def replies() -> dict[int, str] | None:
        found = {
            m["reply_to_message"]["message_id"]: m["text"]
            for m in tg.bot_messages(100)
            if m.get("reply_to_message", {}).get("message_id") in asked
        }  # fmt: skip
        return found if len(found) == len(asked) else None

    answered = await tg.wait_for(replies, within=60)
    refused = [i for i in asked if "too fast" in answered[i]]
    assert len(refused) == 188 and len(engine.requests) == 12
    user = await store.find_user("telegram", "100")
    assert user is not None
    turns = await store.recent_messages(user.id, "telegram", "100", 500)
    assert (
        sum(t.role == Role.USER for t in turns)
        == sum(t.role == Role.ASSISTANT for t in turns)
        == 12
    )
    assert (await tg.answer_to(ADMIN, "still there?"))["text"] == "You said: still there?"


async def test_429_mid_stream_still_delivers_and_stores_the_answer(
    telegram: TelegramBot, tg: FakeTelegram, store: Store, engine: FakeEngine
) -> None:
    engine.delay = 0.01
    tg.rate_limit_next("sendMessage", 1, retry_after=0.3)
    tg.rate_limit_next("editMessageText", 2, retry_after=0.2)
    answer = await tg.answer_to(ALICE, "Capital of France?")
    assert answer["text"] == PARIS
    assert [c.params.get("chat_id") for c in tg.calls_of("sendMessage")].count(100) == 2  # 429 + ok
    stored = await store.find_by_platform_id("telegram", "100", str(answer["message_id"]))
    assert stored is not None and stored.content == PARIS


async def test_deleted_message_mid_stream_is_sent_anew_and_linked(
    telegram: TelegramBot, tg: FakeTelegram, store: Store, engine: FakeEngine
) -> None:
    engine.delay = 0.01
    tg.fail_next_edit(1)
    answer = await tg.answer_to(ALICE, "Capital of France?")
    assert answer["text"] == PARIS
    bot_ids = [m["message_id"] for m in tg.bot_messages(100)]
    assert len(bot_ids) == 2  # the "deleted" one and its replacement
    for platform_id in bot_ids:
        stored = await store.find_by_platform_id("telegram", "100", str(platform_id))
        assert stored is not None and stored.id == stored_id(answer)


async def test_a_send_timeout_keeps_the_stored_turn_and_the_bot_alive(
    service: ChatService, tg: FakeTelegram, store: Store
) -> None:
    async with running_bot(service, tg, request_timeout=0.3):
        tg.stall_next("sendMessage", 0.8)
        sent = tg.send_user_message(ALICE, "Capital of France?")
        user = await eventually(lambda: store.find_user("telegram", "100"))
        turns = await eventually(
            lambda: _assistant_turns(store, user.id)  # stored although Telegram timed out
        )
        assert turns[0].content == PARIS
        answer = await tg.wait_for(
            lambda: next((m for m in tg.bot_messages(100) if buttons(m)), None), within=5
        )
        assert answer["text"] == PARIS and stored_id(answer) == turns[0].id
        assert tg.replies_to(sent)
        again = await tg.answer_to(ALICE, "hello")
        assert again["text"] == "You said: hello"


async def _assistant_turns(store: Store, user_id: int) -> list[Any]:
    turns = await store.recent_messages(user_id, "telegram", "100", 10)
    return [t for t in turns if t.role == Role.ASSISTANT]


async def test_engine_failure_apologises_once_and_the_bot_carries_on(
    telegram: TelegramBot, tg: FakeTelegram, engine: FakeEngine
) -> None:
    engine.fail_with = RuntimeError("boom")
    sent = tg.send_user_message(ALICE, "Capital of France?")
    apology = await tg.wait_for(lambda: tg.first_reply(sent))
    assert "something went wrong" in apology["text"]
    engine.fail_with = None
    assert (await tg.answer_to(ALICE, "Capital of France?"))["text"] == PARIS
    assert sum("went wrong" in m["text"] for m in tg.bot_messages(100)) == 1
