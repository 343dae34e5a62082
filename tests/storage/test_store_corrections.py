"""Corrections and feedback, including every refusal."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from storage.errors import InvalidArgumentError, NotFoundError
from storage.models import CorrectionScope, CorrectionStatus, Message, Rating, User
from storage.store import Store

CONTEXT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "capital of France?"},
]


async def test_add_and_get_correction(store: Store, alice: User, answer: Message) -> None:
    made = await store.add_correction(
        alice.id, answer.id, "Lyon", "Paris", CONTEXT, rewordings=["France's capital?", "où?"]
    )
    assert made == await store.get_correction(made.id)
    assert (made.status, made.scope, made.reason, made.approved_by) == (
        CorrectionStatus.PENDING,
        CorrectionScope.PERSONAL,
        None,
        None,
    )
    assert made.context == CONTEXT and made.rewordings == ["France's capital?", "où?"]
    assert made.question == "capital of France?"
    assert made.created_at == made.updated_at and made.created_at.tzinfo is not None
    shared = await store.add_correction(
        alice.id, None, "x", "y", [], scope=CorrectionScope.SHARED_CANDIDATE
    )
    assert shared.message_id is None and shared.scope is CorrectionScope.SHARED_CANDIDATE
    assert shared.question == ""
    assert await store.get_correction(999) is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"user_id": 999}, NotFoundError, "no user with id 999"),
        ({"message_id": 999}, NotFoundError, "corrected message"),
        ({"corrected_answer": "   "}, InvalidArgumentError, "corrected_answer"),
        ({"corrected_answer": None}, InvalidArgumentError, "corrected_answer"),
        ({"context": "capital?"}, InvalidArgumentError, "context"),
        ({"context": [{"role": "user"}]}, InvalidArgumentError, r"context\[0\]"),
        ({"context": [{"role": "user", "content": 3}]}, InvalidArgumentError, "context"),
        ({"rewordings": "one string"}, InvalidArgumentError, "rewordings"),
        ({"rewordings": ["ok", 2]}, InvalidArgumentError, "rewordings"),
        ({"scope": "everyone"}, InvalidArgumentError, "scope must be one of"),
    ],
)
async def test_add_correction_refusals_write_nothing(
    store: Store,
    alice: User,
    answer: Message,
    count_rows: Callable[[], dict[str, int]],
    kwargs: dict[str, object],
    error: type[Exception],
    match: str,
) -> None:
    args: dict[str, object] = {
        "user_id": alice.id,
        "message_id": answer.id,
        "original_answer": "Lyon",
        "corrected_answer": "Paris",
        "context": CONTEXT,
    } | kwargs
    rest = {key: args.pop(key) for key in ("rewordings", "scope") if key in args}
    with pytest.raises(error, match=match):
        await store.add_correction(*args.values(), **rest)  # type: ignore[arg-type]
    assert count_rows()["corrections"] == 0


async def test_list_corrections_filters_newest_first(
    store: Store, alice: User, bob: User, answer: Message
) -> None:
    a1 = await store.add_correction(alice.id, answer.id, "Lyon", "Paris", CONTEXT)
    b1 = await store.add_correction(bob.id, answer.id, "Lyon", "Paris!", CONTEXT)
    a2 = await store.add_correction(
        alice.id, answer.id, "Lyon", "Paris.", CONTEXT, scope="shared_candidate"
    )
    await store.set_correction_status(a1.id, "accepted")
    ids = lambda items: [c.id for c in items]  # noqa: E731
    assert ids(await store.list_corrections()) == [a2.id, b1.id, a1.id]
    assert ids(await store.list_corrections(user_id=alice.id)) == [a2.id, a1.id]
    assert ids(await store.list_corrections(status="pending")) == [a2.id, b1.id]
    assert ids(
        await store.list_corrections(user_id=alice.id, status=CorrectionStatus.ACCEPTED)
    ) == [a1.id]
    assert ids(await store.list_corrections(scope="shared_candidate")) == [a2.id]
    assert await store.list_corrections(user_id=12345) == []
    with pytest.raises(InvalidArgumentError, match="status"):
        await store.list_corrections(status="done")


async def test_set_correction_status_is_all_or_nothing(
    store: Store, alice: User, answer: Message
) -> None:
    made = [
        await store.add_correction(alice.id, answer.id, "a", f"b{i}", CONTEXT) for i in range(3)
    ]
    await store.set_correction_status(
        [made[0].id, made[1].id], "rejected", reason="contradicts itself"
    )
    rejected = await store.get_correction(made[0].id)
    assert rejected is not None
    assert (rejected.status, rejected.reason) == (CorrectionStatus.REJECTED, "contradicts itself")
    assert rejected.updated_at > rejected.created_at
    with pytest.raises(NotFoundError, match=r"\[999\]"):
        await store.set_correction_status([made[2].id, 999], "accepted")
    untouched = await store.get_correction(made[2].id)
    assert untouched is not None and untouched.status is CorrectionStatus.PENDING
    await store.set_correction_status(
        (c.id for c in made), CorrectionStatus.TRAINED, adapter_version="u1-v1"
    )
    for correction in made:
        got = await store.get_correction(correction.id)
        assert got is not None
        assert (got.status, got.adapter_version, got.reason) == ("trained", "u1-v1", None)
    await store.set_correction_status(made[0].id, "accepted")  # keeps the version
    got = await store.get_correction(made[0].id)
    assert got is not None and got.adapter_version == "u1-v1"
    await store.set_correction_status([], "accepted")  # nothing to do
    with pytest.raises(InvalidArgumentError, match="status"):
        await store.set_correction_status(made[0].id, "archived")
    with pytest.raises(InvalidArgumentError, match="ids"):
        await store.set_correction_status("1", "accepted")  # type: ignore[arg-type]


async def test_set_correction_status_many_ids(
    store: Store, alice: User, raw: sqlite3.Connection
) -> None:
    """More ids than one IN (...) list takes; seeded directly for speed."""
    stamp = datetime.now(UTC).isoformat()
    with raw:
        raw.executemany(
            "INSERT INTO corrections (user_id, original_answer, corrected_answer, created_at,"
            " updated_at) VALUES (?, 'a', 'b', ?, ?)",
            [(alice.id, stamp, stamp)] * 1200,
        )
    ids = [c.id for c in await store.list_corrections()]
    assert len(ids) == 1200
    with pytest.raises(NotFoundError, match=r"\[1201\]"):
        await store.set_correction_status([*ids, 1201], "accepted")
    assert await store.list_corrections(status="accepted") == []
    await store.set_correction_status(ids, "accepted")
    assert len(await store.list_corrections(status="accepted")) == 1200


async def test_set_correction_scope(store: Store, alice: User, bob: User) -> None:
    made = await store.add_correction(alice.id, None, "a", "b", [])
    approved = await store.set_correction_scope(made.id, "shared_approved", approved_by=bob.id)
    assert (approved.scope, approved.approved_by) == (CorrectionScope.SHARED_APPROVED, bob.id)
    assert approved == await store.get_correction(made.id)
    with pytest.raises(NotFoundError, match="approving user"):
        await store.set_correction_scope(made.id, "shared_approved", approved_by=999)
    with pytest.raises(NotFoundError, match="no correction with id 999"):
        await store.set_correction_scope(999, "shared_approved")
    with pytest.raises(InvalidArgumentError, match="scope"):
        await store.set_correction_scope(made.id, "global")
    still = await store.get_correction(made.id)
    assert still is not None and still.approved_by == bob.id


async def test_count_corrections_since(store: Store, alice: User, bob: User) -> None:
    start = datetime.now(UTC)
    for _ in range(3):
        await store.add_correction(alice.id, None, "a", "b", [])
    await store.add_correction(bob.id, None, "a", "b", [])
    assert await store.count_corrections_since(alice.id, start - timedelta(minutes=1)) == 3
    assert (
        await store.count_corrections_since(alice.id, datetime.now(UTC) + timedelta(seconds=1)) == 0
    )
    other_zone = (start - timedelta(minutes=1)).astimezone(
        __import__("datetime").timezone(timedelta(hours=-7))
    )
    assert await store.count_corrections_since(alice.id, other_zone) == 3
    with pytest.raises(InvalidArgumentError, match="timezone-aware"):
        await store.count_corrections_since(alice.id, datetime.now())
    with pytest.raises(InvalidArgumentError, match="datetime"):
        await store.count_corrections_since(alice.id, "yesterday")  # type: ignore[arg-type]


async def test_feedback_one_per_user_and_message(
    store: Store, alice: User, bob: User, answer: Message
) -> None:
    first = await store.add_feedback(alice.id, answer.id, "down")
    changed = await store.add_feedback(alice.id, answer.id, Rating.UP)
    assert changed.id == first.id and changed.rating is Rating.UP
    other = await store.add_feedback(bob.id, answer.id, "down")
    assert [f.id for f in await store.list_feedback()] == [other.id, first.id]
    assert await store.list_feedback(user_id=alice.id) == [changed]
    assert await store.list_feedback(rating="down") == [other]
    with pytest.raises(InvalidArgumentError, match="rating"):
        await store.add_feedback(alice.id, answer.id, "meh")
    with pytest.raises(NotFoundError, match="rated message"):
        await store.add_feedback(alice.id, 999, "up")
    with pytest.raises(NotFoundError, match="no user"):
        await store.add_feedback(999, answer.id, "up")
    assert await store.list_feedback(user_id=alice.id) == [changed]
