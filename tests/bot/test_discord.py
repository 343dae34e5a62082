"""The Discord adapter end to end: the real discord.py client against the fake Discord on
127.0.0.1, a real ChatService on a real Store file, the FakeEngine and the FakeLearner.

The fixtures take the `service` fixture, so a test module that overrides `engine`/`learner`
(the real bundled model, the real learner) reuses them unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import discord
import pytest

from bot.discord_bot import MESSAGE_LIMIT, OuroDiscordBot, start_discord
from bot.service import ChatService
from model.fake import FakeEngine
from storage.models import Rating, Role
from storage.store import Store

try:
    from tests.bot.fake_discord import FakeDiscord, FakeUser, running_bot
    from tests.bot.fakes import FakeLearner
except ModuleNotFoundError:  # pytest without the repo root on sys.path (rootdir-relative)
    from fake_discord import FakeDiscord, FakeUser, running_bot  # type: ignore[no-redef]
    from fakes import FakeLearner  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(60)

LONG_WORD = "x" * 149
LONG_ANSWER = " ".join(f"{i:03d}{LONG_WORD}" for i in range(30))  # 4,529 chars, 30 tokens
PARIS = "Paris is the capital of France."


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(
        {
            "capital of france?": PARIS,
            "capital of italy?": "Rome is the capital of Italy.",
            "long answer please": LONG_ANSWER,
        }
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


@pytest.fixture
def alice(fake: FakeDiscord) -> FakeUser:
    return FakeUser(fake.snowflake(), "alice")


@pytest.fixture
def bob(fake: FakeDiscord) -> FakeUser:
    return FakeUser(fake.snowflake(), "bob")


@pytest.fixture
def root() -> FakeUser:
    return FakeUser(42, "root")  # a Discord admin in the shared chat_config


@pytest.fixture
def make_bot(fake: FakeDiscord, service: ChatService) -> Callable[..., OuroDiscordBot]:
    def make(**options: Any) -> OuroDiscordBot:
        options.setdefault("allowed_channels", [str(fake.channel_id)])
        options.setdefault("edit_interval", 0.0)
        return OuroDiscordBot(
            service,
            api_base=fake.api_base,
            gateway_url=fake.gateway_url,
            guild_ready_timeout=0.05,
            **options,
        )

    return make


@pytest.fixture
async def bot(
    fake: FakeDiscord, make_bot: Callable[..., OuroDiscordBot]
) -> AsyncIterator[OuroDiscordBot]:
    async with running_bot(make_bot(), fake) as client:
        assert isinstance(client, OuroDiscordBot)
        yield client


async def stored(store: Store, channel_id: int, platform_id: str | int) -> Any:
    return await store.find_by_platform_id("discord", str(channel_id), str(platform_id))


async def answer_to(fake: FakeDiscord, store: Store, user_msg: dict[str, Any]) -> Any:
    """Wait until the bot's answer to `user_msg` is stored and linked; returns the bot turn."""
    channel = int(user_msg["channel_id"])

    async def linked() -> Any:
        replies = [
            m
            for m in fake.bot_messages(channel)
            if m.get("message_reference", {}).get("message_id")
            in (user_msg["id"], int(user_msg["id"]))
        ]
        return replies and await stored(store, channel, replies[0]["id"])

    return await fake.wait_for(linked)


# --- end to end ------------------------------------------------------------------------------


async def test_dm_answer_streams_by_edits_and_is_linked(
    bot: OuroDiscordBot, fake: FakeDiscord, store: Store, alice: FakeUser
) -> None:
    assert fake.identify is not None
    intents = fake.identify["intents"]
    # guilds, guild messages + reactions, DM messages + reactions, message content: no more
    assert {bit for bit in range(32) if intents >> bit & 1} == {0, 9, 10, 12, 13, 15}
    assert {"correct", "status", "retrain", "Correct this answer"} <= {
        c["name"] for c in fake.commands
    }

    question = await fake.user_message(alice, "Capital of France?")
    turn = await answer_to(fake, store, question)

    dm = int(question["channel_id"])
    [sent] = fake.bot_messages(dm)
    assert sent["content"] == PARIS and turn.content == PARIS and turn.role == Role.ASSISTANT
    path = f"/channels/{dm}/messages/{sent['id']}"
    edits = fake.find("PATCH", path)
    assert len(edits) >= 2 and edits[-1].body["content"] == PARIS
    posts = fake.find("POST", f"/channels/{dm}/messages")
    assert len(posts) == 1 and len(posts[0].body["content"]) < len(PARIS)  # first words only
    assert fake.find("POST", f"/channels/{dm}/typing")
    user_turn = await stored(store, dm, question["id"])
    assert user_turn is not None and user_turn.content == "Capital of France?"


async def test_guild_answers_mentions_in_allowed_channels_only(
    bot: OuroDiscordBot, fake: FakeDiscord, store: Store, alice: FakeUser
) -> None:
    plain = await fake.user_message(alice, "Capital of France?", channel_id=fake.channel_id)
    elsewhere = await fake.user_message(
        alice, "Capital of France?", channel_id=fake.other_channel_id, mention=True
    )
    asked = await fake.user_message(
        alice, "Capital of France?", channel_id=fake.channel_id, mention=True
    )

    turn = await answer_to(fake, store, asked)
    assert turn.content == PARIS
    assert await stored(store, fake.channel_id, asked["id"]) is not None
    assert await stored(store, fake.channel_id, plain["id"]) is None
    assert await stored(store, fake.other_channel_id, elsewhere["id"]) is None
    assert len(fake.bot_messages(fake.channel_id)) == 1
    assert fake.bot_messages(fake.other_channel_id) == []


async def test_reply_to_an_answer_follows_its_chain(
    bot: OuroDiscordBot, fake: FakeDiscord, store: Store, engine: FakeEngine, alice: FakeUser
) -> None:
    first = await fake.user_message(
        alice, "Capital of France?", channel_id=fake.channel_id, mention=True
    )
    await answer_to(fake, store, first)
    second = await fake.user_message(
        alice, "Capital of Italy?", channel_id=fake.channel_id, mention=True
    )
    await answer_to(fake, store, second)
    [paris_msg] = [m for m in fake.bot_messages(fake.channel_id) if m["content"] == PARIS]

    # A reply without a mention is addressed to us too.
    follow = await fake.user_message(
        alice, "Are you sure?", channel_id=fake.channel_id, reply_to=int(paris_msg["id"])
    )
    await answer_to(fake, store, follow)
    contents = [m.content for m in engine.requests[-1].messages]
    assert "Capital of France?" in contents and PARIS in contents
    assert "Capital of Italy?" not in contents
    assert contents[-1] == "Are you sure?"


async def test_slash_correct_confirms_ephemerally_after_storing_and_status_shows_it(
    bot: OuroDiscordBot, fake: FakeDiscord, store: Store, learner: FakeLearner, alice: FakeUser
) -> None:
    question = await fake.user_message(alice, "Capital of France?")
    turn = await answer_to(fake, store, question)
    dm = int(question["channel_id"])

    token = await fake.slash(alice, "correct", {"text": "Paris, of course."}, channel_id=dm)
    [reply] = await fake.wait_for(
        lambda: [m for m in fake.interaction_messages(token) if "#" in m["content"]]
    )
    assert reply["flags"] & 64  # ephemeral
    [correction] = await store.list_corrections()
    assert correction.message_id == turn.id and correction.corrected_answer == "Paris, of course."
    assert f"#{correction.id}" in reply["content"] and learner.notified

    token = await fake.slash(alice, "status", channel_id=dm)
    [status] = await fake.wait_for(
        lambda: [m for m in fake.interaction_messages(token) if "corrections" in m["content"]]
    )
    assert status["flags"] & 64 and "1 pending" in status["content"]


async def test_context_menu_opens_prefilled_modal_and_submit_stores(
    bot: OuroDiscordBot, fake: FakeDiscord, store: Store, alice: FakeUser
) -> None:
    asked = await fake.user_message(
        alice, "Capital of France?", channel_id=fake.channel_id, mention=True
    )
    turn = await answer_to(fake, store, asked)
    [answer_msg] = fake.bot_messages(fake.channel_id)

    token = await fake.context_menu(alice, "Correct this answer", int(answer_msg["id"]))
    modal = await fake.wait_for(lambda: fake.find("POST", token) and fake.last_modal(token))
    [field] = [row["component"] for row in modal["components"]]
    assert field["value"] == PARIS  # pre-filled with my answer

    token = await fake.submit_modal(alice, modal, {field["custom_id"]: "Paris (since 508 AD)."})
    [confirm] = await fake.wait_for(
        lambda: [m for m in fake.interaction_messages(token) if "saved" in m["content"]]
    )
    assert confirm["flags"] & 64
    [correction] = await store.list_corrections()
    assert (
        correction.message_id == turn.id and correction.corrected_answer == "Paris (since 508 AD)."
    )

    # On someone's own message: a clear refusal, no modal.
    token = await fake.context_menu(alice, "Correct this answer", int(asked["id"]))
    [refusal] = await fake.wait_for(lambda: fake.interaction_messages(token))
    assert "my own answers" in refusal["content"] and refusal["flags"] & 64


async def test_reactions_store_feedback_and_thumbs_down_invites_a_correction(
    bot: OuroDiscordBot, fake: FakeDiscord, store: Store, alice: FakeUser
) -> None:
    asked = await fake.user_message(
        alice, "Capital of France?", channel_id=fake.channel_id, mention=True
    )
    turn = await answer_to(fake, store, asked)
    [answer_msg] = fake.bot_messages(fake.channel_id)
    answer_id = int(answer_msg["id"])

    await fake.react(alice, int(asked["id"]), "👎")  # not a bot answer: ignored
    await fake.react(alice, answer_id, "🎉")  # not a rating: ignored
    await fake.react(alice, answer_id, "👍🏽")
    user = await store.find_user("discord", str(alice.id))
    assert user is not None
    await fake.wait_for(lambda: store.list_feedback(user_id=user.id))
    [up] = await store.list_feedback(user_id=user.id)
    assert up.rating == Rating.UP and up.message_id == turn.id

    await fake.react(alice, answer_id, "👎")
    invite = await fake.wait_for(
        lambda: [m for m in fake.bot_messages(fake.channel_id) if "/correct" in m["content"]]
    )
    [down] = await store.list_feedback(user_id=user.id)
    assert down.rating == Rating.DOWN
    assert invite[0]["message_reference"]["message_id"] in (answer_id, str(answer_id))
    assert invite[0]["content"].startswith(f"<@{alice.id}>")
    assert len(fake.bot_messages(fake.channel_id)) == 2  # the answer and one invitation


async def test_admin_retrain_edits_progress_into_one_message_and_non_admin_is_refused(
    fake: FakeDiscord,
    make_bot: Callable[..., OuroDiscordBot],
    learner: FakeLearner,
    alice: FakeUser,
    root: FakeUser,
) -> None:
    async with running_bot(make_bot(), fake):
        token = await fake.slash(alice, "retrain")
        [refusal] = await fake.wait_for(
            lambda: [m for m in fake.interaction_messages(token) if "admin" in m["content"]]
        )
        assert refusal["flags"] & 64 and learner.retrained == []

        token = await fake.slash(root, "retrain")
        [done] = await fake.wait_for(
            lambda: [m for m in fake.interaction_messages(token) if "Trained" in m["content"]]
        )
        assert not done["flags"] & 64 and len(learner.retrained) == 1
        edits = [c.body["content"] for c in fake.find("PATCH", f"{token}/messages/@original")]
        assert [e for e in edits if e.startswith("⏳ step")] and edits[-1] == done["content"]
        assert len(fake.interaction_messages(token)) == 1  # progress and result share a message

        token = await fake.slash(root, "approve", {"correction": "twelve"})
        [usage] = await fake.wait_for(
            lambda: [m for m in fake.interaction_messages(token) if m["content"]]
        )
        assert "Usage: /approve" in usage["content"]

        token = await fake.slash(alice, "rollback")
        await fake.wait_for(
            lambda: [m for m in fake.interaction_messages(token) if "admin" in m["content"]]
        )
        assert learner.rolled_back == []


async def test_forget_needs_the_confirm_button_of_the_same_user(
    bot: OuroDiscordBot, fake: FakeDiscord, store: Store, alice: FakeUser, bob: FakeUser
) -> None:
    question = await fake.user_message(
        alice, "Capital of France?", channel_id=fake.channel_id, mention=True
    )
    await answer_to(fake, store, question)

    token = await fake.slash(alice, "forget")
    [prompt] = await fake.wait_for(lambda: fake.interaction_messages(token))
    assert prompt["flags"] & 64
    buttons = {
        b["label"]: b["custom_id"] for row in prompt["components"] for b in row["components"]
    }
    assert await store.find_user("discord", str(alice.id)) is not None  # nothing deleted yet

    other = await fake.click(bob, int(prompt["id"]), buttons["Forget everything"])
    await fake.wait_for(lambda: fake.interaction_messages(other))
    assert "not for you" in fake.interaction_messages(other)[0]["content"]
    assert await store.find_user("discord", str(alice.id)) is not None

    await fake.click(alice, int(prompt["id"]), buttons["Forget everything"])
    await fake.wait_for(lambda: "deleted" in fake.messages[int(prompt["id"])]["content"])
    assert fake.messages[int(prompt["id"])]["components"] == []
    assert await store.find_user("discord", str(alice.id)) is None


# --- bad input and platform failures ---------------------------------------------------------


async def test_empty_and_too_long_messages_are_refused_without_storing(
    bot: OuroDiscordBot, fake: FakeDiscord, store: Store, alice: FakeUser
) -> None:
    empty = await fake.user_message(alice, "   ")
    dm = int(empty["channel_id"])
    await fake.wait_for(lambda: [m for m in fake.bot_messages(dm) if "empty" in m["content"]])
    huge = await fake.user_message(alice, "a" * 10_000)
    await fake.wait_for(lambda: [m for m in fake.bot_messages(dm) if "too long" in m["content"]])
    assert (
        await stored(store, dm, empty["id"]) is None and await stored(store, dm, huge["id"]) is None
    )
    user = await store.find_user("discord", str(alice.id))
    assert user is None or await store.recent_messages(user.id, "discord", str(dm), 10) == []


async def test_long_answer_is_split_and_every_part_linked(
    fake: FakeDiscord, make_bot: Callable[..., OuroDiscordBot], store: Store, alice: FakeUser
) -> None:
    async with running_bot(make_bot(edit_interval=0.02), fake):
        question = await fake.user_message(alice, "Long answer please")
        dm = int(question["channel_id"])
        turn = await answer_to(fake, store, question)
        assert turn.content == LONG_ANSWER
        parts = fake.bot_messages(dm)

        async def all_linked() -> bool:
            found = [await stored(store, dm, m["id"]) for m in parts]
            return all(f is not None and f.id == turn.id for f in found)

        assert len(parts) == 3 and await fake.wait_for(all_linked)
        assert all(0 < len(m["content"]) <= MESSAGE_LIMIT for m in parts)
        assert " ".join(m["content"] for m in parts) == LONG_ANSWER


async def test_correct_refusals_are_clear_and_store_nothing(
    bot: OuroDiscordBot, fake: FakeDiscord, store: Store, alice: FakeUser, bob: FakeUser
) -> None:
    async def run(user: FakeUser, options: dict[str, str]) -> str:
        token = await fake.slash(user, "correct", options, channel_id=fake.channel_id)
        [msg] = await fake.wait_for(
            lambda: [m for m in fake.interaction_messages(token) if m["content"]]
        )
        assert msg["flags"] & 64
        return str(msg["content"])

    assert "no answer of mine" in await run(alice, {"text": "Paris."})
    asked = await fake.user_message(
        bob, "Capital of France?", channel_id=fake.channel_id, mention=True
    )
    await answer_to(fake, store, asked)
    [bobs_answer] = fake.bot_messages(fake.channel_id)
    link = f"https://discord.com/channels/{fake.guild_id}/{fake.channel_id}/{bobs_answer['id']}"

    assert "only correct answers I gave to you" in await run(
        alice, {"text": "Lyon.", "message": link}
    )
    assert "can't find" in await run(alice, {"text": "Lyon.", "message": "123456789012345678"})
    assert "not a message link" in await run(alice, {"text": "Lyon.", "message": "https://x.y/z"})
    assert "too long" in await run(bob, {"text": "b" * 10_000})
    assert "Tell me the right answer" in await run(bob, {"text": "   "})
    assert await store.list_corrections() == []


async def test_unicode_and_markdown_are_delivered_verbatim_without_pings(
    bot: OuroDiscordBot, fake: FakeDiscord, store: Store, alice: FakeUser
) -> None:
    text = "مرحبا بالعالم 👋🏽👨‍👩‍👧 **bold ||spoiler `code ``` @everyone <@1> \u202e"
    question = await fake.user_message(alice, text)
    turn = await answer_to(fake, store, question)
    dm = int(question["channel_id"])
    [sent] = fake.bot_messages(dm)
    assert sent["content"] == turn.content == f"You said: {text}".strip()
    for call in fake.find("POST", f"/channels/{dm}/messages"):
        assert call.body["allowed_mentions"]["parse"] == []


async def test_flood_is_rate_limited_without_crashing(
    fake: FakeDiscord,
    make_bot: Callable[..., OuroDiscordBot],
    store: Store,
    engine: FakeEngine,
    alice: FakeUser,
) -> None:
    async with running_bot(make_bot(edit_interval=0.5), fake) as client:
        for i in range(200):
            await fake.user_message(alice, f"message {i}")
        dm = fake.dm_channel(alice)
        user = await fake.wait_for(lambda: store.find_user("discord", str(alice.id)))

        async def twelve_answers() -> bool:
            turns = await store.recent_messages(user.id, "discord", str(dm), 100)
            return sum(t.role == Role.ASSISTANT for t in turns) == 12

        await fake.wait_for(twelve_answers, within=20)
        await fake.wait_for(
            lambda: [m for m in fake.bot_messages(dm) if "too fast" in m["content"]]
        )
        turns = await store.recent_messages(user.id, "discord", str(dm), 100)
        assert sum(t.role == Role.USER for t in turns) == 12 and len(engine.requests) == 12
        told = [m for m in fake.bot_messages(dm) if "too fast" in m["content"]]
        assert len(told) == 1  # told once, not 188 times
        assert not client.is_closed()


async def test_rate_limit_mid_stream_still_delivers_and_stores(
    bot: OuroDiscordBot, fake: FakeDiscord, store: Store, alice: FakeUser
) -> None:
    fake.fail_next(429, method="PATCH", retry_after=0.2, count=2)
    question = await fake.user_message(alice, "Capital of France?")
    turn = await answer_to(fake, store, question)
    dm = int(question["channel_id"])
    await fake.wait_for(lambda: fake.bot_messages(dm)[0]["content"] == PARIS)
    assert turn.content == PARIS
    assert [c.status for c in fake.find("PATCH")].count(429) == 2


async def test_deleted_message_mid_stream_is_replaced_and_both_are_linked(
    bot: OuroDiscordBot, fake: FakeDiscord, store: Store, alice: FakeUser
) -> None:
    fake.fail_next(404, method="PATCH")
    question = await fake.user_message(alice, "Capital of France?")
    dm = int(question["channel_id"])
    turn = await answer_to(fake, store, question)
    await fake.wait_for(lambda: len(fake.bot_messages(dm)) == 2)
    parts = fake.bot_messages(dm)
    assert parts[-1]["content"] == PARIS

    async def all_linked() -> bool:
        return all([(await stored(store, dm, m["id"])) == turn for m in parts])

    await fake.wait_for(all_linked)


async def test_forbidden_channel_never_loses_the_stored_turn(
    bot: OuroDiscordBot, fake: FakeDiscord, store: Store, alice: FakeUser
) -> None:
    fake.fail_next(403, method="POST", path_contains="/messages", count=10)
    question = await fake.user_message(
        alice, "Capital of France?", channel_id=fake.channel_id, mention=True
    )
    user_turn = await fake.wait_for(lambda: stored(store, fake.channel_id, question["id"]))
    user = await store.find_user("discord", str(alice.id))
    assert user is not None

    async def answer_stored() -> Any:
        return await store.last_bot_message(user.id, "discord", str(fake.channel_id))

    answer = await fake.wait_for(answer_stored)
    assert answer.content == PARIS and answer.reply_to_id == user_turn.id
    assert fake.bot_messages(fake.channel_id) == []
    # The bot is still up: the next question is answered once Discord lets us post again.
    fake.clear_failures()
    again = await fake.user_message(
        alice, "Capital of Italy?", channel_id=fake.channel_id, mention=True
    )
    assert (await answer_to(fake, store, again)).content == "Rome is the capital of Italy."


async def test_rollback_names_a_user_and_help_and_reset_answer_privately(
    bot: OuroDiscordBot,
    fake: FakeDiscord,
    store: Store,
    learner: FakeLearner,
    alice: FakeUser,
    root: FakeUser,
) -> None:
    question = await fake.user_message(alice, "Capital of France?")
    await answer_to(fake, store, question)
    user = await store.find_user("discord", str(alice.id))
    assert user is not None

    resolved = {"users": {str(alice.id): alice.payload()}}
    token = await fake.slash(root, "rollback", {"user": str(alice.id)}, resolved=resolved)
    [done] = await fake.wait_for(
        lambda: [m for m in fake.interaction_messages(token) if "Rolled back" in m["content"]]
    )
    assert f"user #{user.id}" in done["content"] and learner.rolled_back == [user.id]

    dm = int(question["channel_id"])
    token = await fake.slash(alice, "help", channel_id=dm)
    [help_msg] = await fake.wait_for(lambda: fake.interaction_messages(token))
    assert help_msg["flags"] & 64 and "/correct" in help_msg["content"]

    token = await fake.slash(alice, "reset", channel_id=dm)
    [reset] = await fake.wait_for(
        lambda: [m for m in fake.interaction_messages(token) if m["content"]]
    )
    assert reset["flags"] & 64 and "Starting over" in reset["content"]
    assert await store.recent_messages(user.id, "discord", str(dm), 10) == []


async def test_engine_failure_is_told_and_the_question_kept(
    bot: OuroDiscordBot, fake: FakeDiscord, store: Store, engine: FakeEngine, alice: FakeUser
) -> None:
    engine.fail_with = RuntimeError("out of memory")
    question = await fake.user_message(alice, "Capital of France?")
    dm = int(question["channel_id"])
    [sorry] = await fake.wait_for(
        lambda: [m for m in fake.bot_messages(dm) if "went wrong" in m["content"]]
    )
    user_turn = await stored(store, dm, question["id"])
    assert user_turn is not None and user_turn.content == "Capital of France?"
    assert await stored(store, dm, sorry["id"]) is None  # an apology is not an answer to learn

    engine.fail_with = None
    again = await fake.user_message(alice, "Capital of France?")
    assert (await answer_to(fake, store, again)).content == PARIS


async def test_start_discord_runs_in_the_loop_and_restores_endpoints_on_exit(
    fake: FakeDiscord, service: ChatService, store: Store, alice: FakeUser
) -> None:
    before = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
    async with start_discord(
        service,
        "fake-token",
        api_base=fake.api_base,
        gateway_url=fake.gateway_url,
        channels={str(fake.channel_id)},
        edit_interval=0.0,
        guild_ready_timeout=0.05,
    ) as client:
        assert client.is_ready() and discord.http.Route.BASE == fake.api_base
        question = await fake.user_message(alice, "Capital of France?")
        assert (await answer_to(fake, store, question)).content == PARIS
    assert client.is_closed()
    assert (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY) == before


async def test_start_discord_with_a_bad_token_fails_clearly(
    fake: FakeDiscord, service: ChatService
) -> None:
    fake.fail_next(401, path_contains="/users/@me")
    with pytest.raises(RuntimeError, match=r"could not start.*LoginFailure"):
        async with start_discord(service, "bad-token", api_base=fake.api_base):
            pass  # pragma: no cover - never reached
