"""Fuzz the HTTP API against its own OpenAPI document with schemathesis: no server errors,
responses match the documented statuses and schemas. FakeEngine, real Store, in-process ASGI."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from bot.http_api import create_app
from bot.service import ChatConfig, ChatService
from model.fake import FakeEngine
from storage.models import JobStatus, Role
from storage.store import Store

try:
    from tests.bot.fakes import FakeLearner
except ModuleNotFoundError:  # pytest started without the repository root on sys.path
    from fakes import FakeLearner  # type: ignore[no-redef]

ADMIN = {"Authorization": "Bearer fuzz-token"}
EXAMPLES = 20  # per operation: the whole file runs in well under a minute


def build_app(folder: Path) -> FastAPI:
    """The app over a store that its ASGI lifespan opens and seeds, in schemathesis' own loop."""
    store = Store(folder / "fuzz.db", synchronous="OFF")
    engine = FakeEngine({"hi": "Hello there."})
    learner = FakeLearner(store)
    config = ChatConfig(system_prompt="fuzz", max_new_tokens=8, rate_limit_per_minute=100_000)
    service = ChatService(store, engine, learner, config)
    app = create_app(
        service, store, engine, learner, admin_token="fuzz-token", model_name=engine.model_name
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with store:
            user = await store.get_or_create_user("api", "alice")
            question = await store.add_message(user.id, "api", "api", Role.USER, "hi")
            await store.add_message(
                user.id, "api", "api", Role.ASSISTANT, "Hello there.", reply_to_id=question.id
            )
            job = await store.enqueue_job(user.id, None)
            await store.finish_job(job.id, JobStatus.SUCCEEDED, result={"metrics": {"u": 1}})
            yield

    app.router.lifespan_context = lifespan
    return app


FOLDER = Path(tempfile.mkdtemp(prefix="ouro-fuzz-"))
atexit.register(shutil.rmtree, FOLDER, ignore_errors=True)  # runs after schemathesis' own exit
schema = schemathesis.openapi.from_asgi("/openapi.json", build_app(FOLDER))


@pytest.fixture(scope="module", autouse=True)
def _close_store() -> Iterator[None]:
    yield
    asgi.shutdown_lifespans()


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    # Valid-looking ids for absent rows are refused (404/403), which is correct behaviour; and
    # like most HTTP APIs we ignore unknown query parameters rather than refusing them.
    case.call_and_validate(
        headers=ADMIN, excluded_checks=[positive_data_acceptance, negative_data_rejection]
    )
