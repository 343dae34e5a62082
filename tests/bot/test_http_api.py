"""The HTTP API over a real uvicorn server on 127.0.0.1: the official `openai` client for chat,
httpx for the rest. Real Store (tmp SQLite), FakeEngine, FakeLearner, real ChatService."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from bot.http_api import create_app, serve, serving
from bot.service import ChatService
from model.fake import FakeEngine
from model.interface import AdapterSpec
from storage.models import (
    AdapterScope,
    AdapterStatus,
    AdapterVersion,
    CorrectionStatus,
    JobStatus,
    Rating,
    Role,
)
from storage.store import Store

try:
    from tests.bot.fakes import FakeLearner
except ModuleNotFoundError:  # pytest started without the repository root on sys.path
    from fakes import FakeLearner  # type: ignore[no-redef]

ADMIN_TOKEN = "s3cret-admin-token"
QUESTION = "Capital of France?"
BASE_ANSWER = "Paris is the capital of France."
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def make_app(
    service: ChatService,
    store: Store,
    engine: FakeEngine,
    learner: FakeLearner,
    *,
    admin_token: str | None = ADMIN_TOKEN,
    max_body_bytes: int = 256 * 1024,
) -> FastAPI:
    return create_app(
        service, store, engine, learner, admin_token=admin_token, model_name=engine.model_name,
        max_body_bytes=max_body_bytes,
    )  # fmt: skip


@pytest.fixture
async def base_url(
    service: ChatService, store: Store, engine: FakeEngine, learner: FakeLearner
) -> AsyncIterator[str]:
    """A live server; reuse `serving(create_app(...))` with any engine and learner."""
    async with serving(make_app(service, store, engine, learner)) as url:
        yield url


@pytest.fixture
async def http(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        yield client


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=10
    ) as oai:
        yield oai


async def ask(
    http: httpx.AsyncClient, user: str, question: str = QUESTION, **extra: Any
) -> dict[str, Any]:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": question}]}
    response = await http.post("/v1/chat/completions", json={**body, "user": user, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def assert_error(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    """Every error: the status, OpenAI's error shape, and a message that says what is wrong."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["message"] and isinstance(error["type"], str)
    for word in words:
        assert word.lower() in error["message"].lower(), (word, error["message"])
    return error


# --- chat ----------------------------------------------------------------------------------------


async def test_chat_with_openai_client_stores_the_turns(
    client: openai.AsyncOpenAI, store: Store, engine: FakeEngine
) -> None:
    completion = await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": QUESTION}], user="alice"
    )
    assert completion.choices[0].message.content == BASE_ANSWER
    assert completion.choices[0].finish_reason == "stop"
    assert completion.system_fingerprint == "ouro-base"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(BASE_ANSWER.split())
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    extra = completion.model_extra or {}
    assert extra["ouro"] == {"message_id": completion.id, "adapter_version": None}

    match = re.fullmatch(r"msg-(\d+)", completion.id)
    assert match, completion.id
    stored = await store.get_message(int(match.group(1)))
    assert stored is not None and stored.role == Role.ASSISTANT
    assert stored.content == BASE_ANSWER and stored.platform == "api"
    user = await store.find_user("api", "alice")
    assert user is not None and stored.user_id == user.id
    assert engine.requests[-1].user_key == str(user.id)


async def test_stream_with_openai_client(client: openai.AsyncOpenAI, store: Store) -> None:
    stream = await client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": QUESTION}],
        user="alice",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == BASE_ANSWER
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    ouro = (finals[0].model_extra or {})["ouro"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(BASE_ANSWER.split())
    stored = await store.get_message(int(ouro["message_id"].removeprefix("msg-")))
    assert stored is not None and stored.content == BASE_ANSWER


async def test_stream_sse_wire_format_ends_with_done(http: httpx.AsyncClient) -> None:
    body = {"messages": [{"role": "user", "content": QUESTION}], "stream": True, "user": "raw"}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.aiter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in lines[:-1]]
    assert {p["object"] for p in payloads} == {"chat.completion.chunk"}


async def test_personal_adapter_answers_only_its_user(
    client: openai.AsyncOpenAI, http: httpx.AsyncClient, store: Store, engine: FakeEngine
) -> None:
    await ask(http, "alice")
    await ask(http, "bob")
    alice = await store.find_user("api", "alice")
    assert alice is not None
    engine.teach("alice-v1", {QUESTION: "Paris, of course."})
    await engine.activate(AdapterSpec("alice-v1", "/adapters/alice-v1", owner=str(alice.id)))

    mine = await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": QUESTION}], user="alice"
    )
    theirs = await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": QUESTION}], user="bob"
    )
    assert mine.choices[0].message.content == "Paris, of course."
    assert mine.system_fingerprint == "ouro-alice-v1"
    assert (mine.model_extra or {})["ouro"]["adapter_version"] == "alice-v1"
    assert theirs.choices[0].message.content == BASE_ANSWER
    assert theirs.system_fingerprint == "ouro-base"
    stored = await store.get_message(int(mine.id.removeprefix("msg-")))
    assert stored is not None and stored.adapter_version == "alice-v1"

    models = (await http.get("/v1/models", params={"user": "alice"})).json()["data"]
    assert [m["id"] for m in models] == ["fake-model", "ouro:alice-v1"]
    assert [m.id async for m in client.models.list()] == ["fake-model"]


async def test_max_tokens_temperature_and_missing_user(
    client: openai.AsyncOpenAI, store: Store, engine: FakeEngine
) -> None:
    completion = await client.chat.completions.create(
        model="fake-model",
        messages=[
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
        ],
        max_tokens=2,
        temperature=0.7,
    )
    assert completion.choices[0].message.content == "Paris is"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 2
    request = engine.requests[-1]
    assert request.sampling.max_new_tokens == 2
    assert request.sampling.temperature == 0.7
    assert request.messages[0].content == "Be terse."
    assert await store.find_user("api", "anonymous") is not None

    await client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": QUESTION}],
        max_completion_tokens=10_000,
    )
    assert engine.requests[-1].sampling.max_new_tokens == 50  # the server's limit


async def test_chat_refusals_are_clear_4xx(
    client: openai.AsyncOpenAI, http: httpx.AsyncClient, engine: FakeEngine
) -> None:
    messages: Any = [{"role": "user", "content": QUESTION}]
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        await client.chat.completions.create(model="fake-model", messages=messages, n=2)
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        await client.chat.completions.create(model="gpt-4o", messages=messages)

    url = "/v1/chat/completions"
    assistant_last = {"messages": [*messages, {"role": "assistant", "content": "Hm"}]}
    assert_error(await http.post(url, json=assistant_last), 400, "last message")
    too_long = {"messages": [{"role": "user", "content": "x" * 4001}]}
    error = assert_error(await http.post(url, json=too_long), 400, "4001", "4000")
    assert error["param"] == "messages[0].content"
    assert_error(await http.post(url, json={"messages": [{"role": "user", "content": " "}]}), 400)
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    assert_error(await http.post(url, json=image), 422, "messages.0.content")
    tool = {"messages": [{"role": "tool", "content": "x"}]}
    assert_error(await http.post(url, json=tool), 422, "role")
    assert_error(await http.post(url, json={"messages": []}), 422, "messages")
    assert len(engine.requests) == 0  # nothing reached the model


async def test_rate_limit_is_429_with_retry_after(http: httpx.AsyncClient) -> None:
    body = {"messages": [{"role": "user", "content": QUESTION}], "user": "spammer"}
    for _ in range(12):  # the fixture's limit per minute
        assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
    response = await http.post("/v1/chat/completions", json=body)
    assert_error(response, 429, "too fast")
    assert int(response.headers["retry-after"]) >= 1


async def test_engine_failure_is_a_500_not_an_apology(
    http: httpx.AsyncClient, engine: FakeEngine, store: Store
) -> None:
    engine.fail_with = RuntimeError("CUDA fell over")
    body = {"messages": [{"role": "user", "content": QUESTION}], "user": "carol"}
    assert_error(await http.post("/v1/chat/completions", json=body), 500, "model failed")
    streamed = await http.post("/v1/chat/completions", json={**body, "stream": True})
    assert_error(streamed, 500, "model failed")
    user = await store.find_user("api", "carol")
    assert user is not None
    stored = await store.recent_messages(user.id, "api", "api", 10)
    assert all(m.role == Role.USER for m in stored)  # no apology stored as an answer
    engine.fail_with = None
    assert (await http.post("/v1/chat/completions", json=body)).status_code == 200


async def test_client_disconnect_cancels_the_stream(
    http: httpx.AsyncClient, engine: FakeEngine, store: Store
) -> None:
    engine.answers["long?"] = " ".join(f"word{i}" for i in range(200))
    engine.delay = 0.01
    body = {"messages": [{"role": "user", "content": "long?"}], "stream": True, "user": "dave"}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if "word3" in line:
                break
    user = await store.find_user("api", "dave")
    assert user is not None
    for _ in range(200):
        answer = await store.last_bot_message(user.id, "api", "api")
        if answer is not None:
            break
        await asyncio.sleep(0.02)
    assert answer is not None and answer.content.startswith("word0")
    assert "word199" not in answer.content  # stopped early, partial answer kept


# --- corrections and feedback ------------------------------------------------------------------


async def test_correction_is_stored_and_201(http: httpx.AsyncClient, store: Store) -> None:
    answer = await ask(http, "alice")
    response = await http.post(
        "/v1/corrections",
        json={"user": "alice", "message_id": answer["id"], "correction": " Paris, of course. "},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "pending" and body["message_id"] == answer["id"]
    correction = await store.get_correction(body["id"])
    assert correction is not None
    assert correction.corrected_answer == "Paris, of course."
    assert correction.original_answer == BASE_ANSWER
    assert correction.status == CorrectionStatus.PENDING
    assert correction.question == QUESTION
    # the bare integer and its string form are accepted too
    number = int(answer["id"].removeprefix("msg-"))
    for raw in (number, str(number)):
        again = await http.post(
            "/v1/corrections", json={"user": "alice", "message_id": raw, "correction": "Paris!"}
        )
        assert again.status_code == 201, again.text


async def test_correction_refusals(http: httpx.AsyncClient, store: Store) -> None:
    answer = await ask(http, "alice")
    mid = answer["id"]
    url = "/v1/corrections"

    def body(**kw: Any) -> dict[str, Any]:
        return {"user": "alice", "message_id": mid, "correction": "Paris.", **kw}

    error = assert_error(await http.post(url, json=body(message_id="msg-99999")), 404, "msg-99999")
    assert error["code"] == "message_not_found"
    assert_error(await http.post(url, json=body(user="bob")), 403, "another user")
    assert_error(await http.post(url, json=body(user=None)), 403)  # anonymous is someone else
    user_turn = int(mid.removeprefix("msg-")) - 1
    assert_error(await http.post(url, json=body(message_id=user_turn)), 422, "user message")
    assert_error(await http.post(url, json=body(correction="  ")), 422, "empty")
    assert_error(await http.post(url, json=body(correction="x" * 2001)), 422, "2001", "2000")
    assert_error(await http.post(url, json=body(correction=BASE_ANSWER)), 422, "same")
    assert_error(await http.post(url, json=body(message_id="banana")), 422, "msg-42")
    assert_error(await http.post(url, json=body(message_id=-3)), 422)
    assert_error(await http.post(url, json=body(extra=1)), 422, "extra")
    assert_error(await http.post(url, json={"user": "alice"}), 422, "message_id", "correction")
    assert await store.list_corrections() == []
    assert await store.find_user("api", "bob") is None  # refusals create nobody


async def test_feedback(http: httpx.AsyncClient, store: Store) -> None:
    answer = await ask(http, "alice")
    url = "/v1/feedback"
    response = await http.post(
        url, json={"user": "alice", "message_id": answer["id"], "rating": "down"}
    )
    assert response.status_code == 200, response.text
    assert "correct" in response.json()["detail"]
    up = await http.post(url, json={"user": "alice", "message_id": answer["id"], "rating": "up"})
    assert up.status_code == 200
    stored = await store.list_feedback()
    assert [(f.message_id, f.rating) for f in stored] == [
        (int(answer["id"].removeprefix("msg-")), Rating.UP)
    ]
    bad = {"user": "alice", "message_id": answer["id"], "rating": "meh"}
    assert_error(await http.post(url, json=bad), 422, "rating")
    theirs = {"user": "bob", "message_id": answer["id"], "rating": "up"}
    assert_error(await http.post(url, json=theirs), 403)


# --- admin ---------------------------------------------------------------------------------------


async def test_admin_auth(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/adapters")
    assert_error(response, 401, "authorization")
    assert response.headers["www-authenticate"] == "Bearer"
    for header in ("Basic abc", "Bearer", "token s3cret-admin-token", "Bearer a b"):
        assert_error(await http.get("/v1/adapters", headers={"Authorization": header}), 401)
    wrong = {"Authorization": "Bearer nope"}
    assert_error(await http.post("/v1/retrain", json={}, headers=wrong), 403, "wrong")
    assert (await http.get("/v1/adapters", headers=ADMIN)).status_code == 200


async def test_admin_disabled_without_token(
    service: ChatService, store: Store, engine: FakeEngine, learner: FakeLearner
) -> None:
    app = make_app(service, store, engine, learner, admin_token=None)
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        admin_calls = (("POST", "/v1/retrain"), ("GET", "/v1/jobs/1"), ("GET", "/v1/adapters"))
        for method, path in admin_calls:
            response = await http.request(method, path, headers=ADMIN)
            assert_error(response, 403, "disabled", "OURO_ADMIN_TOKEN")
    assert learner.submitted == []


async def test_retrain_202_and_job_polling(
    http: httpx.AsyncClient, store: Store, learner: FakeLearner
) -> None:
    await ask(http, "alice")
    alice = await store.find_user("api", "alice")
    assert alice is not None
    response = await http.post("/v1/retrain", json={"user": "alice"}, headers=ADMIN)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert response.headers["location"] == f"/v1/jobs/{job_id}"
    assert learner.submitted == [(alice.id, None)]

    queued = (await http.get(f"/v1/jobs/{job_id}", headers=ADMIN)).json()
    assert queued["status"] == "queued" and queued["target_user_id"] == alice.id
    assert queued["gate"] is None

    # the learner works the job
    claimed = await store.claim_next_job()
    assert claimed is not None and claimed.id == job_id
    await store.update_job(job_id, progress={"step": 3, "total": 10}, log_line="step 3/10")
    running = (await http.get(f"/v1/jobs/{job_id}", headers=ADMIN)).json()
    assert running["status"] == "running" and running["progress"]["step"] == 3
    assert "step 3/10" in running["log_tail"]
    result = {  # as learner.job writes it: metrics per candidate version
        "metrics": {"alice-v1": {"uptake": 1.0, "retention": 1.0}},
        "gate": {"promoted": ["alice-v1"], "rejected": [], "reasons": {}},
        "promoted": ["alice-v1"],
        "rejected": [],
    }
    await store.finish_job(job_id, JobStatus.SUCCEEDED, result=result)
    done = (await http.get(f"/v1/jobs/{job_id}", headers=ADMIN)).json()
    assert done["status"] == "succeeded" and done["finished_at"]
    assert done["metrics"] == {"alice-v1": {"uptake": 1.0, "retention": 1.0}}
    assert done["gate"] == {"promoted": ["alice-v1"], "rejected": [], "reasons": {}}

    everyone = await http.post("/v1/retrain", headers=ADMIN)  # no body: everyone
    assert everyone.status_code == 202
    assert learner.submitted[-1] == (None, None)
    assert_error(await http.post("/v1/retrain", json={"user": "nobody"}, headers=ADMIN), 404)
    assert_error(await http.get("/v1/jobs/9999", headers=ADMIN), 404, "no job")
    assert_error(await http.get("/v1/jobs/abc", headers=ADMIN), 422, "job_id")


async def test_adapters_and_rollback(
    http: httpx.AsyncClient, store: Store, learner: FakeLearner
) -> None:
    await ask(http, "alice")
    alice = await store.find_user("api", "alice")
    assert alice is not None
    for version, parent in (("alice-v1", None), ("alice-v2", "alice-v1")):
        await store.add_adapter(
            AdapterVersion(
                version, AdapterScope.PERSONAL, alice.id, f"/a/{version}", parent,
                AdapterStatus.ACTIVE, metrics={"uptake": 1.0},
            )
        )  # fmt: skip
    listed = (await http.get("/v1/adapters", params={"user": "alice"}, headers=ADMIN)).json()
    assert [(a["version"], a["status"]) for a in listed["data"]] == [
        ("alice-v2", "active"),
        ("alice-v1", "retired"),
    ]
    shared = (await http.get("/v1/adapters", params={"user": "shared"}, headers=ADMIN)).json()
    assert shared["data"] == []
    by_id = await http.get("/v1/adapters", params={"user": f"#{alice.id}"}, headers=ADMIN)
    assert len(by_id.json()["data"]) == 2

    response = await http.post("/v1/rollback", json={"user": "alice"}, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json() == {"owner": "alice", "active_version": "alice-v1"}
    assert learner.rolled_back == [alice.id]
    active = await store.active_adapter(AdapterScope.PERSONAL, alice.id)
    assert active is not None and active.version == "alice-v1"

    base = await http.post("/v1/rollback", headers=ADMIN)
    assert base.json() == {"owner": "shared", "active_version": None}
    assert_error(await http.post("/v1/rollback", json={"user": "#²"}, headers=ADMIN), 404)
    assert_error(await http.get("/v1/adapters", params={"user": "zed"}, headers=ADMIN), 404)


# --- ops, docs, hostile input ------------------------------------------------------------------


def parse_prometheus(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A strict little parser: every line is a comment or `name{labels} value`."""
    samples = {}
    sample = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (-?[0-9.e+]+|NaN)$")
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        match = sample.match(line)
        assert match, f"not Prometheus text: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples


async def test_healthz_and_metrics(http: httpx.AsyncClient, engine: FakeEngine) -> None:
    assert (await http.get("/healthz")).json() == {"status": "ok", "model": "fake-model"}
    await ask(http, "alice")
    await engine.activate(AdapterSpec("shared-v1", "/a/shared-v1", owner=None))
    await http.get("/nope")
    response = await http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse_prometheus(response.text)
    chat = frozenset({("endpoint", "/v1/chat/completions"), ("method", "POST"), ("status", "200")})
    assert samples[("ouro_http_requests_total", chat)] == 1
    missing = frozenset({("endpoint", "unmatched"), ("method", "GET"), ("status", "404")})
    assert samples[("ouro_http_requests_total", missing)] == 1
    words = len(BASE_ANSWER.split())
    assert samples[("ouro_tokens_generated_total", frozenset())] == words
    assert samples[("ouro_api_completion_tokens_total", frozenset())] == words
    assert samples[("ouro_batch_decode_steps_total", frozenset({("batch_size", "1")}))] == words
    active = frozenset({("owner", "shared"), ("version", "shared-v1")})
    assert samples[("ouro_active_adapter_info", active)] == 1
    assert samples[("ouro_training_jobs", frozenset({("status", "queued")}))] == 0
    assert ("ouro_learner_notified", frozenset()) in samples


async def test_docs_and_openapi(http: httpx.AsyncClient) -> None:
    docs = await http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = (await http.get("/openapi.json")).json()
    expected = {
        "/v1/chat/completions", "/v1/models", "/v1/corrections", "/v1/feedback", "/v1/retrain",
        "/v1/jobs/{job_id}", "/v1/adapters", "/v1/rollback", "/healthz", "/metrics",
    }  # fmt: skip
    assert expected <= set(spec["paths"])
    for path in expected:
        for operation in spec["paths"][path].values():
            assert operation.get("summary"), path
            assert (
                "200" in operation["responses"]
                or "201" in operation["responses"]
                or ("202" in operation["responses"])
            )
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "413", "422", "429"} <= set(chat["responses"])
    assert spec["components"]["schemas"]["ChatCompletionRequest"]["examples"]
    assert spec["components"]["schemas"]["CorrectionRequest"]["examples"]
    assert {"401", "403"} <= set(spec["paths"]["/v1/retrain"]["post"]["responses"])


async def test_hostile_bodies_get_clear_4xx(http: httpx.AsyncClient, store: Store) -> None:
    url = "/v1/chat/completions"
    json_header = {"content-type": "application/json"}
    error = assert_error(await http.post(url, content=b'{"messages": [', headers=json_header), 400)
    assert error["code"] == "invalid_json" and "json" in error["message"].lower()
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * 1_000_000}]})
    assert_error(await http.post(url, content=huge, headers=json_header), 413, "262144")

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * 65536

    assert_error(await http.post(url, content=chunked(), headers=json_header), 413)
    wrong = {"messages": [{"role": "user", "content": 5}], "max_tokens": "many"}
    error = assert_error(await http.post(url, json=wrong), 422, "messages.0.content", "max_tokens")
    assert_error(await http.post(url, json=[1, 2]), 422)
    assert_error(await http.post(url, json={"messages": "hi"}), 422, "messages")
    bad_temp = {"messages": [{"role": "user", "content": "hi"}], "temperature": 9}
    assert_error(await http.post(url, json=bad_temp), 422, "temperature")
    assert_error(await http.post(url, content=b"\xff\xfe", headers=json_header), 400)
    assert_error(await http.post("/v1/corrections", content=b"null", headers=json_header), 422)
    odd = rb'{"messages": [{"role": "user", "content": "a\u0000b\ud800"}], "user": "x\udfff"}'
    assert (await http.post(url, content=odd, headers=json_header)).status_code < 500
    assert_error(await http.get("/v1/nothing"), 404, "/v1/nothing")
    assert_error(await http.delete("/v1/corrections"), 405)
    assert (await http.get("/healthz")).status_code == 200  # still serving


async def test_serve_runs_until_stop(
    service: ChatService, store: Store, engine: FakeEngine, learner: FakeLearner
) -> None:
    """`serve` (what `ouro serve` runs) answers in the caller's loop and ends when told to."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stop = asyncio.Event()
    app = make_app(service, store, engine, learner)
    task = asyncio.create_task(serve(app, "127.0.0.1", port, stop))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        for _ in range(200):
            try:
                response = await http.get("/healthz")
                break
            except httpx.ConnectError:
                await asyncio.sleep(0.02)
        assert response.status_code == 200
    stop.set()
    await asyncio.wait_for(task, timeout=10)
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as http:
            await http.get(f"http://127.0.0.1:{port}/healthz")
