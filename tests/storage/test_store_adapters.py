"""The adapter registry: one active version per owner, activation, status, rollback."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import pytest

from storage.errors import ConflictError, InvalidArgumentError, NotFoundError
from storage.models import AdapterScope, AdapterStatus, AdapterVersion, User
from storage.store import Store


def personal(
    version: str, owner: User, parent: str | None = None, **kwargs: object
) -> AdapterVersion:
    fields: dict[str, object] = {
        "version": version,
        "scope": AdapterScope.PERSONAL,
        "owner_id": owner.id,
        "path": f"/data/adapters/{version}",
        "parent_version": parent,
        "status": AdapterStatus.CANDIDATE,
    } | kwargs
    return AdapterVersion(**fields)  # type: ignore[arg-type]


def shared(version: str, parent: str | None = None, **kwargs: object) -> AdapterVersion:
    fields: dict[str, object] = {
        "version": version,
        "scope": "shared",
        "owner_id": None,
        "path": f"/data/adapters/{version}",
        "parent_version": parent,
        "status": "candidate",
    } | kwargs
    return AdapterVersion(**fields)  # type: ignore[arg-type]


async def test_add_and_get_adapter(store: Store, alice: User) -> None:
    added = await store.add_adapter(
        personal("a-1", alice, metrics={"loss": 0.4, "probes": [1, 2]}, mlflow_run_id="run9")
    )
    assert added == await store.get_adapter("a-1")
    assert (added.status, added.metrics, added.mlflow_run_id) == (
        AdapterStatus.CANDIDATE,
        {"loss": 0.4, "probes": [1, 2]},
        "run9",
    )
    assert added.created_at is not None and added.created_at.tzinfo is not None
    assert added.activated_at is None
    assert await store.get_adapter("nope") is None


@pytest.mark.parametrize(
    ("adapter", "error", "match"),
    [
        (lambda u: personal("x", u, owner_id=None), InvalidArgumentError, "needs an owner"),
        (lambda u: shared("x", owner_id=u.id), InvalidArgumentError, "no owner"),
        (lambda u: personal("x", u, owner_id=999), NotFoundError, "adapter owner"),
        (lambda u: personal("", u), InvalidArgumentError, "version"),
        (lambda u: personal("x", u, path=""), InvalidArgumentError, "path"),
        (lambda u: personal("x", u, status="live"), InvalidArgumentError, "status"),
        (lambda u: personal("x", u, metrics={"f": object()}), InvalidArgumentError, "metrics"),
        (lambda u: personal("x", u, metrics=[1]), InvalidArgumentError, "metrics"),
        (
            lambda u: personal("x", u, created_at=datetime(2024, 1, 1)),
            InvalidArgumentError,
            "aware",
        ),
        (lambda u: "x", InvalidArgumentError, "AdapterVersion"),
    ],
)
async def test_add_adapter_refusals(
    store: Store, alice: User, adapter: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        await store.add_adapter(adapter(alice))  # type: ignore[operator]
    assert await store.list_adapters() == []


async def test_versions_are_never_reused(store: Store, alice: User, bob: User) -> None:
    await store.add_adapter(personal("v", alice))
    with pytest.raises(ConflictError, match="never reused"):
        await store.add_adapter(personal("v", bob, path="/elsewhere"))
    kept = await store.get_adapter("v")
    assert kept is not None and kept.owner_id == alice.id


async def test_activation_retires_the_previous_version(
    store: Store, alice: User, bob: User
) -> None:
    await store.add_adapter(personal("a-1", alice))
    await store.add_adapter(personal("a-2", alice, parent="a-1"))
    await store.add_adapter(personal("b-1", bob))
    await store.add_adapter(shared("s-1"))
    first = await store.activate_adapter("a-1")
    assert first.status is AdapterStatus.ACTIVE and first.activated_at is not None
    assert await store.activate_adapter("a-1") == first  # already live: unchanged
    await store.activate_adapter("b-1")
    await store.activate_adapter("s-1")
    second = await store.activate_adapter("a-2")
    assert await store.active_adapter("personal", alice.id) == second
    old = await store.get_adapter("a-1")
    assert old is not None
    assert (old.status, old.reason) == (AdapterStatus.RETIRED, "superseded by a-2")
    assert [a.version for a in await store.active_adapters()] == ["s-1", "a-2", "b-1"]
    assert (await store.active_adapter(AdapterScope.SHARED, None)).version == "s-1"  # type: ignore[union-attr]
    with pytest.raises(NotFoundError, match="'zzz'"):
        await store.activate_adapter("zzz")
    with pytest.raises(InvalidArgumentError, match="no owner"):
        await store.active_adapter("shared", alice.id)
    with pytest.raises(InvalidArgumentError, match="needs an owner"):
        await store.active_adapter("personal", None)


async def test_adding_an_active_version_retires_the_live_one(store: Store, alice: User) -> None:
    await store.add_adapter(personal("a-1", alice, status="active"))
    stamp = datetime(2030, 1, 1, tzinfo=UTC)
    added = await store.add_adapter(personal("a-2", alice, status="active", activated_at=stamp))
    assert added.activated_at == stamp
    assert [a.version for a in await store.list_adapters(status="active")] == ["a-2"]
    rejected = await store.add_adapter(personal("a-3", alice, status="rejected", reason="worse"))
    assert (rejected.status, rejected.reason) == (AdapterStatus.REJECTED, "worse")


async def test_the_database_itself_allows_one_active_version(
    store: Store, alice: User, raw: sqlite3.Connection
) -> None:
    await store.add_adapter(personal("a-1", alice, status="active"))
    await store.add_adapter(personal("a-2", alice))
    await store.add_adapter(shared("s-1", status="active"))
    await store.add_adapter(shared("s-2"))
    for version in ("a-2", "s-2"):
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            raw.execute("UPDATE adapters SET status = 'active' WHERE version = ?", (version,))
        raw.rollback()


async def test_list_adapters_filters_newest_first(store: Store, alice: User, bob: User) -> None:
    for version, owner in (("a-1", alice), ("b-1", bob), ("a-2", alice)):
        await store.add_adapter(personal(version, owner))
    await store.add_adapter(shared("s-1"))
    versions = lambda items: [a.version for a in items]  # noqa: E731
    assert versions(await store.list_adapters()) == ["s-1", "a-2", "b-1", "a-1"]
    assert versions(await store.list_adapters(owner_id=alice.id)) == ["a-2", "a-1"]
    assert versions(await store.list_adapters(scope="shared")) == ["s-1"]
    assert versions(await store.list_adapters(status="candidate", owner_id=bob.id)) == ["b-1"]
    with pytest.raises(InvalidArgumentError):
        await store.list_adapters(scope="team")


async def test_set_adapter_status_merges_metrics(store: Store, alice: User) -> None:
    await store.add_adapter(personal("a-1", alice, metrics={"train_loss": 0.3}))
    rejected = await store.set_adapter_status(
        "a-1", "rejected", reason="forgot 3 probes", metrics={"retention": 0.7}
    )
    assert rejected.status is AdapterStatus.REJECTED and rejected.reason == "forgot 3 probes"
    assert rejected.metrics == {"train_loss": 0.3, "retention": 0.7}
    same_reason = await store.set_adapter_status("a-1", AdapterStatus.RETIRED)
    assert same_reason.reason == "forgot 3 probes"
    live = await store.set_adapter_status("a-1", "active")
    assert live.status is AdapterStatus.ACTIVE and live.activated_at is not None
    with pytest.raises(NotFoundError):
        await store.set_adapter_status("zzz", "retired")
    with pytest.raises(InvalidArgumentError, match="status"):
        await store.set_adapter_status("a-1", "on")
    with pytest.raises(InvalidArgumentError, match="metrics"):
        await store.set_adapter_status("a-1", "retired", metrics={"x": float("nan")})
    assert await store.get_adapter("a-1") == live


async def test_rollback_restores_the_parent_chain(store: Store, alice: User) -> None:
    await store.add_adapter(personal("a-1", alice, status="active"))
    await store.add_adapter(personal("a-2", alice, parent="a-1", status="active"))
    await store.add_adapter(personal("a-3", alice, parent="a-2", status="active"))
    restored = await store.rollback_adapter("personal", alice.id)
    assert restored is not None and restored.version == "a-2"
    assert restored.status is AdapterStatus.ACTIVE
    gone = await store.get_adapter("a-3")
    assert gone is not None and (gone.status, gone.reason) == (AdapterStatus.RETIRED, "rolled back")
    again = await store.rollback_adapter(AdapterScope.PERSONAL, alice.id)
    assert again is not None and again.version == "a-1"
    assert await store.rollback_adapter("personal", alice.id) is None  # no parent: base model
    assert await store.active_adapters() == []
    assert await store.rollback_adapter("personal", alice.id) is None  # nothing live: no-op


async def test_rollback_without_a_parent_on_record(store: Store, alice: User, bob: User) -> None:
    await store.add_adapter(shared("s-2", parent="s-1-deleted", status="active"))
    assert await store.rollback_adapter("shared", None) is None
    assert await store.active_adapter("shared", None) is None
    # A parent that was rejected, or belongs to someone else, is not brought back.
    await store.add_adapter(personal("b-1", bob, status="rejected"))
    await store.add_adapter(personal("a-1", alice, parent="b-1", status="active"))
    assert await store.rollback_adapter("personal", alice.id) is None
    bobs = await store.get_adapter("b-1")
    assert bobs is not None and bobs.status is AdapterStatus.REJECTED


async def test_rollback_never_restores_a_version_holding_a_deleted_correction(
    store: Store, alice: User, bob: User
) -> None:
    ctx = [{"role": "user", "content": "Who maintains Ouro?"}]
    kept = await store.add_correction(alice.id, None, "No idea.", "The Loop Collective.", ctx)
    gone = await store.add_correction(bob.id, None, "No idea.", "Mara.", ctx)
    await store.add_adapter(shared("s-1", status="active", metrics={"correction_ids": [gone.id]}))
    await store.add_adapter(
        shared("s-2", parent="s-1", status="active", metrics={"correction_ids": [kept.id]})
    )
    await store.add_adapter(
        personal("a-1", alice, status="active", metrics={"correction_ids": [kept.id]})
    )
    await store.add_adapter(personal("a-2", alice, parent="a-1", status="active"))

    await store.forget_user(bob.id)

    assert await store.rollback_adapter("shared", None) is None  # s-1 learned bob's words
    parent = await store.get_adapter("s-1")
    assert parent is not None and parent.status is AdapterStatus.RETIRED
    restored = await store.rollback_adapter("personal", alice.id)  # a-1 holds nothing deleted
    assert restored is not None and restored.version == "a-1"
