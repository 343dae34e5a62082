"""Corrections users make to bot answers, and their thumbs up/down."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from storage import checks as ck
from storage import records
from storage.base import Repository, require, require_message, require_user, where
from storage.errors import NotFoundError
from storage.models import Correction, CorrectionScope, CorrectionStatus, Feedback, Rating

_CHUNK = 500  # ids per IN (...) list, well under SQLite's variable limit


class CorrectionsMixin(Repository):
    async def add_correction(
        self,
        user_id: int,
        message_id: int | None,
        original_answer: str,
        corrected_answer: str,
        context: Sequence[Mapping[str, str]],
        *,
        rewordings: Iterable[str] = (),
        scope: CorrectionScope | str = CorrectionScope.PERSONAL,
    ) -> Correction:
        """Store a pending correction; when this returns, the row is committed."""
        user_id = ck.ident(user_id, "user_id")
        message_id = ck.optional_ident(message_id, "message_id")
        original_answer = ck.text(original_answer, "original_answer")
        corrected_answer = ck.text(corrected_answer, "corrected_answer", allow_empty=False)
        context_json = ck.context_json(context)
        rewordings_json = ck.strings_json(rewordings, "rewordings")
        scope = ck.enum_value(CorrectionScope, scope, "scope")
        stamp = ck.now()
        async with self._db.write() as tx:
            await require_user(tx, user_id)
            if message_id is not None:
                await require_message(tx, message_id, "corrected message")
            row = await tx.row(
                "INSERT INTO corrections (user_id, message_id, original_answer, corrected_answer,"
                " context, rewordings, status, scope, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?) RETURNING *",
                (
                    user_id,
                    message_id,
                    original_answer,
                    corrected_answer,
                    context_json,
                    rewordings_json,
                    scope.value,
                    stamp,
                    stamp,
                ),
            )
        assert row is not None
        return records.correction(row)

    async def get_correction(self, correction_id: int) -> Correction | None:
        correction_id = ck.ident(correction_id, "correction_id")
        async with self._db.read() as tx:
            row = await tx.row("SELECT * FROM corrections WHERE id = ?", (correction_id,))
        return None if row is None else records.correction(row)

    async def list_corrections(
        self,
        *,
        user_id: int | None = None,
        status: CorrectionStatus | str | None = None,
        scope: CorrectionScope | str | None = None,
    ) -> list[Correction]:
        """Newest first."""
        clause, params = where(
            {
                "user_id": ck.optional_ident(user_id, "user_id"),
                "status": ck.optional_enum(CorrectionStatus, status, "status"),
                "scope": ck.optional_enum(CorrectionScope, scope, "scope"),
            }
        )
        async with self._db.read() as tx:
            rows = await tx.rows(f"SELECT * FROM corrections{clause} ORDER BY id DESC", params)
        return [records.correction(row) for row in rows]

    async def set_correction_status(
        self,
        ids: int | Iterable[int],
        status: CorrectionStatus | str,
        *,
        reason: str | None = None,
        adapter_version: str | None = None,
    ) -> None:
        """Move corrections to `status`, all or none; `reason` replaces the old note.

        `adapter_version` None keeps the version a correction was last trained into.
        """
        id_list = ck.id_list(ids, "ids")
        status = ck.enum_value(CorrectionStatus, status, "status")
        reason = ck.optional_text(reason, "reason")
        adapter_version = ck.optional_text(adapter_version, "adapter_version")
        stamp = ck.now()
        async with self._db.write() as tx:
            for start in range(0, len(id_list), _CHUNK):
                chunk = id_list[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                changed = await tx.run(
                    "UPDATE corrections SET status = ?, reason = ?,"
                    " adapter_version = coalesce(?, adapter_version), updated_at = ?"
                    f" WHERE id IN ({marks})",
                    (status.value, reason, adapter_version, stamp, *chunk),
                )
                if changed != len(chunk):
                    found = {
                        row["id"]
                        for row in await tx.rows(
                            f"SELECT id FROM corrections WHERE id IN ({marks})", chunk
                        )
                    }
                    missing = sorted(set(chunk) - found)
                    raise NotFoundError(f"no corrections with ids {missing}; nothing was changed")

    async def set_correction_scope(
        self,
        correction_id: int,
        scope: CorrectionScope | str,
        *,
        approved_by: int | None = None,
    ) -> Correction:
        """Propose or approve a correction for the shared adapter (admin /approve)."""
        correction_id = ck.ident(correction_id, "correction_id")
        scope = ck.enum_value(CorrectionScope, scope, "scope")
        approved_by = ck.optional_ident(approved_by, "approved_by")
        async with self._db.write() as tx:
            await require(
                tx,
                "SELECT 1 FROM corrections WHERE id = ?",
                (correction_id,),
                f"no correction with id {correction_id}",
            )
            if approved_by is not None:
                await require_user(tx, approved_by, "approving user")
            row = await tx.row(
                "UPDATE corrections SET scope = ?, approved_by = ?, updated_at = ?"
                " WHERE id = ? RETURNING *",
                (scope.value, approved_by, ck.now(), correction_id),
            )
        assert row is not None
        return records.correction(row)

    async def count_corrections_since(self, user_id: int, since: datetime) -> int:
        """How many corrections the user made from `since` on (rate limits, triggers)."""
        user_id = ck.ident(user_id, "user_id")
        since_text = ck.to_text(since, "since")
        async with self._db.read() as tx:
            row = await tx.row(
                "SELECT count(*) FROM corrections WHERE user_id = ? AND created_at >= ?",
                (user_id, since_text),
            )
        return int(row[0]) if row is not None else 0

    async def add_feedback(self, user_id: int, message_id: int, rating: Rating | str) -> Feedback:
        """Record a rating; a user's later rating of the same message replaces the earlier."""
        user_id = ck.ident(user_id, "user_id")
        message_id = ck.ident(message_id, "message_id")
        rating = ck.enum_value(Rating, rating, "rating")
        async with self._db.write() as tx:
            await require_user(tx, user_id)
            await require_message(tx, message_id, "rated message")
            row = await tx.row(
                "INSERT INTO feedback (user_id, message_id, rating, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (user_id, message_id) DO UPDATE SET"
                " rating = excluded.rating, created_at = excluded.created_at RETURNING *",
                (user_id, message_id, rating.value, ck.now()),
            )
        assert row is not None
        return records.feedback(row)

    async def list_feedback(
        self, *, user_id: int | None = None, rating: Rating | str | None = None
    ) -> list[Feedback]:
        """Newest first."""
        clause, params = where(
            {
                "user_id": ck.optional_ident(user_id, "user_id"),
                "rating": ck.optional_enum(Rating, rating, "rating"),
            }
        )
        async with self._db.read() as tx:
            rows = await tx.rows(
                f"SELECT * FROM feedback{clause} ORDER BY created_at DESC, id DESC", params
            )
        return [records.feedback(row) for row in rows]
