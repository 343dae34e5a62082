"""Run the API with uvicorn inside an event loop someone else owns (the bots share it).

uvicorn's own signal capture is switched off: the composition root handles SIGINT/SIGTERM
once for every part and sets `stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _server(app: Any, sock: socket.socket) -> _EmbeddedServer:
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="off",
        access_log=False,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    return _EmbeddedServer(config)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


@contextlib.asynccontextmanager
async def serving(app: Any, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve `app` while the block runs; yields the base URL (port 0 picks a free port)."""
    sock = _bind(host, port)
    server = _server(app, sock)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # re-raises why it could not start
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        yield f"http://{shown}:{bound_port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


async def serve(app: Any, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve until `stop` is set, then finish in-flight requests (up to a grace period)."""
    async with serving(app, host, port) as url:
        log.info("HTTP API listening on %s", url)
        await stop.wait()
