"""Request and response bodies of the HTTP API: what /docs shows, with an example for each.

Chat bodies follow OpenAI's chat-completions format so the official clients work unchanged;
unknown request fields (tools, logprobs, penalties...) are accepted and ignored, as a
compatible server must. Everything else is Ouro's own and strict.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MESSAGE_ID_PATTERN = re.compile(r"^(?:msg-)?([0-9]{1,18})$")
USER_FIELD = Field(
    None,
    max_length=256,
    description="Who is talking: the API user's own id. Missing or blank: `anonymous`.",
    examples=["alice"],
)
MESSAGE_ID_FIELD = Field(
    description="The answer's id as the chat completion returned it (`msg-123`); "
    "`123` or the integer 123 are accepted too.",
    examples=["msg-42"],
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- errors -------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong and how to fix it, for a human.")
    type: str = Field(description="Error class, OpenAI style: `invalid_request_error`, ...")
    code: str | None = Field(None, description="A stable machine-readable reason.")
    param: str | None = Field(None, description="The request field at fault, when one is.")


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx answer."""

    error: ErrorDetail

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "message": "no message msg-999",
                        "type": "not_found_error",
                        "code": "message_not_found",
                        "param": "message_id",
                    }
                }
            ]
        }
    )


# --- chat ---------------------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str


class ChatMessageIn(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = Field(
        description="Text, or a list of text parts (joined). Images and audio are not supported."
    )
    name: str | None = None

    model_config = ConfigDict(extra="ignore")


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI chat-completions request. Stateless: `messages` is the whole conversation."""

    model: str | None = Field(
        None,
        max_length=200,
        description="The base model or an adapter id from GET /v1/models (optional). Routing is "
        "per user either way: the user's adapter when the question is in its scope, else the "
        "shared adapter when in scope, else the base model.",
    )
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=200)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(
        None, ge=1, description="Longest answer in tokens; clamped to the server's limit."
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens.")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy (repeatable).")
    n: int | None = Field(None, ge=1, description="Only 1 is supported.")
    user: str | None = USER_FIELD

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "model": "SmolLM2-135M-Instruct",
                    "messages": [{"role": "user", "content": "Who maintains the Ouro project?"}],
                    "user": "alice",
                    "max_tokens": 64,
                }
            ]
        },
    )


class ChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ChoiceMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class OuroInfo(BaseModel):
    message_id: str | None = Field(
        description="The stored answer's id: pass it to /v1/corrections and /v1/feedback."
    )
    adapter_version: str | None = Field(description="The adapter that answered; null: base model.")


class ChatCompletion(BaseModel):
    """OpenAI chat.completion; `id` is the stored answer's id (`msg-<n>`)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str = Field(description="`ouro-<adapter version>` or `ouro-base`.")
    choices: list[Choice]
    usage: Usage
    ouro: OuroInfo

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "msg-42",
                    "object": "chat.completion",
                    "created": 1767225600,
                    "model": "SmolLM2-135M-Instruct",
                    "system_fingerprint": "ouro-u7-20260101-0001",
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": "Ouro is maintained by the Loop Collective.",
                            },
                            "finish_reason": "stop",
                            "logprobs": None,
                        }
                    ],
                    "usage": {"prompt_tokens": 31, "completion_tokens": 9, "total_tokens": 40},
                    "ouro": {"message_id": "msg-42", "adapter_version": "u7-20260101-0001"},
                }
            ]
        }
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    ouro: dict[str, Any] = Field(default_factory=dict, description="scope, owner, version")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "object": "list",
                    "data": [
                        {
                            "id": "SmolLM2-135M-Instruct",
                            "object": "model",
                            "created": 1767225600,
                            "owned_by": "ouro",
                            "ouro": {"kind": "base"},
                        },
                        {
                            "id": "ouro:shared-20260101-0001",
                            "object": "model",
                            "created": 1767225600,
                            "owned_by": "ouro",
                            "ouro": {"kind": "adapter", "scope": "shared"},
                        },
                    ],
                }
            ]
        }
    )


# --- corrections and feedback --------------------------------------------------------------------


class CorrectionRequest(Strict):
    user: str | None = USER_FIELD
    message_id: int | str = MESSAGE_ID_FIELD
    correction: str = Field(description="The right answer, in full.", examples=["Paris."])

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user": "alice",
                    "message_id": "msg-42",
                    "correction": "Ouro is maintained by the Loop Collective.",
                }
            ]
        },
    )


class CorrectionCreated(BaseModel):
    id: int = Field(description="The correction's id.")
    status: str = Field(description="pending | accepted | rejected | trained")
    message_id: str
    scope: str
    detail: str = Field(description="When it will be learned, in words.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": 7,
                    "status": "pending",
                    "message_id": "msg-42",
                    "scope": "personal",
                    "detail": "Saved correction #7. It will be learned within the hour.",
                }
            ]
        }
    )


class FeedbackRequest(Strict):
    user: str | None = USER_FIELD
    message_id: int | str = MESSAGE_ID_FIELD
    rating: Literal["up", "down"]

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"user": "alice", "message_id": "msg-42", "rating": "down"}]
        },
    )


class FeedbackStored(BaseModel):
    message_id: str
    rating: Literal["up", "down"]
    detail: str

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "message_id": "msg-42",
                    "rating": "down",
                    "detail": "Thanks. Send the right answer to /v1/corrections to teach me.",
                }
            ]
        }
    )


# --- admin ----------------------------------------------------------------------------------------

TARGET_DESCRIPTION = (
    "An API user id, or `#<internal user id>` for a user of any platform. "
    "Missing: every user with new corrections and the shared adapter (retrain) / "
    "the shared adapter (rollback)."
)


class RetrainRequest(Strict):
    user: str | None = Field(None, max_length=256, description=TARGET_DESCRIPTION)

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"user": "alice"}]})


class JobAccepted(BaseModel):
    job_id: int
    status: str
    url: str = Field(description="Poll this for progress.")

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"job_id": 3, "status": "queued", "url": "/v1/jobs/3"}]}
    )


class JobOut(BaseModel):
    id: int
    status: str = Field(description="queued | running | succeeded | failed")
    target_user_id: int | None
    progress: dict[str, Any]
    metrics: dict[str, Any] = Field(
        description="Per candidate version: the gate's scores (uptake, generalisation, "
        "retention, perplexity), training steps and seconds, and whether training started "
        "from the live version's weights (resumed), once known."
    )
    gate: dict[str, Any] | None = Field(
        description="What the gate decided, once it has: promoted and rejected versions, and "
        "why each rejected one was refused."
    )
    result: dict[str, Any]
    error: str | None
    log_tail: str
    created_at: str
    started_at: str | None
    finished_at: str | None

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": 3,
                    "status": "succeeded",
                    "target_user_id": 7,
                    "progress": {"step": 40, "total": 40, "loss": 0.12},
                    "metrics": {
                        "u7-20260101-0001": {
                            "uptake": 1.0,
                            "generalisation": 1.0,
                            "retention": 1.0,
                            "perplexity": 6.1,
                            "steps": 4,
                            "train_seconds": 9.8,
                            "resumed": True,
                        }
                    },
                    "gate": {"promoted": ["u7-20260101-0001"], "rejected": [], "reasons": {}},
                    "result": {},
                    "error": None,
                    "log_tail": "step 40/40 · loss 0.12\npromoted u7-20260101-0001",
                    "created_at": "2026-01-01T00:00:00+00:00",
                    "started_at": "2026-01-01T00:00:01+00:00",
                    "finished_at": "2026-01-01T00:00:40+00:00",
                }
            ]
        }
    )


class AdapterOut(BaseModel):
    version: str
    scope: str
    owner_user_id: int | None
    status: str
    parent_version: str | None
    metrics: dict[str, Any]
    reason: str | None
    created_at: str | None
    activated_at: str | None


class AdapterList(BaseModel):
    data: list[AdapterOut]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "data": [
                        {
                            "version": "u7-20260101-0001",
                            "scope": "personal",
                            "owner_user_id": 7,
                            "status": "active",
                            "parent_version": None,
                            "metrics": {"uptake": 1.0, "retention": 1.0},
                            "reason": None,
                            "created_at": "2026-01-01T00:00:40+00:00",
                            "activated_at": "2026-01-01T00:00:41+00:00",
                        }
                    ]
                }
            ]
        }
    )


class RollbackRequest(Strict):
    user: str | None = Field(None, max_length=256, description=TARGET_DESCRIPTION)

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"user": "alice"}]})


class RollbackResult(BaseModel):
    owner: str = Field(description="`shared` or the user the adapter belongs to.")
    active_version: str | None = Field(description="What now answers; null: the base model.")

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"owner": "alice", "active_version": None}]}
    )


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"status": "ok", "model": "SmolLM2-135M-Instruct"}]}
    )


def parse_message_id(value: int | str) -> int | None:
    """`msg-123`, `"123"` or 123 -> 123; anything else -> None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 < value < 2**63 else None
    match = MESSAGE_ID_PATTERN.match(value.strip())
    if match is None:
        return None
    number = int(match.group(1))
    return number if number > 0 else None


def format_message_id(message_id: int | None) -> str | None:
    return None if message_id is None else f"msg-{message_id}"
