"""Text for commands: parsing "/name args", the help text, /status and admin targets.

Kept apart from `bot.service` so the service reads as behaviour and this as wording.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from storage.models import AdapterVersion, Correction, CorrectionStatus, User

if TYPE_CHECKING:
    from storage.store import Store

__all__ = [
    "describe_adapter",
    "describe_next_run",
    "help_text",
    "parse_command",
    "parse_id",
    "resolve_target",
    "shorten",
]

USER_COMMANDS = (
    ("/correct <the right answer>", "fix my last answer (or reply to an answer with it)"),
    ("/good, /bad", "rate my last answer"),
    ("/status", "your corrections and what I have learned from them"),
    ("/reset", "start a new conversation (your corrections are kept)"),
    ("/forget", "delete everything I store about you"),
    ("/help", "this list"),
)
ADMIN_COMMANDS = (
    ("/retrain [user]", "train now (no user: everyone with new corrections, and shared)"),
    ("/rollback [user]", "go back to the previous adapter (no user: the shared one)"),
    ("/approve <correction id>", "let a correction into the shared adapter"),
)
EVERYONE = frozenset({"all", "everyone", "*"})
SHARED = frozenset({"shared"})

_COMMAND = re.compile(r"^/([^\s@/]+)(?:@\S*)?(?:\s+(.*))?$", re.DOTALL)


def parse_command(line: str) -> tuple[str, str] | None:
    """'/Correct@OuroBot  Paris ' -> ('correct', 'Paris'); None when it is not a command."""
    match = _COMMAND.match(line.strip())
    if match is None:
        return None
    return match.group(1).casefold(), (match.group(2) or "").strip()


def help_text(is_admin: bool, extra: Sequence[str] = ()) -> str:
    lines = ["I am Ouro. Write to me; when I get something wrong, correct me and I learn.", ""]
    lines += [f"{usage}: {what}" for usage, what in USER_COMMANDS]
    if is_admin:
        lines += ["", "Admin:"] + [f"{usage}: {what}" for usage, what in ADMIN_COMMANDS]
    lines += list(extra)
    return "\n".join(lines)


def shorten(text: str, limit: int = 60) -> str:
    """One line, at most `limit` characters, for lists."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def count_by_status(corrections: Sequence[Correction]) -> dict[str, int]:
    counts = Counter(c.status.value for c in corrections)
    return {status.value: counts.get(status.value, 0) for status in CorrectionStatus}


def describe_correction(correction: Correction) -> str:
    line = f"#{correction.id} {correction.status.value}: {shorten(correction.corrected_answer)}"
    if correction.status == CorrectionStatus.REJECTED and correction.reason:
        line += f" (rejected: {correction.reason})"
    elif correction.status == CorrectionStatus.TRAINED and correction.adapter_version:
        line += f" (in {correction.adapter_version})"
    return line


def describe_adapter(adapter: AdapterVersion | None, empty: str) -> str:
    """'v3 (uptake 90%, retention 98%)' from the gate metrics the learner recorded."""
    if adapter is None:
        return empty
    figures = [
        f"{name} {_percent(value)}"
        for name in ("uptake", "retention")
        if (value := _metric(adapter.metrics, name)) is not None
    ]
    return adapter.version + (f" ({', '.join(figures)})" if figures else "")


def describe_next_run(when: datetime | None, now: datetime | None = None) -> str:
    if when is None:
        return "no scheduled run in this process"
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    minutes = max(0, round((when - now).total_seconds() / 60))
    return f"{when.astimezone(UTC):%Y-%m-%d %H:%M} UTC (in {minutes} min)"


def parse_id(raw: str) -> int | None:
    text = raw.strip().removeprefix("#")
    return int(text) if text.isascii() and text.isdigit() and len(text) < 19 else None


async def resolve_target(store: Store, platform: str, target: str) -> User | str:
    """A user named by an admin: '#<id>', '@name', a platform id or a mention; else an error."""
    raw = target.strip()
    if raw.startswith("#"):
        user_id = parse_id(raw)
        user = await store.get_user(user_id) if user_id is not None else None
        return user or f"No user {raw}."
    mention = re.fullmatch(r"<@!?(\d+)>", raw)
    if mention:
        raw = mention.group(1)
    if raw.startswith("@") and len(raw) > 1:
        wanted = raw[1:].casefold()
        named = [
            u
            for u in await store.list_users()
            if (u.display_name or "").casefold() in (wanted, raw.casefold())
        ]
        here = [u for u in named if u.platform == platform] or named
        if len(here) == 1:
            return here[0]
        if not here:
            return f"No user named {raw}."
        ids = ", ".join(f"#{u.id} ({u.platform})" for u in here)
        return f"{raw} is ambiguous: {ids}. Use the #id."
    user = await store.find_user(platform, raw)
    return user or f"No {platform} user {raw}. Use a platform user id, @name or #id."


def _metric(metrics: dict[str, Any], name: str) -> float | None:
    value = metrics.get(name)
    if value is None:
        value = next((v for k, v in metrics.items() if name in k and _number(v)), None)
    return float(value) if isinstance(value, int | float) and _number(value) else None


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _percent(value: float) -> str:
    return f"{value * 100:.0f}%" if 0 <= value <= 1 else f"{value:g}"
