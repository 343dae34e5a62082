"""A deterministic stand-in for the inference core, for other packages' tests (no torch).

Usage::

    engine = FakeEngine({"capital of france?": "Paris."}, delay=0.0)
    async with engine:
        r = await engine.generate(GenerationRequest((ChatMessage("user", "Capital of France?"),)))
        assert r.text == "Paris." and r.adapter_version is None

        engine.teach("u1-v1", {"capital of france?": "Paris, of course."})
        await engine.activate(AdapterSpec("u1-v1", "/adapters/u1-v1", owner="1"))
        # user "1" now gets "Paris, of course."; everyone else still gets "Paris."

Behaviour, mirroring `LocalEngine`:

- The question is the last user message; lookups are case-insensitive and ignore
  surrounding whitespace. Unknown questions get `default` (a string, or a function of the
  question); the default default echoes: ``"You said: <question>"``.
- Routing: the user's active version if it was taught this question (its "scope"), else the
  shared version (owner None) if it was taught it, else the base answers. The version used
  is on the `Completion` before the first chunk.
- Answers stream word by word (one chunk per word with its leading space); a chunk counts as
  one token, so `max_new_tokens` truncates with finish_reason "length". `delay` seconds are
  slept before every chunk (use it to test cancellation and concurrency).
- `activate` raises `AdapterLoadError` for versions listed in `broken` and leaves routing
  unchanged; it never touches the filesystem.
- Records: `requests` (every GenerationRequest, in order), `served` (request_id -> version),
  `activations` (every AdapterSpec accepted), `deactivations` (owners).
- `fail_with = SomeError(...)` makes the next streams raise it on the first iteration
  (counted in `stats().requests_failed`); set it back to None to recover.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Mapping

from model.interface import (
    AdapterLoadError,
    AdapterSpec,
    Completion,
    EngineStats,
    GenerationRequest,
    InferenceEngine,
)

__all__ = ["FakeCompletion", "FakeEngine"]


def _key(question: str) -> str:
    return " ".join(question.split()).casefold()


def last_user_message(request: GenerationRequest) -> str:
    """The question routing and canned answers key on."""
    for message in reversed(request.messages):
        if message.role == "user":
            return message.content
    return ""


def _owner_key(owner: str | None) -> str:
    return "shared" if owner is None else owner


class FakeCompletion(Completion):
    """Streams a precomputed answer chunk by chunk; cancellable at any point."""

    def __init__(
        self, engine: FakeEngine, request: GenerationRequest, answer: str, version: str | None
    ) -> None:
        self._engine = engine
        self._request = request
        self._chunks = re.findall(r"\s*\S+", answer) or ([answer] if answer else [])
        self._cancelled = False
        self._started = False
        self.adapter_version = version
        self.prompt_tokens = sum(len(m.content.split()) for m in request.messages)

    def __aiter__(self) -> AsyncIterator[str]:
        if self._started:
            raise RuntimeError("a Completion can be iterated only once")
        self._started = True
        return self._run()

    async def _run(self) -> AsyncIterator[str]:
        engine = self._engine
        if engine.fail_with is not None:
            engine._failed += 1
            raise engine.fail_with
        limit = self._request.sampling.max_new_tokens
        try:
            for i, chunk in enumerate(self._chunks):
                if self._cancelled:
                    self.finish_reason = "cancelled"
                    return
                if i >= limit:
                    self.finish_reason = "length"
                    return
                if engine.delay:
                    await asyncio.sleep(engine.delay)
                if self._cancelled:
                    self.finish_reason = "cancelled"
                    return
                self.completion_tokens += 1
                engine._tokens += 1
                yield chunk
            self.finish_reason = "stop"
        except (asyncio.CancelledError, GeneratorExit):
            self.finish_reason = "cancelled"
            raise
        finally:
            if self.finish_reason is None:
                self.finish_reason = "cancelled"

    async def cancel(self) -> None:
        self._cancelled = True
        if self.finish_reason is None and not self._started:
            self.finish_reason = "cancelled"


class FakeEngine(InferenceEngine):
    """Canned answers plus an in-memory adapter routing table; see the module docstring."""

    def __init__(
        self,
        answers: Mapping[str, str] | None = None,
        *,
        default: str | Callable[[str], str] | None = None,
        delay: float = 0.0,
        model_name: str = "fake-model",
    ) -> None:
        self.model_name = model_name
        self.answers: dict[str, str] = {_key(q): a for q, a in (answers or {}).items()}
        self.default = default
        self.delay = delay
        self.broken: set[str] = set()
        self.fail_with: BaseException | None = None
        self.learned: dict[str, dict[str, str]] = {}
        self.requests: list[GenerationRequest] = []
        self.served: dict[str, str | None] = {}
        self.activations: list[AdapterSpec] = []
        self.deactivations: list[str | None] = []
        self.started = False
        self.closed = False
        self._routes: dict[str | None, str] = {}
        self._failed = 0
        self._tokens = 0

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    def teach(self, version: str, answers: Mapping[str, str]) -> None:
        """What `version` answers differently from the base (its scope is exactly these keys)."""
        self.learned.setdefault(version, {}).update({_key(q): a for q, a in answers.items()})

    def base_answer(self, question: str) -> str:
        """The answer with no adapter applied."""
        key = _key(question)
        if key in self.answers:
            return self.answers[key]
        if callable(self.default):
            return self.default(question)
        if self.default is not None:
            return self.default
        return f"You said: {question.strip()}"

    def route(self, user_key: str | None, question: str) -> tuple[str | None, str]:
        """(version, answer) for a question, by the personal -> shared -> base rule."""
        key = _key(question)
        owners: list[str | None] = [user_key, None] if user_key is not None else [None]
        for owner in owners:
            version = self._routes.get(owner)
            if version is not None and key in self.learned.get(version, {}):
                return version, self.learned[version][key]
        return None, self.base_answer(question)

    def stream(self, request: GenerationRequest) -> Completion:
        self.requests.append(request)
        version, answer = self.route(request.user_key, last_user_message(request))
        self.served[request.request_id] = version
        return FakeCompletion(self, request, answer, version)

    async def activate(self, spec: AdapterSpec) -> None:
        if spec.version in self.broken:
            raise AdapterLoadError(f"adapter {spec.version} at {spec.path} is corrupt (fake)")
        self.learned.setdefault(spec.version, {})
        self._routes[spec.owner] = spec.version
        self.activations.append(spec)

    async def deactivate(self, owner: str | None) -> None:
        self._routes.pop(owner, None)
        self.deactivations.append(owner)

    def active_versions(self) -> dict[str, str]:
        return {_owner_key(owner): version for owner, version in self._routes.items()}

    def stats(self) -> EngineStats:
        return EngineStats(
            requests_total=len(self.requests),
            requests_failed=self._failed,
            tokens_generated=self._tokens,
            batch_sizes={1: self._tokens} if self._tokens else {},
            resident_adapters=len(set(self._routes.values())),
            active_versions=self.active_versions(),
        )
