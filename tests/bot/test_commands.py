"""ChatService corrections, feedback and commands, against a real Store and the fakes."""

from __future__ import annotations

import pytest

from bot.service import Actor, Answer, ChatService
from model.fake import FakeEngine
from storage.models import (
    AdapterScope,
    AdapterStatus,
    AdapterVersion,
    CorrectionScope,
    CorrectionStatus,
    Rating,
)
from storage.store import Store


async def say(service: ChatService, actor: Actor, text: str, **kwargs: str) -> Answer:
    answer = await service.chat(actor, text, **kwargs)
    async for _ in answer:
        pass
    return answer


async def test_correction_is_stored_then_shown_by_status(
    service: ChatService, store: Store, learner, alice: Actor
) -> None:
    await say(service, alice, "hello")
    answer = await say(service, alice, "Capital of France?")

    reply = await service.handle_command(alice, "/correct   Paris. It has been since 987.  ")
    assert reply.ok, reply.text
    correction_id = reply.data["correction_id"]
    assert f"#{correction_id}" in reply.text and learner.describe_schedule() in reply.text
    correction = await store.get_correction(correction_id)
    assert correction is not None and correction.status == CorrectionStatus.PENDING
    assert correction.message_id == answer.message_id
    assert correction.original_answer == "Paris is the capital of France."
    assert correction.corrected_answer == "Paris. It has been since 987."
    assert correction.context == [  # history + question, no system prompt
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "You said: hello"},
        {"role": "user", "content": "Capital of France?"},
    ]
    user = await service.user_for(alice)
    assert learner.notified == [user.id]

    status = await service.handle_command(alice, "/status")
    assert status.ok and status.private
    assert "1 pending" in status.text and f"#{correction_id} pending" in status.text
    assert status.data["counts"]["pending"] == 1


async def test_correction_context_survives_a_restart(
    service: ChatService, store: Store, engine: FakeEngine, learner, chat_config, alice: Actor
) -> None:
    await say(service, alice, "first")
    await say(service, alice, "second")
    fresh = ChatService(store, engine, learner, chat_config)  # no in-memory contexts
    reply = await fresh.correct(alice, "better")
    correction = await store.get_correction(reply.data["correction_id"])
    assert correction is not None
    assert [turn["content"] for turn in correction.context] == [
        "first",
        "You said: first",
        "second",
    ]


async def test_correction_by_reply_to_an_older_answer(
    service: ChatService, store: Store, alice: Actor
) -> None:
    first = await say(service, alice, "one")
    await service.link_platform_message(first.message_id or 0, alice, "tg-bot-1")
    await say(service, alice, "two")
    reply = await service.correct(alice, "fixed", platform_message_id="tg-bot-1")
    correction = await store.get_correction(reply.data["correction_id"])
    assert correction is not None and correction.original_answer == "You said: one"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "right answer"),
        ("   ", "right answer"),
        ("x" * 10_000, "2000"),
        ("You said: hello", "same as my answer"),
        ("  You said:   hello ", "same as my answer"),
        ("nul\x00", "NUL"),
    ],
)
async def test_bad_corrections_are_refused(
    service: ChatService, store: Store, learner, alice: Actor, text: str, expected: str
) -> None:
    await say(service, alice, "hello")
    reply = await service.correct(alice, text)
    assert not reply.ok and expected in reply.text
    assert await store.list_corrections() == [] and learner.notified == []


async def test_correction_targets_are_checked(
    service: ChatService, store: Store, alice: Actor, bob: Actor, admin: Actor
) -> None:
    nothing = await service.correct(alice, "Paris")
    assert not nothing.ok and "no answer" in nothing.text

    answer = await say(service, alice, "hello", platform_message_id="tg-user-1")
    user_turn = await service.correct(alice, "x", platform_message_id="tg-user-1")
    assert not user_turn.ok and "user message" in user_turn.text
    by_id = await service.correct(alice, "x", message_id=answer.user_message_id)
    assert not by_id.ok and "user message" in by_id.text
    missing = await service.correct(alice, "x", platform_message_id="tg-nope")
    assert not missing.ok and "can't find" in missing.text

    others = await service.correct(bob, "not yours", message_id=answer.message_id)
    assert not others.ok and "only correct answers I gave to you" in others.text
    assert await store.list_corrections() == []

    by_admin = await service.correct(admin, "fixed by admin", message_id=answer.message_id)
    assert by_admin.ok, by_admin.text


async def test_learner_failure_after_commit_still_confirms(
    service: ChatService, store: Store, learner, alice: Actor
) -> None:
    await say(service, alice, "hello")
    learner.fail_with = RuntimeError("scheduler down")
    reply = await service.correct(alice, "hi there")
    assert reply.ok and await store.get_correction(reply.data["correction_id"]) is not None


async def test_feedback_is_stored_once_and_thumbs_down_invites_a_correction(
    service: ChatService, store: Store, alice: Actor
) -> None:
    answer = await say(service, alice, "hello")
    good = await service.handle_command(alice, "/good")
    assert good.ok and "/correct" not in good.text
    bad = await service.feedback(alice, "👎", message_id=answer.message_id)
    assert bad.ok and "reply with /correct <the right answer>" in bad.text
    stored = await store.list_feedback()
    assert [(f.message_id, f.rating) for f in stored] == [(answer.message_id, Rating.DOWN)]
    assert not (await service.feedback(alice, "meh")).ok
    user_turn = await service.feedback(alice, Rating.UP, message_id=answer.user_message_id)
    assert not user_turn.ok


async def test_forget_needs_confirmation(
    service: ChatService, store: Store, learner, alice: Actor
) -> None:
    await say(service, alice, "hello")
    await service.correct(alice, "hi")
    user = await service.user_for(alice)

    first = await service.handle_command(alice, "/forget")
    assert first.needs_confirmation and "cannot be undone" in first.text
    assert learner.forgotten == [] and len(await store.list_corrections()) == 1

    done = await service.handle_command(alice, "/forget confirm")
    assert done.ok and not done.needs_confirmation
    assert learner.forgotten == [user.id]
    assert await store.get_user(user.id) is None
    assert await store.list_corrections() == []

    learner.fail_with = RuntimeError("disk full")
    failed = await service.forget(alice, confirmed=True)
    assert not failed.ok and "try again" in failed.text


@pytest.mark.parametrize(
    "line", ["/retrain", "/retrain @alice", "/rollback", "/rollback #1", "/approve 1"]
)
async def test_admin_commands_are_refused_for_others(
    service: ChatService, store: Store, learner, alice: Actor, line: str
) -> None:
    await say(service, alice, "hello")
    await service.correct(alice, "hi")
    reply = await service.handle_command(alice, line)
    assert not reply.ok and "Only admins" in reply.text
    assert learner.retrained == [] and learner.rolled_back == []
    assert (await store.list_corrections())[0].scope == CorrectionScope.PERSONAL
    assert await store.list_jobs() == []


async def test_retrain_runs_for_admins_with_progress(
    service: ChatService, store: Store, learner, alice: Actor, admin: Actor
) -> None:
    alice_user = await service.user_for(alice)
    admin_user = await service.user_for(admin)
    lines: list[str] = []

    async def progress(line: str) -> None:
        lines.append(line)

    reply = await service.handle_command(admin, "/RETRAIN@OuroBot @alice", progress)
    assert reply.ok, reply.text
    assert learner.retrained == [(alice_user.id, admin_user.id)]
    assert lines == ["step 1/3 · loss 1.00", "step 2/3 · loss 0.50", "step 3/3 · loss 0.33"]
    assert reply.data["status"] == "succeeded" and "user #" in reply.text

    everyone = await service.retrain(admin)
    assert everyone.ok and learner.retrained[-1] == (None, admin_user.id)
    for target in (f"#{alice_user.id}", "100"):
        assert (await service.retrain(admin, target)).ok
        assert learner.retrained[-1][0] == alice_user.id
    unknown = await service.retrain(admin, "@nobody")
    assert not unknown.ok and "No user" in unknown.text
    learner.fail_with = RuntimeError("out of memory")
    failed = await service.retrain(admin)
    assert not failed.ok and "out of memory" in failed.text


async def test_rollback_for_admins(
    service: ChatService, store: Store, learner, alice: Actor, admin: Actor
) -> None:
    user = await service.user_for(alice)
    for version, parent in (("a-v1", None), ("a-v2", "a-v1")):
        await store.add_adapter(
            AdapterVersion(
                version, AdapterScope.PERSONAL, user.id, f"/adapters/{version}", parent,
                AdapterStatus.ACTIVE,
            )
        )  # fmt: skip
    reply = await service.rollback(admin, "@alice")
    assert reply.ok and "a-v1" in reply.text and reply.data["active"] == "a-v1"
    assert learner.rolled_back == [user.id]
    shared = await service.handle_command(admin, "/rollback")
    assert shared.ok and "base model" in shared.text and learner.rolled_back[-1] is None


async def test_approve_for_admins(
    service: ChatService, store: Store, learner, alice: Actor, admin: Actor
) -> None:
    await say(service, alice, "hello")
    reply = await service.correct(alice, "hi")
    correction_id = reply.data["correction_id"]
    admin_user = await service.user_for(admin)

    approved = await service.handle_command(admin, f"/approve #{correction_id}")
    assert approved.ok, approved.text
    stored = await store.get_correction(correction_id)
    assert stored is not None and stored.scope == CorrectionScope.SHARED_APPROVED
    assert stored.approved_by == admin_user.id

    for bad, expected in (("999", "no correction #999"), ("abc", "Usage"), ("", "Usage")):
        refused = await service.approve(admin, bad)
        assert not refused.ok and expected.lower() in refused.text.lower()
    await store.set_correction_status(correction_id, CorrectionStatus.REJECTED, reason="harmful")
    rejected = await service.approve(admin, str(correction_id))
    assert not rejected.ok and "harmful" in rejected.text


async def test_status_shows_adapters_rejections_and_next_run(
    service: ChatService, store: Store, learner, alice: Actor
) -> None:
    await say(service, alice, "hello")
    first = (await service.correct(alice, "hi")).data["correction_id"]
    await store.set_correction_status(first, CorrectionStatus.REJECTED, reason="not a fact")
    user = await service.user_for(alice)
    metrics = {"uptake": 0.9, "retention": 0.975}
    await store.add_adapter(
        AdapterVersion("alice-v7", AdapterScope.PERSONAL, user.id, "/a/7", None,
                       AdapterStatus.ACTIVE, metrics=metrics)
    )  # fmt: skip
    await store.add_adapter(
        AdapterVersion("shared-v2", AdapterScope.SHARED, None, "/a/s2", None, AdapterStatus.ACTIVE)
    )
    status = await service.status(alice)
    assert "1 rejected" in status.text and "not a fact" in status.text
    assert "alice-v7 (uptake 90%, retention 98%)" in status.text
    assert "shared-v2" in status.text and "UTC (in 42 min)" in status.text
    learner.next_run = None
    assert "no scheduled run" in (await service.status(alice)).text


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("/HELP", "/correct"),
        ("/help@OuroBot", "/status"),
        ("/start", "/forget"),
        ("/frobnicate now", "Unknown command /frobnicate"),
        ("not a command", "Commands start with /"),
        ("/", "Commands start with /"),
    ],
)
async def test_handle_command_parsing(
    service: ChatService, alice: Actor, line: str, expected: str
) -> None:
    reply = await service.handle_command(alice, line)
    assert expected in reply.text


async def test_help_lists_admin_commands_only_for_admins(
    service: ChatService, alice: Actor, admin: Actor
) -> None:
    assert "/retrain" not in service.help(alice).text
    assert "/retrain" in service.help(admin).text
    console = Actor("console", "me", "console")
    assert service.is_admin(console) and not service.is_admin(alice)


def test_parse_id_refuses_non_ascii_digits() -> None:
    from bot.commands import parse_id

    assert parse_id("#12") == 12
    assert parse_id("#²") is None
    assert parse_id("١٢") is None
