"""Users: one row per (platform, platform user id), with the internal id everything uses."""

from __future__ import annotations

from storage import checks as ck
from storage import records
from storage.base import Repository
from storage.errors import InvalidArgumentError
from storage.models import User


class UsersMixin(Repository):
    async def get_or_create_user(
        self,
        platform: str,
        platform_user_id: str,
        display_name: str | None = None,
        is_admin: bool = False,
    ) -> User:
        """The user for this platform identity, created on first sight.

        A new display name replaces the stored one (None keeps it); the admin flag always
        follows the caller, who reads it from config. Unchanged users cost no write.
        """
        platform = ck.text(platform, "platform", allow_empty=False)
        platform_user_id = ck.text(platform_user_id, "platform_user_id", allow_empty=False)
        display_name = ck.optional_text(display_name, "display_name")
        if not isinstance(is_admin, bool):
            raise InvalidArgumentError(f"is_admin must be a bool; got {is_admin!r}")
        found = await self.find_user(platform, platform_user_id)
        if (
            found is not None
            and found.is_admin == is_admin
            and display_name in (None, found.display_name)
        ):
            return found
        async with self._db.write() as tx:
            row = await tx.row(
                "INSERT INTO users (platform, platform_user_id, display_name, is_admin, created_at)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (platform, platform_user_id) DO UPDATE SET"
                " display_name = coalesce(excluded.display_name, users.display_name),"
                " is_admin = excluded.is_admin"
                " RETURNING *",
                (platform, platform_user_id, display_name, int(is_admin), ck.now()),
            )
        assert row is not None  # RETURNING always yields the row
        return records.user(row)

    async def get_user(self, user_id: int) -> User | None:
        user_id = ck.ident(user_id, "user_id")
        async with self._db.read() as tx:
            row = await tx.row("SELECT * FROM users WHERE id = ?", (user_id,))
        return None if row is None else records.user(row)

    async def find_user(self, platform: str, platform_user_id: str) -> User | None:
        platform = ck.text(platform, "platform")
        platform_user_id = ck.text(platform_user_id, "platform_user_id")
        async with self._db.read() as tx:
            row = await tx.row(
                "SELECT * FROM users WHERE platform = ? AND platform_user_id = ?",
                (platform, platform_user_id),
            )
        return None if row is None else records.user(row)

    async def list_users(self) -> list[User]:
        async with self._db.read() as tx:
            rows = await tx.rows("SELECT * FROM users ORDER BY id")
        return [records.user(row) for row in rows]
