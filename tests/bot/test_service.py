"""ChatService chatting: stored turns, history, reply chains, answer life cycle, refusals."""

from __future__ import annotations

import asyncio
import gc

import pytest

from bot.answer import ENGINE_ERROR_TEXT
from bot.service import Actor, Answer, ChatService
from model.fake import FakeEngine
from model.interface import AdapterSpec, ChatMessage
from storage.models import Role
from storage.store import Store


async def say(service: ChatService, actor: Actor, text: str, **kwargs: str) -> Answer:
    answer = await service.chat(actor, text, **kwargs)
    async for _ in answer:
        pass
    return answer


async def test_chat_stores_both_turns_with_the_adapter_version(
    service: ChatService, store: Store, engine: FakeEngine, alice: Actor
) -> None:
    user = await service.user_for(alice)
    engine.teach("alice-v1", {"capital of france?": "Paris, of course."})
    await engine.activate(AdapterSpec("alice-v1", "/x", owner=str(user.id)))

    answer = await service.chat(alice, "Capital of France?", platform_message_id="tg-1")
    assert answer.refusal is None
    chunks = [chunk async for chunk in answer]

    assert "".join(chunks) == answer.text == "Paris, of course."
    assert answer.adapter_version == "alice-v1" and answer.finish_reason == "stop"
    turns = await store.recent_messages(user.id, "telegram", "chat-100", 10)
    assert [(t.role, t.content) for t in turns] == [
        (Role.USER, "Capital of France?"),
        (Role.ASSISTANT, "Paris, of course."),
    ]
    question, reply = turns
    assert (question.id, reply.id) == (answer.user_message_id, answer.message_id)
    assert question.platform_message_id == "tg-1"
    assert reply.reply_to_id == question.id and reply.adapter_version == "alice-v1"
    request = engine.requests[-1]
    assert request.user_key == str(user.id)
    assert request.messages[0] == ChatMessage("system", service.config.system_prompt)
    assert request.sampling.max_new_tokens == 50 and request.sampling.temperature == 0.0


async def test_user_turn_is_stored_before_the_stream_ends(
    service: ChatService, store: Store, alice: Actor
) -> None:
    answer = await service.chat(alice, "hello")
    user = await service.user_for(alice)
    assert [t.content for t in await store.recent_messages(user.id, "telegram", "chat-100", 5)] == [
        "hello"
    ]
    assert answer.message_id is None
    async for _ in answer:
        pass
    assert answer.message_id is not None


async def test_history_window_and_reset(
    service: ChatService, engine: FakeEngine, alice: Actor
) -> None:
    for i in range(4):
        await say(service, alice, f"message {i}")
    await say(service, alice, "latest")
    sent = engine.requests[-1].messages
    # system + the last 4 stored turns (history_turns=4) + the new message
    assert [m.content for m in sent[1:]] == [
        "message 2",
        "You said: message 2",
        "message 3",
        "You said: message 3",
        "latest",
    ]
    reply = await service.handle_command(alice, "/reset")
    assert reply.ok and reply.data["hidden"] == 10
    await say(service, alice, "fresh start")
    assert [m.content for m in engine.requests[-1].messages] == [
        service.config.system_prompt,
        "fresh start",
    ]


async def test_history_is_per_user_and_chat(
    service: ChatService, engine: FakeEngine, alice: Actor, bob: Actor
) -> None:
    await say(service, alice, "alice here")
    await say(service, bob, "bob here")
    await say(service, Actor("telegram", "100", "other-chat"), "elsewhere")
    assert [m.content for m in engine.requests[-1].messages] == [
        service.config.system_prompt,
        "elsewhere",
    ]
    await say(service, alice, "again")
    assert "bob here" not in [m.content for m in engine.requests[-1].messages]


async def test_reply_chain_builds_the_context(
    service: ChatService, store: Store, engine: FakeEngine
) -> None:
    actor = Actor("discord", "7", "channel-1", "dee")
    first = await say(service, actor, "topic one")
    assert first.message_id is not None
    await service.link_platform_message(first.message_id, actor, "d-101")
    await say(service, actor, "topic two")
    await say(service, actor, "topic three")

    await say(service, actor, "more on one", reply_to_platform_message_id="d-101")
    assert [m.content for m in engine.requests[-1].messages[1:]] == [
        "topic one",
        "You said: topic one",
        "more on one",
    ]
    # an unknown reply target falls back to the window
    await say(service, actor, "unrelated", reply_to_platform_message_id="d-unknown")
    assert len(engine.requests[-1].messages) == 1 + 4 + 1


async def test_early_stop_then_cancel_stores_the_partial_answer(
    service: ChatService, store: Store, engine: FakeEngine, alice: Actor
) -> None:
    engine.answers["long?"] = "one two three four five six"
    answer = await service.chat(alice, "long?")
    async for chunk in answer:
        if chunk.strip() == "two":
            break
    await answer.cancel()
    assert answer.finish_reason == "cancelled" and answer.text == "one two"
    assert answer.message_id is not None
    stored = await store.get_message(answer.message_id)
    assert stored is not None and stored.content == "one two"
    await answer.cancel()  # idempotent


async def test_abandoned_stream_is_still_stored(
    service: ChatService, store: Store, engine: FakeEngine, alice: Actor
) -> None:
    engine.answers["long?"] = "one two three four"

    async def consume_two() -> Answer:
        answer = await service.chat(alice, "long?")
        async for _ in answer:
            break
        return answer

    answer = await consume_two()
    gc.collect()  # the stream is closed once nobody holds it
    await asyncio.wait_for(answer.wait(), 2)
    assert answer.done and answer.finish_reason == "cancelled"
    assert answer.message_id is not None
    stored = await store.get_message(answer.message_id)
    assert stored is not None and stored.content == "one"


async def test_cancel_from_another_task(
    service: ChatService, store: Store, engine: FakeEngine, alice: Actor
) -> None:
    engine.delay = 0.02
    engine.answers["slow?"] = " ".join(f"w{i}" for i in range(50))
    answer = await service.chat(alice, "slow?")
    received: list[str] = []

    async def consume() -> None:
        async for chunk in answer:
            received.append(chunk)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.07)
    await answer.cancel()
    await asyncio.wait_for(task, 2)
    assert answer.finish_reason == "cancelled" and 0 < len(received) < 50
    stored = await store.get_message(answer.message_id or 0)
    assert stored is not None and stored.content == answer.text == "".join(received)


async def test_cancel_before_iterating_stores_no_empty_turn(
    service: ChatService, store: Store, alice: Actor
) -> None:
    answer = await service.chat(alice, "never read")
    await answer.cancel()
    assert answer.finish_reason == "cancelled" and answer.message_id is None
    assert [chunk async for chunk in answer] == []  # iterating afterwards yields nothing


async def test_engine_failure_apologises_and_stores_no_answer(
    service: ChatService, store: Store, engine: FakeEngine, alice: Actor
) -> None:
    engine.fail_with = RuntimeError("CUDA out of memory")
    answer = await say(service, alice, "hello")
    assert answer.finish_reason == "error" and answer.message_id is None
    assert answer.text == ""
    user = await service.user_for(alice)
    assert await store.last_bot_message(user.id, "telegram", "chat-100") is None
    engine.fail_with = None
    answer = await service.chat(alice, "hello again")
    assert "".join([c async for c in answer]) != ENGINE_ERROR_TEXT


@pytest.mark.parametrize("text", ["", "   ", "\n\t ", "x" * 10_000, "bad\x00byte", "\ud800 lone"])
async def test_bad_messages_are_refused_and_nothing_is_stored(
    service: ChatService, store: Store, engine: FakeEngine, alice: Actor, text: str
) -> None:
    answer = await service.chat(alice, text)
    assert answer.refusal is not None and not answer.refusal.ok
    assert [chunk async for chunk in answer] == []
    assert answer.message_id is None and answer.user_message_id is None
    assert engine.requests == []
    user = await service.user_for(alice)
    assert await store.recent_messages(user.id, "telegram", "chat-100", 10) == []
    if len(text) == 10_000:
        assert "4000" in answer.refusal.text


@pytest.mark.parametrize(
    "text",
    [
        "😀 👨‍👩‍👧‍👦 🇫🇷 👍🏽",
        "مرحبا بالعالم — שלום עולם",
        "**bold _unclosed `code ``` ~~ [x](y) \\ <b>html</b> {curly} %s",
    ],
)
async def test_unicode_and_markdown_round_trip(
    service: ChatService, store: Store, engine: FakeEngine, alice: Actor, text: str
) -> None:
    answer = await say(service, alice, text)
    assert answer.text == f"You said: {text}"
    assert engine.requests[-1].messages[-1].content == text
    stored = await store.get_message(answer.user_message_id or 0)
    assert stored is not None and stored.content == text


async def test_flood_is_rate_limited_and_admins_are_exempt(
    service: ChatService, store: Store, engine: FakeEngine, alice: Actor, admin: Actor, clock
) -> None:
    answers = [await service.chat(alice, f"flood {i}") for i in range(200)]
    served = [a for a in answers if a.refusal is None]
    refused = [a for a in answers if a.refusal is not None]
    assert len(served) == 12 and len(refused) == 188
    for answer in served:
        async for _ in answer:
            pass
    refusal = refused[0].refusal
    assert refusal is not None and "60 s" in refusal.text and "12 per minute" in refusal.text
    assert refusal.data["retry_after"] == 60
    user = await service.user_for(alice)
    assert len(await store.recent_messages(user.id, "telegram", "chat-100", 500)) == 24

    clock.advance(30)
    again = await service.chat(alice, "still?")
    assert again.refusal is not None and "30 s" in again.refusal.text
    clock.advance(31)
    later = await service.chat(alice, "now?")
    assert later.refusal is None
    await later.cancel()

    admin_answers = [await service.chat(admin, f"admin {i}") for i in range(40)]
    assert all(a.refusal is None for a in admin_answers)
    for answer in admin_answers:
        await answer.cancel()


async def test_complete_is_stateless_and_keeps_the_context(
    service: ChatService, store: Store, engine: FakeEngine
) -> None:
    api = Actor("api", "key-1", "api")
    conversation = [
        ChatMessage("system", "Custom system."),
        ChatMessage("user", "first"),
        ChatMessage("assistant", "an earlier answer"),
        ChatMessage("user", "Capital of France?"),
    ]
    answer = await service.complete(api, conversation, max_new_tokens=3, temperature=0.5)
    text = "".join([c async for c in answer])
    assert text == "Paris is the" and answer.finish_reason == "length"
    request = engine.requests[-1]
    assert request.messages == tuple(conversation)
    assert request.sampling.max_new_tokens == 3 and request.sampling.temperature == 0.5
    reply = await service.correct(api, "Paris.", message_id=answer.message_id)
    assert reply.ok, reply.text
    correction = await store.get_correction(reply.data["correction_id"])
    assert correction is not None
    assert correction.context == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "an earlier answer"},
        {"role": "user", "content": "Capital of France?"},
    ]
    assert correction.original_answer == "Paris is the"

    plain = await service.complete(api, [ChatMessage("user", "hi")])
    assert [c async for c in plain] and engine.requests[-1].messages[
        0
    ].content == service.config.system_prompt


@pytest.mark.parametrize(
    ("messages", "kwargs"),
    [
        ([], {}),
        ([ChatMessage("system", "s"), ChatMessage("assistant", "a")], {}),
        ([ChatMessage("user", " ")], {}),
        ([ChatMessage("user", "x" * 5000)], {}),
        ([ChatMessage("user", "ok")], {"max_new_tokens": 0}),
        ([ChatMessage("user", "ok")], {"temperature": -1.0}),
    ],
)
async def test_complete_refuses_bad_requests(
    service: ChatService, engine: FakeEngine, messages: list[ChatMessage], kwargs: dict
) -> None:
    answer = await service.complete(Actor("api", "key-1", "api"), messages, **kwargs)
    assert answer.refusal is not None and not answer.refusal.ok and answer.refusal.text
    assert engine.requests == []


async def test_store_failures_are_refusals_not_crashes(
    service: ChatService, store: Store, alice: Actor
) -> None:
    await say(service, alice, "hello")
    await store.close()
    answer = await service.chat(alice, "are you there?")
    assert answer.refusal is not None and "try again" in answer.refusal.text
    for line in ("/status", "/correct fixed", "/reset", "/good", "/approve 1"):
        reply = await service.handle_command(alice, line)
        assert not reply.ok and reply.text, line
    await service.link_platform_message(1, alice, "tg-9")  # logged, not raised


async def test_user_forgotten_while_streaming(
    service: ChatService, store: Store, engine: FakeEngine, alice: Actor
) -> None:
    engine.answers["long?"] = "one two three"
    answer = await service.chat(alice, "long?")
    await service.forget(alice, confirmed=True)
    assert "".join([c async for c in answer]) == "one two three"
    assert answer.message_id is None  # nothing to store it under any more; no crash
