"""Checks on what callers pass in, turning good values into what the columns store.

Values are checked before any SQL runs, so a bad argument is a clear `InvalidArgumentError`
naming the argument instead of a constraint failure. Timestamps are stored as ISO-8601 UTC
text with a fixed width, so text order is time order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import TypeVar

from storage.errors import InvalidArgumentError

E = TypeVar("E", bound=StrEnum)


def now() -> str:
    return to_text(datetime.now(UTC))


def to_text(moment: datetime, name: str = "timestamp") -> str:
    if not isinstance(moment, datetime):
        raise InvalidArgumentError(f"{name} must be a datetime, got {type(moment).__name__}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidArgumentError(f"{name} must be timezone-aware (use datetime.now(UTC))")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def enum_value(kind: type[E], value: object, name: str) -> E:
    """`value` as a member of `kind`; accepts the member or its string."""
    try:
        return kind(value)  # type: ignore[arg-type]  # any value: a bad one raises
    except (ValueError, TypeError):
        allowed = ", ".join(member.value for member in kind)
        raise InvalidArgumentError(f"{name} must be one of {allowed}; got {value!r}") from None


def optional_enum(kind: type[E], value: object, name: str) -> E | None:
    return None if value is None else enum_value(kind, value, name)


def ident(value: object, name: str) -> int:
    """A row id: a positive int (bools are rejected, they are ints by accident)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name} must be a positive integer id; got {value!r}")
    return value


def optional_ident(value: object, name: str) -> int | None:
    return None if value is None else ident(value, name)


def text(value: object, name: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{name} must be a string; got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InvalidArgumentError(f"{name} must not be empty")
    if "\x00" in value:
        raise InvalidArgumentError(f"{name} must not contain NUL characters")
    return value


def optional_text(value: object, name: str, *, allow_empty: bool = True) -> str | None:
    return None if value is None else text(value, name, allow_empty=allow_empty)


def to_json(value: object, name: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"{name} must be JSON-serialisable: {exc}") from exc


def json_object(value: object, name: str) -> str:
    if not isinstance(value, Mapping):
        raise InvalidArgumentError(f"{name} must be a dict; got {type(value).__name__}")
    return to_json(dict(value), name)


def context_json(value: object) -> str:
    """The turns that produced an answer: a list of {"role", "content"} string pairs."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise InvalidArgumentError("context must be a list of {'role', 'content'} dicts")
    turns = []
    for index, turn in enumerate(value):
        if not isinstance(turn, Mapping) or not all(
            isinstance(turn.get(key), str) for key in ("role", "content")
        ):
            raise InvalidArgumentError(f"context[{index}] must have string 'role' and 'content'")
        turns.append({str(key): item for key, item in turn.items()})
    return to_json(turns, "context")


def strings_json(value: object, name: str) -> str:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidArgumentError(f"{name} must be a list of strings, not a single string")
    items = list(value)
    if not all(isinstance(item, str) for item in items):
        raise InvalidArgumentError(f"{name} must contain only strings")
    return to_json(items, name)


def id_list(ids: int | Iterable[int], name: str) -> list[int]:
    if isinstance(ids, int):
        return [ident(ids, name)]
    if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
        raise InvalidArgumentError(f"{name} must be an id or a list of ids")
    return sorted({ident(item, name) for item in ids})
