"""FakeEngine behaves like the real engine where other packages' tests depend on it."""

from __future__ import annotations

import asyncio

import pytest

from model.fake import FakeEngine
from model.interface import (
    AdapterLoadError,
    AdapterSpec,
    ChatMessage,
    GenerationRequest,
    SamplingParams,
)


def ask(question: str, user: str | None = None, max_new_tokens: int = 256) -> GenerationRequest:
    return GenerationRequest(
        messages=(ChatMessage("system", "be brief"), ChatMessage("user", question)),
        user_key=user,
        sampling=SamplingParams(max_new_tokens=max_new_tokens),
    )


async def test_canned_and_default_answers() -> None:
    engine = FakeEngine({"What is 2+2?": "4, obviously."})
    async with engine:
        assert engine.started
        result = await engine.generate(ask("  what is 2+2? "))
        assert result.text == "4, obviously."
        assert result.adapter_version is None
        assert result.finish_reason == "stop"
        assert result.completion_tokens == 2
        echo = await engine.generate(ask("hello there"))
        assert echo.text == "You said: hello there"
    assert engine.closed
    assert [r.messages[-1].content for r in engine.requests] == ["  what is 2+2? ", "hello there"]


async def test_default_callable_and_chunks() -> None:
    engine = FakeEngine(default=lambda q: q.upper() + " indeed")
    completion = engine.stream(ask("one two"))
    chunks = [c async for c in completion]
    assert chunks == ["ONE", " TWO", " indeed"]
    assert completion.finish_reason == "stop"


async def test_teach_activate_routes_only_owner_and_only_in_scope() -> None:
    engine = FakeEngine({"capital of france?": "Lyon."})
    engine.teach("u1-v1", {"Capital of France?": "Paris."})
    await engine.activate(AdapterSpec("u1-v1", "/nowhere/u1-v1", owner="1"))
    assert engine.active_versions() == {"1": "u1-v1"}

    mine = await engine.generate(ask("capital of france?", user="1"))
    assert (mine.text, mine.adapter_version) == ("Paris.", "u1-v1")
    other = await engine.generate(ask("capital of france?", user="2"))
    assert (other.text, other.adapter_version) == ("Lyon.", None)
    out_of_scope = await engine.generate(ask("hi", user="1"))
    assert out_of_scope.adapter_version is None

    engine.teach("shared-v1", {"hi": "Hello!"})
    await engine.activate(AdapterSpec("shared-v1", "/nowhere/shared", owner=None))
    assert (await engine.generate(ask("hi", user="2"))).text == "Hello!"
    assert engine.active_versions() == {"1": "u1-v1", "shared": "shared-v1"}

    await engine.deactivate("1")
    back = await engine.generate(ask("capital of france?", user="1"))
    assert (back.text, back.adapter_version) == ("Lyon.", None)
    assert engine.deactivations == ["1"]
    assert engine.stats().active_versions == {"shared": "shared-v1"}


async def test_broken_adapter_leaves_routing_unchanged() -> None:
    engine = FakeEngine()
    engine.teach("v1", {"q": "a1"})
    await engine.activate(AdapterSpec("v1", "/x", owner="1"))
    engine.broken.add("v2")
    with pytest.raises(AdapterLoadError):
        await engine.activate(AdapterSpec("v2", "/y", owner="1"))
    assert engine.active_versions() == {"1": "v1"}
    assert (await engine.generate(ask("q", user="1"))).text == "a1"


async def test_max_new_tokens_truncates() -> None:
    engine = FakeEngine({"q": "a b c d e"})
    result = await engine.generate(ask("q", max_new_tokens=2))
    assert result.text == "a b"
    assert result.finish_reason == "length"
    assert engine.stats().tokens_generated == 2


async def test_cancel_stops_stream() -> None:
    engine = FakeEngine({"q": "a b c d e f"}, delay=0.01)
    completion = engine.stream(ask("q"))
    got = []
    async for chunk in completion:
        got.append(chunk)
        if len(got) == 2:
            await completion.cancel()
    assert got == ["a", " b"]
    assert completion.finish_reason == "cancelled"


async def test_task_cancellation_marks_cancelled() -> None:
    engine = FakeEngine({"q": "a b c d e f"}, delay=0.05)
    completion = engine.stream(ask("q"))
    task = asyncio.create_task(completion.text())
    await asyncio.sleep(0.08)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert completion.finish_reason == "cancelled"


async def test_fail_with_raises_and_counts() -> None:
    engine = FakeEngine()
    engine.fail_with = RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        await engine.generate(ask("q"))
    assert engine.stats().requests_failed == 1
    engine.fail_with = None
    assert (await engine.generate(ask("q"))).text == "You said: q"
