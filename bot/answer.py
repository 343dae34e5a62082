"""`Answer`: a streamed chat answer that stores itself once the stream ends.

The bot turn is stored when the stream ends however it ends: exhausted, cancelled through
`cancel()`, or abandoned by a consumer that stopped iterating (the generator's `finally`
runs when it is closed or collected). A failing engine yields an apology instead of a
traceback, and nothing is stored for it.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Self

from model.interface import Completion

if TYPE_CHECKING:
    from bot.service import Reply

__all__ = ["ENGINE_ERROR_TEXT", "Answer"]

log = logging.getLogger(__name__)

ENGINE_ERROR_TEXT = "Sorry, something went wrong while I was answering. Please try again."
CANCEL_WAIT_S = 10.0

OnFinish = Callable[["Answer"], Awaitable[int | None]]


class Answer:
    """Iterate once for text chunks; `text`, ids and `finish_reason` are final afterwards.

    `refusal` is set (and iteration yields nothing) when nothing was generated. Consumers
    that stop early should `await answer.cancel()` (or use `async with answer:`) so the
    engine frees the slot and the partial answer is stored at once.
    """

    def __init__(
        self,
        completion: Completion | None = None,
        *,
        refusal: Reply | None = None,
        user_message_id: int | None = None,
        on_finish: OnFinish | None = None,
    ) -> None:
        self.refusal = refusal
        self.text = ""
        self.message_id: int | None = None
        self.user_message_id = user_message_id
        self.adapter_version: str | None = None
        self.finish_reason: str | None = None
        self.error: BaseException | None = None  # the engine failure, if any
        self._completion = completion
        self._on_finish = on_finish
        self._started = False
        self._cancelled = False
        self._done = completion is None
        self._finished = asyncio.Event()
        self._lock = asyncio.Lock()
        self._gen: weakref.ref[AsyncGenerator[str, None]] | None = None
        if completion is None:
            self._finished.set()

    @classmethod
    def refused(cls, reply: Reply) -> Answer:
        return cls(refusal=reply)

    @property
    def done(self) -> bool:
        """True once the answer is final (and stored, when it is stored)."""
        return self._done and self._finished.is_set()

    def __aiter__(self) -> AsyncIterator[str]:
        if self._completion is None or self._done:
            return _nothing()
        if self._started:
            raise RuntimeError("an Answer can be iterated only once")
        self._started = True
        generator = self._run(self._completion)
        self._gen = weakref.ref(generator)
        return generator

    async def _run(self, completion: Completion) -> AsyncGenerator[str, None]:
        chunks = completion.__aiter__()
        exhausted = False
        try:
            try:
                async for chunk in chunks:
                    self.adapter_version = completion.adapter_version
                    self.text += chunk
                    yield chunk
                exhausted = True
            except Exception as error:  # the engine failed: apologise, store nothing
                log.exception("engine stream failed")
                self.error = error
                self.finish_reason = "error"
                exhausted = True
                yield ("\n\n" if self.text else "") + ENGINE_ERROR_TEXT
        finally:
            if not exhausted:
                self._cancelled = True
            await _close(chunks)
            await self._finish()

    async def wait(self) -> None:
        """Wait until the answer is final and stored (for consumers in another task)."""
        await self._finished.wait()

    async def cancel(self) -> None:
        """Stop generating; what was generated so far is stored (finish_reason "cancelled")."""
        if self._done or self._completion is None:
            return
        self._cancelled = True
        await self._completion.cancel()
        generator = self._gen() if self._gen is not None else None
        if generator is not None and getattr(generator, "ag_running", False):
            # Another task is inside the stream: the cancelled completion ends it soon.
            try:
                async with asyncio.timeout(CANCEL_WAIT_S):
                    await self.wait()
            except TimeoutError:
                log.warning("stream did not end %.0fs after cancel", CANCEL_WAIT_S)
        elif generator is not None:
            await generator.aclose()
        await self._finish()

    async def aclose(self) -> None:
        await self.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.cancel()

    async def _finish(self) -> None:
        """Record the outcome and store the bot turn, exactly once."""
        async with self._lock:
            if self._done:
                return
            self._done = True
            completion = self._completion
            assert completion is not None
            try:
                if self._cancelled and completion.finish_reason is None:
                    await completion.cancel()
            except Exception:
                log.exception("cancelling the completion failed")
            self.adapter_version = completion.adapter_version
            if self.finish_reason != "error":
                reason = completion.finish_reason
                self.finish_reason = "cancelled" if self._cancelled else (reason or "stop")
            stored = self.error is None and (self.text or not self._cancelled)
            if stored and self._on_finish is not None:
                # Shielded: a consumer cancelled mid-write (client hung up) must not lose the turn.
                store_task = asyncio.ensure_future(self._on_finish(self))
                try:
                    self.message_id = await asyncio.shield(store_task)
                except asyncio.CancelledError:
                    store_task.add_done_callback(self._stored_late)
                    raise
                except Exception:
                    log.exception("storing the bot turn failed")
            self._finished.set()

    def _stored_late(self, task: asyncio.Task[int | None]) -> None:
        if not task.cancelled() and task.exception() is None:
            self.message_id = task.result()
        elif not task.cancelled():
            log.error("storing the bot turn failed", exc_info=task.exception())
        self._finished.set()


async def _nothing() -> AsyncGenerator[str, None]:
    return
    yield  # pragma: no cover - makes this an async generator


async def _close(iterator: AsyncIterator[str]) -> None:
    """Close the engine's iterator now rather than whenever it is collected."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            log.exception("closing the engine stream failed")
