"""Building the conversation the model sees, and the context a correction is stored with."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from model.interface import ChatMessage
from storage.models import Message, Role

if TYPE_CHECKING:
    from storage.store import Store

__all__ = ["as_context", "reply_chain", "to_chat"]


def to_chat(messages: Iterable[Message]) -> list[ChatMessage]:
    """Stored turns as model messages (user/assistant only)."""
    return [
        ChatMessage("assistant" if m.role == Role.ASSISTANT else "user", m.content)
        for m in messages
    ]


def as_context(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """The correction context: the turns that produced an answer, without system prompts."""
    return [{"role": m.role, "content": m.content} for m in messages if m.role != "system"]


async def reply_chain(store: Store, start: Message, limit: int) -> list[Message]:
    """`start` and the turns it replies to, following reply_to_id; oldest first, at most `limit`.

    Each user turn links the bot turn it follows, so the chain is the conversation as the
    model saw it, even when the window or the process has moved on.
    """
    chain: list[Message] = []
    seen: set[int] = set()
    current: Message | None = start
    while current is not None and len(chain) < limit and current.id not in seen:
        chain.append(current)
        seen.add(current.id)
        current = await store.get_message(current.reply_to_id) if current.reply_to_id else None
    chain.reverse()
    return chain
