"""Conversation turns, and the platform message ids that point at them."""

from __future__ import annotations

from storage import checks as ck
from storage import records
from storage.base import Repository, require_message, require_user
from storage.db import Tx
from storage.errors import InvalidArgumentError
from storage.models import Message, Role


class MessagesMixin(Repository):
    async def add_message(
        self,
        user_id: int,
        platform: str,
        chat_id: str,
        role: Role | str,
        content: str,
        *,
        platform_message_id: str | None = None,
        reply_to_id: int | None = None,
        adapter_version: str | None = None,
    ) -> Message:
        """Store one turn; a bot turn is stored under the user it answers."""
        user_id = ck.ident(user_id, "user_id")
        platform = ck.text(platform, "platform", allow_empty=False)
        chat_id = ck.text(chat_id, "chat_id", allow_empty=False)
        role = ck.enum_value(Role, role, "role")
        content = ck.text(content, "content")
        platform_message_id = ck.optional_text(
            platform_message_id, "platform_message_id", allow_empty=False
        )
        reply_to_id = ck.optional_ident(reply_to_id, "reply_to_id")
        adapter_version = ck.optional_text(adapter_version, "adapter_version")
        async with self._db.write() as tx:
            await require_user(tx, user_id)
            if reply_to_id is not None:
                await require_message(tx, reply_to_id, "message to reply to")
            row = await tx.row(
                "INSERT INTO messages (user_id, platform, chat_id, role, content,"
                " platform_message_id, reply_to_id, adapter_version, in_context, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?) RETURNING *",
                (
                    user_id,
                    platform,
                    chat_id,
                    role.value,
                    content,
                    platform_message_id,
                    reply_to_id,
                    adapter_version,
                    ck.now(),
                ),
            )
            assert row is not None
            if platform_message_id is not None:
                await _link(tx, row["id"], platform, chat_id, platform_message_id)
        return records.message(row)

    async def link_platform_message(
        self, message_id: int, platform: str, chat_id: str, platform_message_id: str
    ) -> None:
        """Map a platform message to a stored turn (a split answer maps several ids to one).

        A platform id that was linked before now points at `message_id`: the latest wins.
        """
        message_id = ck.ident(message_id, "message_id")
        platform = ck.text(platform, "platform", allow_empty=False)
        chat_id = ck.text(chat_id, "chat_id", allow_empty=False)
        platform_message_id = ck.text(platform_message_id, "platform_message_id", allow_empty=False)
        async with self._db.write() as tx:
            await require_message(tx, message_id)
            await _link(tx, message_id, platform, chat_id, platform_message_id)

    async def find_by_platform_id(
        self, platform: str, chat_id: str, platform_message_id: str
    ) -> Message | None:
        platform = ck.text(platform, "platform")
        chat_id = ck.text(chat_id, "chat_id")
        platform_message_id = ck.text(platform_message_id, "platform_message_id")
        async with self._db.read() as tx:
            row = await tx.row(
                "SELECT m.* FROM platform_messages AS p JOIN messages AS m ON m.id = p.message_id"
                " WHERE p.platform = ? AND p.chat_id = ? AND p.platform_message_id = ?",
                (platform, chat_id, platform_message_id),
            )
        return None if row is None else records.message(row)

    async def get_message(self, message_id: int) -> Message | None:
        message_id = ck.ident(message_id, "message_id")
        async with self._db.read() as tx:
            row = await tx.row("SELECT * FROM messages WHERE id = ?", (message_id,))
        return None if row is None else records.message(row)

    async def recent_messages(
        self, user_id: int, platform: str, chat_id: str, limit: int
    ) -> list[Message]:
        """The last `limit` turns still in context (not hidden by /reset), oldest first."""
        user_id = ck.ident(user_id, "user_id")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise InvalidArgumentError(f"limit must be a non-negative integer; got {limit!r}")
        async with self._db.read() as tx:
            rows = await tx.rows(
                "SELECT * FROM messages WHERE user_id = ? AND platform = ? AND chat_id = ?"
                " AND in_context = 1 ORDER BY id DESC LIMIT ?",
                (user_id, ck.text(platform, "platform"), ck.text(chat_id, "chat_id"), limit),
            )
        return [records.message(row) for row in reversed(rows)]

    async def last_bot_message(self, user_id: int, platform: str, chat_id: str) -> Message | None:
        """The bot's latest answer to this user in this chat, even if /reset hid it."""
        user_id = ck.ident(user_id, "user_id")
        async with self._db.read() as tx:
            row = await tx.row(
                "SELECT * FROM messages WHERE user_id = ? AND platform = ? AND chat_id = ?"
                " AND role = 'assistant' ORDER BY id DESC LIMIT 1",
                (user_id, ck.text(platform, "platform"), ck.text(chat_id, "chat_id")),
            )
        return None if row is None else records.message(row)

    async def clear_context(self, user_id: int, platform: str, chat_id: str) -> int:
        """Hide this chat's turns from future prompts (/reset); the rows stay for corrections."""
        user_id = ck.ident(user_id, "user_id")
        async with self._db.write() as tx:
            return await tx.run(
                "UPDATE messages SET in_context = 0"
                " WHERE user_id = ? AND platform = ? AND chat_id = ? AND in_context = 1",
                (user_id, ck.text(platform, "platform"), ck.text(chat_id, "chat_id")),
            )


async def _link(
    tx: Tx, message_id: int, platform: str, chat_id: str, platform_message_id: str
) -> None:
    await tx.run(
        "INSERT INTO platform_messages (platform, chat_id, platform_message_id, message_id)"
        " VALUES (?, ?, ?, ?) ON CONFLICT (platform, chat_id, platform_message_id)"
        " DO UPDATE SET message_id = excluded.message_id",
        (platform, chat_id, platform_message_id, message_id),
    )
