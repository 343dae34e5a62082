"""export_user and forget_user: everything about one user, and nothing about anyone else."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage.errors import NotFoundError
from storage.models import AdapterVersion, User
from storage.store import Store

SECRET = "alice-secret-7f3a"  # appears only in alice's own words


@dataclass
class World:
    alice: User
    bob: User
    alice_paths: list[str]
    bob_reply_id: int
    bob_correction_id: int
    bob_on_alice_id: int


async def _world(store: Store) -> World:
    alice = await store.get_or_create_user("telegram", "1", "alice")
    bob = await store.get_or_create_user("telegram", "2", "bob")
    q = await store.add_message(
        alice.id, "telegram", "g", "user", f"question {SECRET}", platform_message_id="t1"
    )
    a = await store.add_message(alice.id, "telegram", "g", "assistant", "answer", reply_to_id=q.id)
    await store.link_platform_message(a.id, "telegram", "g", "t2")
    await store.link_platform_message(a.id, "telegram", "g", "t3")
    ctx = [{"role": "user", "content": f"question {SECRET}"}]
    own = await store.add_correction(alice.id, a.id, "answer", f"better {SECRET}", ctx)
    await store.add_feedback(alice.id, a.id, "down")
    bq = await store.add_message(bob.id, "telegram", "g", "user", "bob asks", reply_to_id=a.id)
    ba = await store.add_message(bob.id, "telegram", "g", "assistant", "bob answer")
    bob_correction = await store.add_correction(bob.id, ba.id, "bob answer", "fixed", [])
    await store.set_correction_scope(bob_correction.id, "shared_approved", approved_by=alice.id)
    # bob (an admin) corrects alice's answer: the row quotes alice's words
    bob_on_alice = await store.add_correction(bob.id, a.id, "answer", "admin fix", ctx)
    await store.add_feedback(bob.id, a.id, "up")
    await store.add_feedback(bob.id, ba.id, "up")
    await store.add_feedback(alice.id, ba.id, "up")
    paths = []
    for version, parent in (("alice-1", None), ("alice-2", "alice-1")):
        path = f"/data/adapters/{version}"
        paths.append(path)
        await store.add_adapter(
            AdapterVersion(version, "personal", alice.id, path, parent, "active")  # type: ignore[arg-type]
        )
    await store.add_adapter(AdapterVersion("bob-1", "personal", bob.id, "/b", None, "active"))  # type: ignore[arg-type]
    await store.add_adapter(AdapterVersion("shared-1", "shared", None, "/s", None, "active"))  # type: ignore[arg-type]
    await store.enqueue_job(alice.id, None)
    await store.enqueue_job(bob.id, alice.id)
    await store.enqueue_job(None, alice.id)
    await store.enqueue_job(bob.id, bob.id)
    await store.enqueue_job(None, None)
    assert own.id
    return World(alice, bob, paths, bq.id, bob_correction.id, bob_on_alice.id)


async def test_export_contains_everything_about_the_user(store: Store) -> None:
    world = await _world(store)
    exported = await store.export_user(world.alice.id)
    assert json.loads(json.dumps(exported)) == exported  # plain JSON data
    assert exported["user"]["id"] == world.alice.id and exported["user"]["display_name"] == "alice"
    assert {key: len(value) for key, value in exported.items() if key != "user"} == {
        "messages": 2,
        "platform_messages": 3,
        "corrections": 2,  # her own, and bob's correction of her answer
        "feedback": 3,  # her two ratings, and bob's rating of her answer
        "adapters": 2,
        "jobs": 3,
    }
    assert exported["messages"][0]["content"] == f"question {SECRET}"
    assert exported["messages"][1]["role"] == "assistant"
    assert exported["corrections"][0]["context"] == [
        {"role": "user", "content": f"question {SECRET}"}
    ]
    assert exported["corrections"][0]["status"] == "pending"
    assert [a["version"] for a in exported["adapters"]] == ["alice-1", "alice-2"]
    assert isinstance(exported["jobs"][0]["created_at"], str)
    with pytest.raises(NotFoundError):
        await store.export_user(999)


async def test_forget_removes_every_row_about_the_user_only(
    store: Store, db_path: Path, count_rows: Callable[[], dict[str, int]]
) -> None:
    world = await _world(store)
    before = count_rows()
    bob_export = await store.export_user(world.bob.id)
    paths = await store.forget_user(world.alice.id)
    assert paths == world.alice_paths
    after = count_rows()
    assert after == {
        "users": before["users"] - 1,
        "messages": before["messages"] - 2,
        "platform_messages": before["platform_messages"] - 3,
        "corrections": before["corrections"] - 2,
        "feedback": before["feedback"] - 3,
        "adapters": before["adapters"] - 2,
        "training_jobs": before["training_jobs"] - 3,
    }
    assert after == {
        "users": 1,
        "messages": 2,
        "platform_messages": 0,
        "corrections": 1,
        "feedback": 1,
        "adapters": 2,
        "training_jobs": 2,
    }
    assert await store.get_user(world.alice.id) is None
    assert await store.find_by_platform_id("telegram", "g", "t2") is None
    # bob's rows survive, with their links to alice cleared
    reply = await store.get_message(world.bob_reply_id)
    assert reply is not None and reply.reply_to_id is None
    approved = await store.get_correction(world.bob_correction_id)
    assert approved is not None and approved.approved_by is None
    assert await store.get_correction(world.bob_on_alice_id) is None
    assert [a.version for a in await store.active_adapters()] == ["shared-1", "bob-1"]
    bob_after = await store.export_user(world.bob.id)
    assert len(bob_after["messages"]) == len(bob_export["messages"])
    assert len(bob_after["adapters"]) == 1 and len(bob_after["jobs"]) == 1
    with pytest.raises(NotFoundError):
        await store.forget_user(world.alice.id)
    # nothing of alice's words is left in the files, not even in freed pages or the WAL
    for file in db_path.parent.iterdir():
        assert SECRET.encode() not in file.read_bytes(), file.name


async def test_a_forgotten_user_coming_back_is_a_new_user(store: Store) -> None:
    world = await _world(store)
    await store.forget_user(world.alice.id)
    again = await store.get_or_create_user("telegram", "1", "alice")
    assert again.id > world.bob.id  # ids are never reused
    assert await store.recent_messages(again.id, "telegram", "g", 10) == []
    assert await store.active_adapter("personal", again.id) is None
