"""The seam every platform and the learner talk to: no torch, no transformers here.

A second backend (a remote OpenAI-compatible server with runtime LoRA loading, e.g. vLLM)
implements the same `InferenceEngine` and nothing above it changes.
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    messages: tuple[ChatMessage, ...]
    user_key: str | None = None  # routing key (the store's user id as text); None: base/shared only
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class GenerationResult:
    text: str
    # the version that served the whole request, None for the base model
    adapter_version: str | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter version on disk, as the learner published it.

    `path` is a folder with `adapter_model.safetensors`, `adapter_config.json` and the
    scope files written by `model.scope.Scope.save`. `owner` is the routing key of the user
    it belongs to, or None for the shared adapter.
    """

    version: str
    path: str
    owner: str | None


@dataclass(frozen=True)
class EngineStats:
    requests_total: int
    requests_failed: int
    tokens_generated: int
    batch_sizes: dict[int, int]  # batch size -> number of decode steps run at that size
    resident_adapters: int
    active_versions: dict[str, str]  # owner key ("shared" for the shared adapter) -> version


class Completion(abc.ABC):
    """A streamed answer: iterate for text chunks; the attributes are final once iteration ends.

    `adapter_version` is known as soon as the first chunk arrives (routing happens at
    admission and never changes for the request's lifetime).
    """

    adapter_version: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: Literal["stop", "length", "cancelled"] | None = None

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[str]: ...

    @abc.abstractmethod
    async def cancel(self) -> None:
        """Stop generating and free the slot (user deleted the message, platform timeout)."""

    async def text(self) -> str:
        return "".join([chunk async for chunk in self])


class AdapterLoadError(Exception):
    """An adapter version could not be loaded (missing, corrupt, outside the adapter folder)."""


class InferenceEngine(abc.ABC):
    """One base model, many LoRA adapters, batched across users."""

    model_name: str = ""
    can_stream: bool = True

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load weights, start the decode worker."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Finish or cancel in-flight requests and release memory."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> Completion:
        """Admit the request (routing decided now) and stream its answer."""

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        completion = self.stream(request)
        text = await completion.text()
        return GenerationResult(
            text=text,
            adapter_version=completion.adapter_version,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            finish_reason=completion.finish_reason or "stop",
        )

    @abc.abstractmethod
    async def activate(self, spec: AdapterSpec) -> None:
        """Load `spec` beside the current version of its owner, then flip routing atomically.

        Raises AdapterLoadError when the files are missing or corrupt; routing is then unchanged.
        """

    @abc.abstractmethod
    async def deactivate(self, owner: str | None) -> None:
        """Route `owner` (None: the shared adapter) to nothing; in-flight requests finish first."""

    @abc.abstractmethod
    def active_versions(self) -> dict[str, str]:
        """Owner key ("shared" for the shared adapter) -> active version."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...
