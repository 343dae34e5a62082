"""Plain records the store hands out. Frozen dataclasses: callers never mutate rows in place."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class Role(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"


class CorrectionStatus(StrEnum):
    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    TRAINED = "trained"


class CorrectionScope(StrEnum):
    PERSONAL = "personal"
    SHARED_CANDIDATE = "shared_candidate"
    SHARED_APPROVED = "shared_approved"


class Rating(StrEnum):
    UP = "up"
    DOWN = "down"


class AdapterScope(StrEnum):
    PERSONAL = "personal"
    SHARED = "shared"


class AdapterStatus(StrEnum):
    CANDIDATE = "candidate"
    ACTIVE = "active"
    REJECTED = "rejected"
    RETIRED = "retired"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class User:
    id: int
    platform: str  # "discord" | "telegram" | "console" | "api"
    platform_user_id: str
    display_name: str | None
    is_admin: bool
    created_at: datetime


@dataclass(frozen=True)
class Message:
    """One conversation turn. Bot answers carry the adapter version that produced them."""

    id: int
    user_id: int
    platform: str
    chat_id: str
    role: Role
    content: str
    platform_message_id: str | None
    reply_to_id: int | None  # internal id of the message this one answers or replies to
    adapter_version: str | None
    in_context: bool  # False once the user ran /reset
    created_at: datetime


@dataclass(frozen=True)
class Correction:
    id: int
    user_id: int
    message_id: int | None  # the bot message being corrected (None after that message is gone)
    original_answer: str
    corrected_answer: str
    context: list[
        dict[str, str]
    ]  # [{"role", "content"}, ...] that produced the answer, ending with the user question
    rewordings: list[str]  # extra phrasings of the question, used for generalisation and scope
    status: CorrectionStatus
    reason: str | None  # why it was rejected (or other status note)
    scope: CorrectionScope
    approved_by: int | None
    adapter_version: str | None  # the version it was trained into
    created_at: datetime
    updated_at: datetime

    @property
    def question(self) -> str:
        """The user question that produced the corrected answer (last user turn of the context)."""
        for turn in reversed(self.context):
            if turn.get("role") == "user":
                return turn.get("content", "")
        return ""


@dataclass(frozen=True)
class Feedback:
    id: int
    user_id: int
    message_id: int
    rating: Rating
    created_at: datetime


@dataclass(frozen=True)
class AdapterVersion:
    version: str  # never reused
    scope: AdapterScope
    owner_id: int | None  # None for the shared adapter
    path: str
    parent_version: str | None
    status: AdapterStatus
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    mlflow_run_id: str | None = None
    created_at: datetime | None = None
    activated_at: datetime | None = None


@dataclass(frozen=True)
class TrainingJob:
    id: int
    target_user_id: int | None  # None: every user with new corrections, and the shared adapter
    requested_by: int | None  # None: the scheduler
    status: JobStatus
    progress: dict[str, Any]
    result: dict[str, Any]
    error: str | None
    log: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class RetrainOutcome:
    """What a finished training job did; shared by the learner and the bots' admin commands."""

    job: TrainingJob
    promoted: list[AdapterVersion] = field(default_factory=list)  # versions that went live
    rejected: list[AdapterVersion] = field(default_factory=list)  # candidates the gate refused
    summary: str = ""  # one paragraph for the admin who asked
