"""Everything about one user: export it (data access) or delete it (/forget).

"About the user" means their rows, plus corrections and feedback others left on the user's
own conversation turns (those carry the user's words in their context).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from storage import checks as ck
from storage import records
from storage.base import Repository, require_user

log = logging.getLogger(__name__)

_ABOUT_MESSAGES = "message_id IN (SELECT id FROM messages WHERE user_id = :user)"


class PrivacyMixin(Repository):
    async def export_user(self, user_id: int) -> dict[str, Any]:
        """A JSON-serialisable dict of every row about the user, from one consistent snapshot."""
        user_id = ck.ident(user_id, "user_id")
        args = {"user": user_id}
        async with self._db.read() as tx:
            await require_user(tx, user_id)
            user = await tx.rows("SELECT * FROM users WHERE id = :user", args)
            messages = await tx.rows(
                "SELECT * FROM messages WHERE user_id = :user ORDER BY id", args
            )
            links = await tx.rows(
                f"SELECT * FROM platform_messages WHERE {_ABOUT_MESSAGES} ORDER BY message_id", args
            )
            corrections = await tx.rows(
                f"SELECT * FROM corrections WHERE user_id = :user OR {_ABOUT_MESSAGES} ORDER BY id",
                args,
            )
            feedback = await tx.rows(
                f"SELECT * FROM feedback WHERE user_id = :user OR {_ABOUT_MESSAGES} ORDER BY id",
                args,
            )
            adapters = await tx.rows(
                "SELECT * FROM adapters WHERE owner_id = :user ORDER BY created_at, rowid", args
            )
            jobs = await tx.rows(
                "SELECT * FROM training_jobs WHERE target_user_id = :user OR requested_by = :user"
                " ORDER BY id",
                args,
            )
        return records.plain(
            {
                "user": asdict(records.user(user[0])),
                "messages": [asdict(records.message(row)) for row in messages],
                "platform_messages": [dict(row) for row in links],
                "corrections": [asdict(records.correction(row)) for row in corrections],
                "feedback": [asdict(records.feedback(row)) for row in feedback],
                "adapters": [asdict(records.adapter(row)) for row in adapters],
                "jobs": [asdict(records.job(row)) for row in jobs],
            }
        )

    async def forget_user(self, user_id: int) -> list[str]:
        """Delete every row about the user in one transaction; returns their adapter folders.

        The caller unloads those adapters and deletes the folders. Rows of other users that
        merely point at this user (a reply, an approval) keep existing with the link cleared.
        """
        user_id = ck.ident(user_id, "user_id")
        args = {"user": user_id}
        async with self._db.write() as tx:
            await require_user(tx, user_id)
            paths = [
                row["path"]
                for row in await tx.rows(
                    "SELECT path FROM adapters WHERE owner_id = :user ORDER BY created_at", args
                )
            ]
            # Foreign keys would only unlink these (SET NULL): they hold the user's words.
            await tx.run(f"DELETE FROM corrections WHERE {_ABOUT_MESSAGES}", args)
            # ON DELETE CASCADE removes messages, links, corrections, feedback, adapters, jobs.
            await tx.run("DELETE FROM users WHERE id = :user", args)
        # secure_delete zeroed the rows in the database pages; the WAL still holds old copies.
        if not await self._db.checkpoint():
            log.info("forget_user(%d): WAL checkpoint deferred by other connections", user_id)
        return paths
