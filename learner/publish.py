"""Putting a trained adapter in front of users: atomically, under a never-reused name.

A candidate is trained into `<adapters_dir>/.tmp-*` (invisible to everyone), renamed into
place as `<adapters_dir>/<version>` only once complete, recorded in the store, loaded by the
engine, and only then made the active version. The engine may live in another process
(`ouro learner`): that process calls `sync_engine` on an interval to follow the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.interface import AdapterLoadError, AdapterSpec, InferenceEngine
from storage.models import AdapterScope, AdapterStatus, AdapterVersion

if TYPE_CHECKING:
    from storage import Store

log = logging.getLogger(__name__)

REQUIRED_FILES = ("adapter_model.safetensors", "adapter_config.json", "scope.safetensors")
TEMP_PREFIX = ".tmp-"


class PublishError(Exception):
    """The candidate's files are incomplete or could not be placed; nothing became visible."""


@dataclass(frozen=True)
class AdapterPlace:
    """A version name and the folder that now holds its files."""

    version: str
    path: Path


def owner_key(owner_id: int | None) -> str | None:
    """The engine's routing key for a store owner id (None: the shared adapter)."""
    return None if owner_id is None else str(owner_id)


def new_temp_dir(adapters_dir: Path) -> Path:
    """A private folder the child trains into; the engine never looks at dot-folders."""
    adapters_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=adapters_dir))


def new_version_name(owner_id: int | None, now: datetime | None = None) -> str:
    """`u<id>-<UTC time>-<random>` or `shared-...`: sortable, readable, unique by construction."""
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    prefix = "shared" if owner_id is None else f"u{owner_id}"
    return f"{prefix}-{stamp}-{secrets.token_hex(4)}"


def check_files(folder: Path) -> None:
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise PublishError(f"the candidate in {folder.name} is incomplete: missing {missing}")


def _fsync_tree(folder: Path) -> None:
    """Flush the child's files to disk so a power cut cannot leave a renamed but empty adapter."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def place(store: Store, temp: Path, adapters_dir: Path, owner_id: int | None) -> AdapterPlace:
    """Rename a complete temp folder to a fresh version folder; never reuses a name."""
    check_files(temp)
    await asyncio.to_thread(_fsync_tree, temp)
    for _ in range(20):
        version = new_version_name(owner_id)
        target = adapters_dir / version
        if target.exists() or await store.get_adapter(version) is not None:
            continue
        try:
            os.rename(temp, target)
        except OSError:  # lost a race for the name: draw another
            continue
        await asyncio.to_thread(_fsync_dir, adapters_dir)
        return AdapterPlace(version, target)
    raise PublishError("could not find an unused version name")


async def publish(
    store: Store,
    engine: InferenceEngine | None,
    temp: Path,
    *,
    adapters_dir: Path,
    scope: AdapterScope,
    owner_id: int | None,
    metrics: dict[str, Any],
    mlflow_run_id: str | None = None,
) -> AdapterVersion:
    """Place, record as candidate, load into the engine, then activate in the store.

    The previous active version stays live until the new one is loaded; if loading fails
    the row is marked rejected and routing is unchanged. Returns the final row.
    """
    placed = await place(store, temp, adapters_dir, owner_id)
    previous = await store.active_adapter(scope, owner_id)
    try:
        await store.add_adapter(
            AdapterVersion(
                version=placed.version,
                scope=scope,
                owner_id=owner_id,
                path=str(placed.path),
                parent_version=previous.version if previous else None,
                status=AdapterStatus.CANDIDATE,
                metrics=metrics,
                mlflow_run_id=mlflow_run_id,
            )
        )
    except Exception:
        remove_folders([placed.path], adapters_dir)
        raise
    if engine is not None:
        try:
            await engine.activate(
                AdapterSpec(placed.version, str(placed.path), owner_key(owner_id))
            )
        except AdapterLoadError as exc:
            return await store.set_adapter_status(
                placed.version,
                AdapterStatus.REJECTED,
                reason=f"the engine could not load it: {exc}",
            )
    try:
        return await store.activate_adapter(placed.version)
    except Exception:
        if engine is not None:  # the store did not switch: neither may the engine
            await _route_to(engine, previous, owner_id)
        raise


async def record_rejected(
    store: Store,
    files: Path,
    *,
    adapters_dir: Path,
    scope: AdapterScope,
    owner_id: int | None,
    metrics: dict[str, Any],
    reason: str,
    mlflow_run_id: str | None = None,
) -> AdapterVersion:
    """Keep a refused candidate on record (its files live on only as an MLflow artifact)."""
    version = new_version_name(owner_id)
    while (adapters_dir / version).exists() or await store.get_adapter(version) is not None:
        version = new_version_name(owner_id)
    previous = await store.active_adapter(scope, owner_id)
    row = await store.add_adapter(
        AdapterVersion(
            version=version,
            scope=scope,
            owner_id=owner_id,
            path=str(adapters_dir / version),
            parent_version=previous.version if previous else None,
            status=AdapterStatus.REJECTED,
            metrics=metrics,
            reason=reason,
            mlflow_run_id=mlflow_run_id,
        )
    )
    remove_folders([files], adapters_dir)
    return row


async def _route_to(
    engine: InferenceEngine, adapter: AdapterVersion | None, owner_id: int | None
) -> None:
    """Point the engine at `adapter` for this owner (None: back to the base model)."""
    if adapter is None:
        await engine.deactivate(owner_key(owner_id))
        return
    await engine.activate(AdapterSpec(adapter.version, adapter.path, owner_key(owner_id)))


async def rollback(
    store: Store, engine: InferenceEngine | None, owner_id: int | None
) -> AdapterVersion | None:
    """Retire the owner's active version and restore its parent (or the base model)."""
    scope = AdapterScope.SHARED if owner_id is None else AdapterScope.PERSONAL
    restored = await store.rollback_adapter(scope, owner_id)
    if engine is not None:
        try:
            await _route_to(engine, restored, owner_id)
        except AdapterLoadError as exc:
            log.warning("rolled back to %s but the engine cannot load it: %s", restored, exc)
            await engine.deactivate(owner_key(owner_id))
    return restored


async def sync_engine(store: Store, engine: InferenceEngine) -> None:
    """Make the engine's routing equal the store's active versions (another process publishes).

    A version that cannot be loaded is logged and skipped; the owner keeps what it had.
    """
    wanted = {owner_key(a.owner_id) or "shared": a for a in await store.active_adapters()}
    current = engine.active_versions()
    for key, adapter in wanted.items():
        if current.get(key) != adapter.version:
            try:
                await _route_to(engine, adapter, adapter.owner_id)
            except AdapterLoadError as exc:
                log.warning("cannot load active adapter %s: %s", adapter.version, exc)
    for key in current.keys() - wanted.keys():
        await engine.deactivate(None if key == "shared" else key)


async def sync_engine_every(
    store: Store, engine: InferenceEngine, seconds: float, stop: asyncio.Event
) -> None:
    """Run `sync_engine` every `seconds` until `stop` is set (bot process, worker mode)."""
    while not stop.is_set():
        try:
            await sync_engine(store, engine)
        except Exception:
            log.exception("adapter sync failed; retrying in %.0f s", seconds)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)


def remove_folders(paths: Iterable[str | Path], adapters_dir: Path) -> list[Path]:
    """Delete adapter folders, but only ones inside `adapters_dir`; returns what was removed."""
    root = adapters_dir.resolve()
    removed: list[Path] = []
    for raw in paths:
        path = Path(raw).resolve()
        if path == root or root not in path.parents:
            log.warning("not deleting %s: outside the adapter folder", raw)
            continue
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def clean_temp(adapters_dir: Path, older_than_s: float = 0.0) -> int:
    """Remove temp folders a dead trainer left behind; returns how many."""
    if not adapters_dir.is_dir():
        return 0
    cutoff = time.time() - older_than_s
    stale = [
        p
        for p in adapters_dir.iterdir()
        if p.name.startswith(TEMP_PREFIX) and p.is_dir() and p.stat().st_mtime <= cutoff
    ]
    return len(remove_folders(stale, adapters_dir))


def push_to_hub(folder: Path, version: str, *, token: str | None, repo: str | None) -> str:
    """Upload an approved shared adapter to the HF Hub when configured; never raises."""
    if not token or not repo:
        return "skipped: no Hugging Face Hub token or repo configured"
    try:
        from huggingface_hub import HfApi

        HfApi(token=token).upload_folder(
            repo_id=repo,
            folder_path=str(folder),
            path_in_repo=version,
            commit_message=f"Ouro shared adapter {version}",
        )
    except Exception as exc:
        log.warning("pushing %s to the Hub failed: %s", version, exc.__class__.__name__)
        return f"failed: {exc.__class__.__name__}"
    return f"pushed to {repo}/{version}"
