"""The adapter registry: every version ever trained, and which one is live per owner.

A partial unique index allows one `active` row per (scope, owner); activation retires the
previous one in the same transaction, so readers never see two or a gap.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from storage import checks as ck
from storage import records
from storage.base import Repository, require, require_user, where
from storage.db import Tx
from storage.errors import ConflictError, InvalidArgumentError
from storage.models import AdapterScope, AdapterStatus, AdapterVersion

ROLLED_BACK = "rolled back"


class AdaptersMixin(Repository):
    async def add_adapter(self, adapter: AdapterVersion) -> AdapterVersion:
        """Register a version whose files are complete; `active` retires the previous one."""
        if not isinstance(adapter, AdapterVersion):
            raise InvalidArgumentError("add_adapter takes an AdapterVersion")
        version = ck.text(adapter.version, "version", allow_empty=False)
        scope = ck.enum_value(AdapterScope, adapter.scope, "scope")
        owner_id = _owner(scope, adapter.owner_id)
        status = ck.enum_value(AdapterStatus, adapter.status, "status")
        metrics = ck.json_object(adapter.metrics, "metrics")
        created = ck.now() if adapter.created_at is None else ck.to_text(adapter.created_at)
        activated = None if adapter.activated_at is None else ck.to_text(adapter.activated_at)
        params = (
            version,
            scope.value,
            owner_id,
            ck.text(adapter.path, "path", allow_empty=False),
            ck.optional_text(adapter.parent_version, "parent_version"),
            metrics,
            ck.optional_text(adapter.reason, "reason"),
            ck.optional_text(adapter.mlflow_run_id, "mlflow_run_id"),
            created,
            activated,
        )
        async with self._db.write() as tx:
            if owner_id is not None:
                await require_user(tx, owner_id, "adapter owner")
            if await tx.row("SELECT 1 FROM adapters WHERE version = ?", (version,)):
                raise ConflictError(
                    f"adapter version {version!r} exists; versions are never reused"
                )
            await tx.run(
                "INSERT INTO adapters (version, scope, owner_id, path, parent_version, status,"
                " metrics, reason, mlflow_run_id, created_at, activated_at)"
                " VALUES (?, ?, ?, ?, ?, 'candidate', ?, ?, ?, ?, ?)",
                params,
            )
            if status is AdapterStatus.ACTIVE:
                await _activate(tx, version, scope, owner_id, stamp=activated)
            elif status is not AdapterStatus.CANDIDATE:
                await tx.run(
                    "UPDATE adapters SET status = ? WHERE version = ?", (status.value, version)
                )
            return await _get(tx, version)

    async def get_adapter(self, version: str) -> AdapterVersion | None:
        version = ck.text(version, "version")
        async with self._db.read() as tx:
            row = await tx.row("SELECT * FROM adapters WHERE version = ?", (version,))
        return None if row is None else records.adapter(row)

    async def list_adapters(
        self,
        *,
        owner_id: int | None = None,
        scope: AdapterScope | str | None = None,
        status: AdapterStatus | str | None = None,
    ) -> list[AdapterVersion]:
        """Newest first."""
        clause, params = where(
            {
                "owner_id": ck.optional_ident(owner_id, "owner_id"),
                "scope": ck.optional_enum(AdapterScope, scope, "scope"),
                "status": ck.optional_enum(AdapterStatus, status, "status"),
            }
        )
        async with self._db.read() as tx:
            rows = await tx.rows(
                f"SELECT * FROM adapters{clause} ORDER BY created_at DESC, rowid DESC", params
            )
        return [records.adapter(row) for row in rows]

    async def active_adapter(
        self, scope: AdapterScope | str, owner_id: int | None
    ) -> AdapterVersion | None:
        scope = ck.enum_value(AdapterScope, scope, "scope")
        owner_id = _owner(scope, owner_id)
        async with self._db.read() as tx:
            row = await _active_row(tx, scope, owner_id)
        return None if row is None else records.adapter(row)

    async def active_adapters(self) -> list[AdapterVersion]:
        """Every live version (what the engine loads at start-up), shared first."""
        async with self._db.read() as tx:
            rows = await tx.rows(
                "SELECT * FROM adapters WHERE status = 'active'"
                " ORDER BY scope = 'personal', owner_id"
            )
        return [records.adapter(row) for row in rows]

    async def activate_adapter(self, version: str) -> AdapterVersion:
        """Make `version` live for its owner, retiring the owner's previous live version."""
        version = ck.text(version, "version", allow_empty=False)
        async with self._db.write() as tx:
            row = await _require(tx, version)
            if row["status"] != AdapterStatus.ACTIVE:
                await _activate(tx, version, AdapterScope(row["scope"]), row["owner_id"])
            return await _get(tx, version)

    async def set_adapter_status(
        self,
        version: str,
        status: AdapterStatus | str,
        *,
        reason: str | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> AdapterVersion:
        """Change a version's status; `metrics` are merged into the stored ones, not replacing.

        `reason` None keeps the stored reason; `active` behaves as `activate_adapter`.
        """
        version = ck.text(version, "version", allow_empty=False)
        status = ck.enum_value(AdapterStatus, status, "status")
        reason = ck.optional_text(reason, "reason")
        if metrics is not None:
            ck.json_object(metrics, "metrics")
        async with self._db.write() as tx:
            row = await _require(tx, version)
            merged = json.loads(row["metrics"]) | dict(metrics or {})
            await tx.run(
                "UPDATE adapters SET reason = coalesce(?, reason), metrics = ? WHERE version = ?",
                (reason, ck.to_json(merged, "metrics"), version),
            )
            if status is AdapterStatus.ACTIVE:
                if row["status"] != AdapterStatus.ACTIVE:
                    await _activate(tx, version, AdapterScope(row["scope"]), row["owner_id"])
            else:
                await tx.run(
                    "UPDATE adapters SET status = ? WHERE version = ?", (status.value, version)
                )
            return await _get(tx, version)

    async def rollback_adapter(
        self, scope: AdapterScope | str, owner_id: int | None
    ) -> AdapterVersion | None:
        """Retire the live version and restore its parent if still on record; returns the new one.

        Nothing live (and nothing changed) returns None; so does a live version whose parent
        is gone, or learned a correction that has since been deleted (its user forgotten, say):
        that leaves the owner on the base model.
        """
        scope = ck.enum_value(AdapterScope, scope, "scope")
        owner_id = _owner(scope, owner_id)
        async with self._db.write() as tx:
            live = await _active_row(tx, scope, owner_id)
            if live is None:
                return None
            await tx.run(
                "UPDATE adapters SET status = 'retired', reason = ? WHERE version = ?",
                (ROLLED_BACK, live["version"]),
            )
            parent = await tx.row(
                "SELECT * FROM adapters WHERE version = ? AND scope = ? AND owner_id IS ?"
                " AND status = 'retired'",
                (live["parent_version"], scope.value, owner_id),
            )
            if parent is None or await _holds_deleted(tx, parent["metrics"]):
                return None
            await tx.run(
                "UPDATE adapters SET status = 'active', activated_at = ?, reason = ?"
                " WHERE version = ?",
                (ck.now(), f"restored by rolling back {live['version']}", parent["version"]),
            )
            return await _get(tx, parent["version"])


async def _holds_deleted(tx: Tx, metrics: str) -> bool:
    """Whether a version learned corrections that are no longer on record."""
    ids = json.loads(metrics).get("correction_ids") or []
    if not ids:
        return False
    row = await tx.row(
        "SELECT count(*) AS n FROM corrections WHERE id IN (SELECT value FROM json_each(?))",
        (json.dumps(ids),),
    )
    return row is not None and int(row["n"]) < len(set(ids))


def _owner(scope: AdapterScope, owner_id: object) -> int | None:
    """Personal adapters belong to a user; the shared one to nobody."""
    if scope is AdapterScope.SHARED:
        if owner_id is not None:
            raise InvalidArgumentError("the shared adapter has no owner; pass owner_id=None")
        return None
    if owner_id is None:
        raise InvalidArgumentError("a personal adapter needs an owner_id")
    return ck.ident(owner_id, "owner_id")


async def _active_row(tx: Tx, scope: AdapterScope, owner_id: int | None) -> Any:
    return await tx.row(
        "SELECT * FROM adapters WHERE scope = ? AND owner_id IS ? AND status = 'active'",
        (scope.value, owner_id),
    )


async def _activate(
    tx: Tx, version: str, scope: AdapterScope, owner_id: int | None, *, stamp: str | None = None
) -> None:
    await tx.run(
        "UPDATE adapters SET status = 'retired', reason = ?"
        " WHERE scope = ? AND owner_id IS ? AND status = 'active'",
        (f"superseded by {version}", scope.value, owner_id),
    )
    await tx.run(
        "UPDATE adapters SET status = 'active', activated_at = ? WHERE version = ?",
        (stamp or ck.now(), version),
    )


async def _require(tx: Tx, version: str) -> Any:
    return await require(
        tx, "SELECT * FROM adapters WHERE version = ?", (version,), f"no adapter {version!r}"
    )


async def _get(tx: Tx, version: str) -> AdapterVersion:
    return records.adapter(await _require(tx, version))
