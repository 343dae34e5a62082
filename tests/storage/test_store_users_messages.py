"""Users and conversation turns, including every refusal."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from storage.errors import InvalidArgumentError, NotFoundError, StoreError
from storage.models import Message, Role, User
from storage.store import Store


async def test_get_or_create_user_creates_once_and_updates(store: Store) -> None:
    before = datetime.now(UTC)
    first = await store.get_or_create_user("telegram", "42", "Ann")
    assert first.id >= 1 and first.display_name == "Ann" and first.is_admin is False
    assert first.created_at.tzinfo is not None
    assert before - timedelta(seconds=1) <= first.created_at <= datetime.now(UTC)
    same = await store.get_or_create_user("telegram", "42")
    assert same == first  # None keeps the name; unchanged user
    renamed = await store.get_or_create_user("telegram", "42", "Annie", is_admin=True)
    assert (renamed.id, renamed.display_name, renamed.is_admin) == (first.id, "Annie", True)
    assert renamed.created_at == first.created_at
    demoted = await store.get_or_create_user("telegram", "42")
    assert demoted.is_admin is False and demoted.display_name == "Annie"
    other_platform = await store.get_or_create_user("discord", "42")
    assert other_platform.id != first.id
    assert await store.get_user(first.id) == demoted
    assert await store.find_user("telegram", "42") == demoted
    assert await store.find_user("telegram", "43") is None
    assert await store.get_user(999) is None
    assert [u.id for u in await store.list_users()] == [first.id, other_platform.id]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("", "1"), "platform"),
        (("telegram", ""), "platform_user_id"),
        (("telegram", 42), "platform_user_id"),
        (("telegram", "1", 5), "display_name"),
        (("telegram", "1", None, "yes"), "is_admin"),
    ],
)
async def test_get_or_create_user_refuses_bad_input(
    store: Store, args: tuple[object, ...], match: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        await store.get_or_create_user(*args)  # type: ignore[arg-type]
    assert await store.list_users() == []


@pytest.mark.parametrize("bad", [0, -1, True, "1", None, 1.5])
async def test_bad_ids_are_value_errors(store: Store, bad: object) -> None:
    with pytest.raises(ValueError, match="user_id"):
        await store.get_user(bad)  # type: ignore[arg-type]


async def test_add_message_round_trips_every_field(store: Store, alice: User) -> None:
    question = await store.add_message(
        alice.id, "telegram", "chat1", Role.USER, "hi 👋", platform_message_id="t-1"
    )
    reply = await store.add_message(
        alice.id,
        "telegram",
        "chat1",
        "assistant",
        "hello",
        reply_to_id=question.id,
        adapter_version="v3",
    )
    assert reply == await store.get_message(reply.id)
    assert (reply.role, reply.reply_to_id, reply.adapter_version) == (
        Role.ASSISTANT,
        question.id,
        "v3",
    )
    assert reply.in_context is True and reply.platform_message_id is None
    assert question.content == "hi 👋" and question.platform_message_id == "t-1"
    assert await store.find_by_platform_id("telegram", "chat1", "t-1") == question
    assert await store.find_by_platform_id("telegram", "chat2", "t-1") is None
    assert await store.get_message(12345) is None


async def test_add_message_refusals_write_nothing(
    store: Store, alice: User, count_rows: Callable[[], dict[str, int]]
) -> None:
    with pytest.raises(NotFoundError, match="no user with id 999"):
        await store.add_message(999, "telegram", "c", "user", "x")
    with pytest.raises(NotFoundError, match="message to reply to"):
        await store.add_message(alice.id, "telegram", "c", "user", "x", reply_to_id=77)
    with pytest.raises(InvalidArgumentError, match="role"):
        await store.add_message(alice.id, "telegram", "c", "system", "x")
    with pytest.raises(InvalidArgumentError, match="content"):
        await store.add_message(alice.id, "telegram", "c", "user", None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="NUL"):
        await store.add_message(alice.id, "telegram", "c", "user", "a\x00b")
    with pytest.raises(InvalidArgumentError, match="chat_id"):
        await store.add_message(alice.id, "telegram", "", "user", "x")
    with pytest.raises(InvalidArgumentError, match="platform_message_id"):
        await store.add_message(alice.id, "telegram", "c", "user", "x", platform_message_id="")
    assert count_rows()["messages"] == 0


async def test_split_answers_link_several_platform_ids(store: Store, answer: Message) -> None:
    await store.link_platform_message(answer.id, "telegram", "chat1", "p-1")
    await store.link_platform_message(answer.id, "telegram", "chat1", "p-2")
    await store.link_platform_message(answer.id, "telegram", "chat1", "p-2")  # idempotent
    for pid in ("p-1", "p-2"):
        assert await store.find_by_platform_id("telegram", "chat1", pid) == answer
    with pytest.raises(NotFoundError, match="no message with id 999"):
        await store.link_platform_message(999, "telegram", "chat1", "p-3")
    with pytest.raises(InvalidArgumentError):
        await store.link_platform_message(answer.id, "telegram", "chat1", "")
    assert await store.find_by_platform_id("telegram", "chat1", "p-3") is None


async def test_a_relinked_platform_id_points_at_the_latest_turn(
    store: Store, alice: User, answer: Message
) -> None:
    await store.link_platform_message(answer.id, "telegram", "chat1", "p-1")
    newer = await store.add_message(
        alice.id, "telegram", "chat1", "user", "edited", platform_message_id="p-1"
    )
    assert await store.find_by_platform_id("telegram", "chat1", "p-1") == newer


async def test_recent_messages_last_bot_message_and_reset(
    store: Store, alice: User, bob: User
) -> None:
    for index in range(5):
        role = "user" if index % 2 == 0 else "assistant"
        await store.add_message(alice.id, "telegram", "chat1", role, f"a{index}")
    await store.add_message(alice.id, "telegram", "chat2", "assistant", "other chat")
    await store.add_message(bob.id, "telegram", "chat1", "assistant", "bob's")
    recent = await store.recent_messages(alice.id, "telegram", "chat1", 3)
    assert [m.content for m in recent] == ["a2", "a3", "a4"]  # oldest first
    assert await store.recent_messages(alice.id, "telegram", "chat1", 0) == []
    last = await store.last_bot_message(alice.id, "telegram", "chat1")
    assert last is not None and last.content == "a3"
    assert await store.clear_context(alice.id, "telegram", "chat1") == 5
    assert await store.clear_context(alice.id, "telegram", "chat1") == 0
    assert await store.recent_messages(alice.id, "telegram", "chat1", 10) == []
    hidden = await store.get_message(last.id)
    assert hidden is not None and hidden.in_context is False  # kept for corrections
    assert await store.last_bot_message(alice.id, "telegram", "chat1") == hidden
    assert [m.content for m in await store.recent_messages(alice.id, "telegram", "chat2", 9)] == [
        "other chat"
    ]
    assert len(await store.recent_messages(bob.id, "telegram", "chat1", 9)) == 1
    await store.add_message(alice.id, "telegram", "chat1", "user", "after reset")
    assert [m.content for m in await store.recent_messages(alice.id, "telegram", "chat1", 9)] == [
        "after reset"
    ]
    assert await store.last_bot_message(bob.id, "discord", "chat1") is None
    with pytest.raises(InvalidArgumentError, match="limit"):
        await store.recent_messages(alice.id, "telegram", "chat1", -1)


async def test_errors_are_store_errors_not_sqlite_errors(store: Store) -> None:
    with pytest.raises(StoreError):
        await store.add_message(1, "telegram", "c", "user", "x")
