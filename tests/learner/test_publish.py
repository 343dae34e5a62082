"""Publishing: atomic placement, never-reused names, hot swap, rollback, and the engine sync."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from learner import publish as pub
from model.fake import FakeEngine
from storage.models import AdapterScope, AdapterStatus, AdapterVersion, User
from storage.store import Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store(tmp_path / "ouro.db") as opened:
        yield opened


@pytest.fixture
async def alice(store: Store) -> User:
    return await store.get_or_create_user("telegram", "1", "alice")


@pytest.fixture
def adapters(tmp_path: Path) -> Path:
    return tmp_path / "adapters"


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def candidate(adapters: Path, complete: bool = True) -> Path:
    temp = pub.new_temp_dir(adapters)
    names = pub.REQUIRED_FILES if complete else pub.REQUIRED_FILES[:1]
    for name in names:
        (temp / name).write_bytes(b"weights")
    return temp


async def publish(store: Store, engine: FakeEngine, adapters: Path, owner: int | None):  # type: ignore[no-untyped-def]
    scope = AdapterScope.SHARED if owner is None else AdapterScope.PERSONAL
    return await pub.publish(
        store,
        engine,
        candidate(adapters),
        adapters_dir=adapters,
        scope=scope,
        owner_id=owner,
        metrics={"uptake": 1.0},
    )


def test_version_names_are_readable_and_unique() -> None:
    when = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert re.fullmatch(r"u7-20260304T050607Z-[0-9a-f]{8}", pub.new_version_name(7, when))
    assert pub.new_version_name(None, when).startswith("shared-20260304T050607Z-")
    assert len({pub.new_version_name(7, when) for _ in range(2000)}) == 2000


async def test_place_never_reuses_a_recorded_or_existing_name(
    store: Store, alice: User, adapters: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken_row, taken_dir, fresh = "u1-row", "u1-dir", "u1-fresh"
    await store.add_adapter(
        AdapterVersion(
            taken_row, AdapterScope.PERSONAL, alice.id, "/gone", None, AdapterStatus.RETIRED
        )
    )
    (adapters / taken_dir).mkdir(parents=True)
    names = iter([taken_row, taken_dir, fresh])
    monkeypatch.setattr(pub, "new_version_name", lambda owner, now=None: next(names))

    temp = candidate(adapters)
    placed = await pub.place(store, temp, adapters, alice.id)

    assert placed.version == fresh and placed.path == adapters / fresh
    assert not temp.exists() and (adapters / fresh / "adapter_config.json").is_file()
    assert list((adapters / taken_dir).iterdir()) == []  # the existing folder was not touched


async def test_an_incomplete_candidate_is_never_placed(store: Store, adapters: Path) -> None:
    temp = candidate(adapters, complete=False)
    with pytest.raises(pub.PublishError, match="missing"):
        await pub.place(store, temp, adapters, None)
    assert names(adapters) == [temp.name]  # still hidden under .tmp-
    assert temp.name.startswith(".tmp-")


async def test_publish_records_parent_and_hot_swaps(
    store: Store, alice: User, adapters: Path
) -> None:
    engine = FakeEngine()
    first = await publish(store, engine, adapters, alice.id)
    second = await publish(store, engine, adapters, alice.id)
    assert first.status == second.status == AdapterStatus.ACTIVE
    assert second.parent_version == first.version and first.parent_version is None
    assert [s.owner for s in engine.activations] == ["1", "1"]
    assert engine.active_versions() == {"1": second.version}
    assert (await store.get_adapter(first.version)).status == AdapterStatus.RETIRED  # type: ignore[union-attr]
    shared = await publish(store, engine, adapters, None)
    assert (
        engine.activations[-1].owner is None
        and engine.active_versions()["shared"] == shared.version
    )


async def test_a_version_the_engine_rejects_never_goes_live(
    store: Store, alice: User, adapters: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = FakeEngine()
    live = await publish(store, engine, adapters, alice.id)
    monkeypatch.setattr(pub, "new_version_name", lambda owner, now=None: "u1-broken")
    engine.broken.add("u1-broken")
    refused = await publish(store, engine, adapters, alice.id)
    assert refused.status == AdapterStatus.REJECTED and "could not load" in (refused.reason or "")
    assert (await store.active_adapter(AdapterScope.PERSONAL, alice.id)).version == live.version  # type: ignore[union-attr]
    assert engine.active_versions() == {"1": live.version}


async def test_publish_for_an_unknown_owner_leaves_no_folder(store: Store, adapters: Path) -> None:
    with pytest.raises(ValueError):
        await publish(store, FakeEngine(), adapters, 999)
    assert names(adapters) == []


async def test_rollback_restores_the_parent_then_the_base_model(
    store: Store, alice: User, adapters: Path
) -> None:
    engine = FakeEngine()
    first = await publish(store, engine, adapters, alice.id)
    await publish(store, engine, adapters, alice.id)
    restored = await pub.rollback(store, engine, alice.id)
    assert restored is not None and restored.version == first.version
    assert engine.active_versions() == {"1": first.version}
    assert await pub.rollback(store, engine, alice.id) is None
    assert engine.active_versions() == {} and engine.deactivations == ["1"]


async def test_sync_engine_follows_the_store(store: Store, alice: User, adapters: Path) -> None:
    publisher = FakeEngine()  # the learner worker's view
    bot = FakeEngine()  # the bot process, told nothing
    mine = await publish(store, publisher, adapters, alice.id)
    shared = await publish(store, publisher, adapters, None)
    await pub.sync_engine(store, bot)
    assert bot.active_versions() == {"1": mine.version, "shared": shared.version}
    await pub.sync_engine(store, bot)
    assert len(bot.activations) == 2  # nothing changed: nothing reloaded

    await store.rollback_adapter(AdapterScope.SHARED, None)
    await pub.sync_engine(store, bot)
    assert bot.active_versions() == {"1": mine.version} and bot.deactivations == [None]

    newer = await publish(store, publisher, adapters, alice.id)
    bot.broken.add(newer.version)
    await pub.sync_engine(store, bot)  # cannot load: keeps serving the old one, no crash
    assert bot.active_versions() == {"1": mine.version}


def test_remove_folders_stays_inside_the_adapter_folder(tmp_path: Path, adapters: Path) -> None:
    inside = adapters / "u1-x"
    inside.mkdir(parents=True)
    outside = tmp_path / "precious"
    outside.mkdir()
    removed = pub.remove_folders(
        [inside, outside, adapters, adapters / ".." / "precious"], adapters
    )
    assert removed == [inside.resolve()] and outside.exists() and adapters.exists()


def test_clean_temp_removes_only_abandoned_temp_folders(adapters: Path) -> None:
    temp = pub.new_temp_dir(adapters)
    (adapters / "u1-live").mkdir()
    assert pub.clean_temp(adapters, older_than_s=3600) == 0
    assert pub.clean_temp(adapters) == 1
    assert not temp.exists() and (adapters / "u1-live").exists()


def test_hub_push_is_skipped_when_not_configured(tmp_path: Path) -> None:
    assert pub.push_to_hub(tmp_path, "shared-x", token=None, repo="me/ouro").startswith("skipped")
    assert pub.push_to_hub(tmp_path, "shared-x", token="t", repo=None).startswith("skipped")
