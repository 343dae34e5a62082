"""Rows to the frozen records of `storage.models`, and records to plain JSON data."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any

from storage.models import (
    AdapterScope,
    AdapterStatus,
    AdapterVersion,
    Correction,
    CorrectionScope,
    CorrectionStatus,
    Feedback,
    JobStatus,
    Message,
    Rating,
    Role,
    TrainingJob,
    User,
)


def user(row: sqlite3.Row) -> User:
    return User(
        id=row["id"],
        platform=row["platform"],
        platform_user_id=row["platform_user_id"],
        display_name=row["display_name"],
        is_admin=bool(row["is_admin"]),
        created_at=_at(row["created_at"]),
    )


def message(row: sqlite3.Row) -> Message:
    return Message(
        id=row["id"],
        user_id=row["user_id"],
        platform=row["platform"],
        chat_id=row["chat_id"],
        role=Role(row["role"]),
        content=row["content"],
        platform_message_id=row["platform_message_id"],
        reply_to_id=row["reply_to_id"],
        adapter_version=row["adapter_version"],
        in_context=bool(row["in_context"]),
        created_at=_at(row["created_at"]),
    )


def correction(row: sqlite3.Row) -> Correction:
    return Correction(
        id=row["id"],
        user_id=row["user_id"],
        message_id=row["message_id"],
        original_answer=row["original_answer"],
        corrected_answer=row["corrected_answer"],
        context=json.loads(row["context"]),
        rewordings=json.loads(row["rewordings"]),
        status=CorrectionStatus(row["status"]),
        reason=row["reason"],
        scope=CorrectionScope(row["scope"]),
        approved_by=row["approved_by"],
        adapter_version=row["adapter_version"],
        created_at=_at(row["created_at"]),
        updated_at=_at(row["updated_at"]),
    )


def feedback(row: sqlite3.Row) -> Feedback:
    return Feedback(
        id=row["id"],
        user_id=row["user_id"],
        message_id=row["message_id"],
        rating=Rating(row["rating"]),
        created_at=_at(row["created_at"]),
    )


def adapter(row: sqlite3.Row) -> AdapterVersion:
    return AdapterVersion(
        version=row["version"],
        scope=AdapterScope(row["scope"]),
        owner_id=row["owner_id"],
        path=row["path"],
        parent_version=row["parent_version"],
        status=AdapterStatus(row["status"]),
        metrics=json.loads(row["metrics"]),
        reason=row["reason"],
        mlflow_run_id=row["mlflow_run_id"],
        created_at=_maybe_at(row["created_at"]),
        activated_at=_maybe_at(row["activated_at"]),
    )


def job(row: sqlite3.Row) -> TrainingJob:
    return TrainingJob(
        id=row["id"],
        target_user_id=row["target_user_id"],
        requested_by=row["requested_by"],
        status=JobStatus(row["status"]),
        progress=json.loads(row["progress"]),
        result=json.loads(row["result"]),
        error=row["error"],
        log=row["log"],
        created_at=_at(row["created_at"]),
        started_at=_maybe_at(row["started_at"]),
        finished_at=_maybe_at(row["finished_at"]),
    )


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _maybe_at(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def plain(value: Any) -> Any:
    """A record as JSON-able data: datetimes as ISO text, enums as their strings."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value
