"""The terminal adapter: chat with Ouro in a console, with every command.

Lines are read in a worker thread so the event loop (engine, learner, other bots) keeps
running while the user types; answers are printed as they stream.
"""

from __future__ import annotations

import asyncio
import getpass
import sys
import threading
from types import TracebackType
from typing import Self, TextIO

from bot.service import Actor, ChatService, Reply

__all__ = ["ConsoleBot"]

QUIT = frozenset({"/quit", "/exit", "/q"})
BANNER = """\
Ouro — a chatbot that learns from your corrections.
Type a message to chat. When an answer is wrong, type /correct <the right answer>.
Commands: /help, /status, /reset, /forget, /good, /bad{admin}.
/quit (or Ctrl-D) leaves.
"""


class ConsoleBot:
    """`async with ConsoleBot(service) as bot: await bot.run()`; ends on /quit or EOF."""

    def __init__(
        self,
        service: ChatService,
        *,
        input_stream: TextIO = sys.stdin,
        output: TextIO = sys.stdout,
        user_name: str | None = None,
        prompt: str = "you> ",
    ) -> None:
        self.service = service
        self.input, self.output, self.prompt = input_stream, output, prompt
        name = user_name or _login_name()
        self.actor = Actor("console", name, "console", name)
        self.running = False

    async def start(self) -> None:
        await self.service.user_for(self.actor)  # admin flag from config, before any command
        admin = ", /retrain, /rollback, /approve <id>" if self.service.is_admin(self.actor) else ""
        self._write(BANNER.format(admin=admin))

    async def close(self) -> None:
        self.running = False

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

    async def run(self) -> None:
        """Read, answer, repeat until /quit or end of input."""
        self.running = True
        while self.running:
            self._write(self.prompt)
            try:
                line = await self._readline()
            except (OSError, ValueError) as error:  # closed stream, undecodable input
                self._write(f"! cannot read input: {error}\n")
                break
            if not line:  # EOF
                self._write("\n")
                break
            text = line.strip()
            if not text:
                continue
            if text.casefold() in QUIT:
                break
            try:
                if text.startswith("/"):
                    await self._command(text)
                else:
                    await self._chat(text)
            except Exception as error:  # keep the session alive; say what went wrong
                self._write(f"! error: {error}\n")
        self.running = False
        self._write("Bye.\n")

    async def _chat(self, text: str) -> None:
        answer = await self.service.chat(self.actor, text)
        if answer.refusal is not None:
            self._show(answer.refusal)
            return
        self._write("ouro> ")
        try:
            async for chunk in answer:
                self._write(chunk)
        finally:
            await answer.cancel()  # no-op when finished; stores the partial answer otherwise
        self._write("\n")

    async def _command(self, line: str) -> None:
        async def progress(step: str) -> None:
            self._write(f"  … {step}\n")

        self._show(await self.service.handle_command(self.actor, line, progress))

    async def _readline(self) -> str:
        """readline in a daemon thread: unlike asyncio.to_thread, a Ctrl-C at the prompt
        does not leave shutdown waiting for a line that never comes."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()

        def read() -> None:
            try:
                line = self.input.readline()
            except BaseException as error:  # closed stream, decoding error
                loop.call_soon_threadsafe(_settle, future, None, error)
            else:
                loop.call_soon_threadsafe(_settle, future, line, None)

        threading.Thread(target=read, name="ouro-console-input", daemon=True).start()
        return await future

    def _show(self, reply: Reply) -> None:
        mark = "" if reply.ok else "! "
        self._write("".join(f"{mark}{line}\n" for line in reply.text.splitlines() or [""]))

    def _write(self, text: str) -> None:
        self.output.write(text)
        self.output.flush()


def _settle(future: asyncio.Future[str], line: str | None, error: BaseException | None) -> None:
    if future.done():  # the reader was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(line or "")


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "console"
