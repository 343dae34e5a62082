"""Shared fixtures for the bot tests: a real Store on a tmp SQLite file, the FakeEngine,
a FakeLearner and a ChatService wired from them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.service import Actor, ChatConfig, ChatService
from model.fake import FakeEngine
from storage.store import Store

try:
    from tests.bot.fakes import FakeLearner
except ModuleNotFoundError:  # pytest started without the repository root on sys.path
    from fakes import FakeLearner  # type: ignore[no-redef]

SYSTEM_PROMPT = "You are a test bot."


class FakeClock:
    """A monotonic clock the tests move by hand (rate-limit windows)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store(tmp_path / "ouro.db") as opened:
        yield opened


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine({"capital of france?": "Paris is the capital of France."})


@pytest.fixture
def learner(store: Store) -> FakeLearner:
    return FakeLearner(store)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def chat_config() -> ChatConfig:
    return ChatConfig(
        system_prompt=SYSTEM_PROMPT,
        history_turns=4,
        max_new_tokens=50,
        rate_limit_per_minute=12,
        max_message_chars=4000,
        correction_max_chars=2000,
        admin_ids={"telegram": frozenset({"999"}), "discord": frozenset({"42"})},
        console_user_is_admin=True,
    )


@pytest.fixture
def service(
    store: Store,
    engine: FakeEngine,
    learner: FakeLearner,
    chat_config: ChatConfig,
    clock: FakeClock,
) -> ChatService:
    return ChatService(store, engine, learner, chat_config, clock=clock)


@pytest.fixture
def alice() -> Actor:
    return Actor("telegram", "100", "chat-100", "alice")


@pytest.fixture
def bob() -> Actor:
    return Actor("telegram", "200", "chat-100", "bob")


@pytest.fixture
def admin() -> Actor:
    return Actor("telegram", "999", "chat-100", "root")
