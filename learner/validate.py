"""Decide which pending corrections may be learned, and record why the others may not.

The rules are pure functions over storage records and a small `Rules` context, so each can be
tested alone; `validate_pending` is the one place that reads and writes the store. A rejected
correction is never deleted: the store keeps it with its reason, which `/status` shows.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from difflib import SequenceMatcher
from typing import Any

from storage.models import Correction, CorrectionScope, CorrectionStatus, Message, Role, User

_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_INJECTION = [
    re.compile(p, re.IGNORECASE | re.MULTILINE)
    for p in (
        r"\b(ignore|disregard|forget)\b.{0,30}\b(previous|prior|above|earlier|all)\b.{0,30}"
        r"\b(instructions?|prompts?|rules|messages?)\b",
        r"\bsystem\s*prompt\b",
        r"<\|?\s*/?\s*(system|user|assistant|im_start|im_end|endoftext|eot_id)\s*\|?>",
        r"\[/?INST\]|<<\s*/?SYS\s*>>",
        r"^\s*#{0,3}\s*(system|assistant)\s*:",
        r"\byou are now\b.{0,40}\b(mode|jailbroken|unrestricted|dan)\b",
    )
]


@dataclass(frozen=True)
class Rules:
    """Limits the rules apply; built from the learner's configuration."""

    max_chars: int = 2000
    daily_quota: int = 50
    near_duplicate_ratio: float = 0.9
    max_links: int = 2
    shared_min_users: int = 3


@dataclass(frozen=True)
class Verdict:
    correction_id: int
    accepted: bool
    reason: str | None = None


def normalise(text: str) -> str:
    """Case-, space- and punctuation-insensitive form used to compare corrections."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text)
    return " ".join(text.split())


def similarity(a: str, b: str) -> float:
    """Similarity ratio (0..1) of two texts after normalisation."""
    na, nb = normalise(a), normalise(b)
    if na == nb:
        return 1.0
    return SequenceMatcher(None, na, nb, autojunk=False).ratio()


def text_problem(correction: Correction, rules: Rules) -> str | None:
    """Empty, oversized or unchanged corrections teach nothing."""
    answer = correction.corrected_answer
    if not answer.strip():
        return "the correction is empty"
    if len(answer) > rules.max_chars:
        return f"the correction is longer than {rules.max_chars} characters"
    if any(len(r) > rules.max_chars for r in correction.rewordings):
        return f"a rewording is longer than {rules.max_chars} characters"
    if normalise(answer) == normalise(correction.original_answer):
        return "the correction is the same as the original answer"
    return None


def abuse_problem(correction: Correction, rules: Rules) -> str | None:
    """Link spam and prompt injection must never reach the weights."""
    answer = correction.corrected_answer
    if len(_URL.findall(answer)) > rules.max_links:
        return f"the correction contains more than {rules.max_links} links (link spam)"
    for text in (answer, correction.question, *correction.rewordings):
        if any(pattern.search(text) for pattern in _INJECTION):
            return "the correction looks like a prompt injection"
    return None


def ownership_problem(
    correction: Correction, message: Message | None, user: User | None
) -> str | None:
    """Users may only correct the bot's answers to themselves; admins may correct any answer."""
    if message is None:
        return "the corrected answer no longer exists"
    if message.role != Role.ASSISTANT:
        return "the corrected message is not an answer from the bot"
    if message.user_id != correction.user_id and not (user is not None and user.is_admin):
        return "the corrected answer was given to someone else"
    return None


def same_question(a: Correction, b: Correction, rules: Rules) -> bool:
    return similarity(a.question, b.question) >= rules.near_duplicate_ratio


def is_duplicate(a: Correction, b: Correction, rules: Rules) -> bool:
    """Exact or near duplicate: the same question corrected to (almost) the same answer."""
    return same_question(a, b, rules) and (
        similarity(a.corrected_answer, b.corrected_answer) >= rules.near_duplicate_ratio
    )


def _day(moment: datetime) -> datetime:
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def _order(c: Correction) -> tuple[datetime, int]:
    created = c.created_at if c.created_at.tzinfo else c.created_at.replace(tzinfo=UTC)
    return created, c.id


def judge(
    corrections: Sequence[Correction],
    messages: Mapping[int, Message],
    users: Mapping[int, User],
    rules: Rules,
) -> list[Verdict]:
    """Verdicts for the pending corrections among `corrections` (one user's or everyone's).

    `corrections` holds every stored correction the rules compare against (pending, accepted,
    trained, rejected); `messages` the corrected bot messages by id. Also returns rejections of
    older *accepted* corrections superseded by a newer one (the newest always wins).
    """
    verdicts: dict[int, Verdict] = {}
    kept: dict[int, list[Correction]] = {}  # user -> accepted/trained so far, oldest first
    used: dict[tuple[int, datetime], int] = {}  # (user, UTC day) -> corrections counted
    for c in sorted(corrections, key=_order):
        day_key = (c.user_id, _day(c.created_at))
        if c.status in (CorrectionStatus.ACCEPTED, CorrectionStatus.TRAINED):
            used[day_key] = used.get(day_key, 0) + 1
            kept.setdefault(c.user_id, []).append(c)
            continue
        if c.status != CorrectionStatus.PENDING:
            continue
        user = users.get(c.user_id)
        reason = (
            text_problem(c, rules)
            or abuse_problem(c, rules)
            or ownership_problem(c, messages.get(c.message_id or -1), user)
        )
        is_admin = user is not None and user.is_admin
        if reason is None and not is_admin and used.get(day_key, 0) >= rules.daily_quota:
            reason = f"over the daily quota of {rules.daily_quota} corrections"
        earlier = kept.get(c.user_id, [])
        if reason is None:
            learned = [e for e in earlier if e.status == CorrectionStatus.TRAINED]
            twin = next((e for e in reversed(learned) if is_duplicate(c, e, rules)), None)
            if twin is not None and not any(
                same_question(c, e, rules) and _order(e) > _order(twin) for e in earlier
            ):
                reason = f"already learned (duplicate of #{twin.id})"
        if reason is not None:
            verdicts[c.id] = Verdict(c.id, False, reason)
            continue
        verdicts[c.id] = Verdict(c.id, True)
        used[day_key] = used.get(day_key, 0) + 1
        for older in earlier:  # the newest correction of a question wins
            if older.status == CorrectionStatus.TRAINED or not same_question(c, older, rules):
                continue
            word = "duplicate of" if is_duplicate(c, older, rules) else "superseded by"
            verdicts[older.id] = Verdict(older.id, False, f"{word} #{c.id} (newer)")
        kept[c.user_id] = [
            e for e in earlier if e.id not in verdicts or verdicts[e.id].accepted
        ] + [c]
    return list(verdicts.values())


def consensus_groups(corrections: Iterable[Correction], min_users: int) -> list[list[Correction]]:
    """Learnable corrections that `min_users` distinct users made identically, grouped.

    "Identically" means the same normalised question and the same normalised answer; one user
    alone, however many times they repeat it, never makes a group.
    """
    groups: dict[tuple[str, str], list[Correction]] = {}
    for c in corrections:
        if c.status in (CorrectionStatus.ACCEPTED, CorrectionStatus.TRAINED):
            key = (normalise(c.question), normalise(c.corrected_answer))
            groups.setdefault(key, []).append(c)
    return [g for g in groups.values() if len({c.user_id for c in g}) >= min_users]


def consensus(corrections: Iterable[Correction], min_users: int) -> list[int]:
    """Ids of corrections to share automatically (backed by enough users, not yet approved)."""
    groups = consensus_groups(corrections, min_users)
    return sorted(c.id for g in groups for c in g if c.scope != CorrectionScope.SHARED_APPROVED)


def shared_learnable(corrections: Sequence[Correction], min_users: int) -> list[Correction]:
    """Approved shared corrections that may reach the shared adapter, newest first.

    Approved by an admin who is not the author, or approved automatically (no approver) and
    still backed by `min_users` distinct users; of each question only the newest is kept.
    """
    backed = {c.id for g in consensus_groups(corrections, min_users) for c in g}
    chosen = [
        c
        for c in corrections
        if c.scope == CorrectionScope.SHARED_APPROVED
        and c.status in (CorrectionStatus.ACCEPTED, CorrectionStatus.TRAINED)
        and ((c.approved_by is not None and c.approved_by != c.user_id) or c.id in backed)
    ]
    return newest_per_question(chosen)


def newest_per_question(corrections: Iterable[Correction]) -> list[Correction]:
    """Keep the newest correction of each normalised question (a later one replaces earlier)."""
    seen: set[str] = set()
    out: list[Correction] = []
    for c in sorted(corrections, key=_order, reverse=True):
        key = normalise(c.question)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


async def validate_pending(
    store: Any, rules: Rules, *, user_id: int | None = None
) -> list[Verdict]:
    """Judge pending corrections (one user's or everyone's), store the verdicts, share consensus.

    Returns the verdicts written. Safe to run concurrently with new corrections arriving: only
    the rows judged here change.
    """
    pending = await store.list_corrections(user_id=user_id, status=CorrectionStatus.PENDING)
    if not pending:
        return []
    owners = sorted({c.user_id for c in pending})
    corrections: list[Correction] = []
    for owner in owners:
        corrections.extend(await store.list_corrections(user_id=owner))
    users = {u.id: u for u in [await store.get_user(owner) for owner in owners] if u is not None}
    messages: dict[int, Message] = {}
    for c in pending:
        if c.message_id is not None:
            message = await store.get_message(c.message_id)
            if message is not None:
                messages[message.id] = message
    verdicts = judge(corrections, messages, users, rules)
    for v in verdicts:
        status = CorrectionStatus.ACCEPTED if v.accepted else CorrectionStatus.REJECTED
        await store.set_correction_status(v.correction_id, status, reason=v.reason)
    everyone = await store.list_corrections()
    for cid in consensus(everyone, rules.shared_min_users):
        await store.set_correction_scope(cid, CorrectionScope.SHARED_APPROVED, approved_by=None)
    return verdicts
