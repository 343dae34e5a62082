"""`ouro` — one entry point, one subcommand per job. Heavy imports happen inside the commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ouro.settings import Settings


class ConfigError(SystemExit):
    """A bad setting: one clear line, exit code 2, no traceback."""


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            problems.append(f"OURO_{field.upper()}: {err['msg']}")
        raise ConfigError(f"ouro: bad setting: {'; '.join(problems)}") from None


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in (
        "httpx",
        "httpcore",
        "discord.gateway",
        "alembic",
        "urllib3",
        "apscheduler",
        "mlflow",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _run(coro_factory: Callable[[Settings], Coroutine[Any, Any, int | None]]) -> int:
    settings = load_settings()
    try:
        return asyncio.run(coro_factory(settings)) or 0
    except KeyboardInterrupt:
        return 130


def cmd_run(args: argparse.Namespace) -> int:
    from ouro.app import run_bots

    return _run(lambda s: run_bots(s, console=args.console))


def cmd_serve(args: argparse.Namespace) -> int:
    from ouro.app import run_api

    return _run(lambda s: run_api(s, host=args.host, port=args.port))


def cmd_learner(args: argparse.Namespace) -> int:
    from ouro.app import run_learner_worker

    return _run(lambda s: run_learner_worker(s, once=args.once))


def cmd_retrain(args: argparse.Namespace) -> int:
    from ouro.app import retrain_once

    return _run(lambda s: retrain_once(s, user=args.user, platform=args.platform))


def cmd_rollback(args: argparse.Namespace) -> int:
    from ouro.app import rollback_once

    return _run(lambda s: rollback_once(s, user=args.user, platform=args.platform))


def cmd_export(args: argparse.Namespace) -> int:
    from ouro.app import export_user

    async def go(settings: Settings) -> int:
        data = await export_user(settings, user=args.user, platform=args.platform)
        text = json.dumps(data, indent=2, ensure_ascii=False, default=str)
        if args.output:
            Path(args.output).write_text(text + "\n", encoding="utf-8")
            print(f"wrote {args.output}", file=sys.stderr)
        else:
            print(text)
        return 0

    return _run(go)


def cmd_forget(args: argparse.Namespace) -> int:
    from ouro.app import forget_user

    if not args.yes:
        answer = input(f"Delete every message, correction and adapter of {args.user}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    return _run(lambda s: forget_user(s, user=args.user, platform=args.platform))


def cmd_bench(args: argparse.Namespace) -> int:
    from ouro.app import run_bench

    return _run(lambda s: run_bench(s, which=args.which, output=args.output, quick=args.quick))


def cmd_eval(args: argparse.Namespace) -> int:
    from ouro.app import run_eval

    try:
        counts = tuple(int(c) for c in args.counts.split(","))
    except ValueError:
        print(
            f"ouro eval: --counts takes numbers separated by commas, got {args.counts!r}",
            file=sys.stderr,
        )
        return 2
    return _run(
        lambda s: run_eval(
            s,
            counts=counts,
            output=args.output,
            groups=args.groups,
            sequential=args.sequential,
            first_group=args.from_group,
        )
    )


def _add_user_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--user",
        required=required,
        help="platform user id, @display name, or #internal id",
    )
    p.add_argument(
        "--platform",
        default=None,
        help="platform of --user (discord, telegram, console, api); not needed for #id",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ouro",
        description="Ouro, a self-healing chatbot. Settings come from OURO_* variables and .env.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run", help="start the bots (Discord/Telegram when configured, else console)"
    )
    p.add_argument(
        "--console",
        choices=["auto", "on", "off"],
        default=None,
        help="terminal chat: auto (when no platform token is set), on, off",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API only")
    p.add_argument("--host", default=None, help="bind address (default OURO_API_HOST)")
    p.add_argument("--port", type=int, default=None, help="port (default OURO_API_PORT)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "learner", help="run the standalone learner worker (takes jobs from the store)"
    )
    p.add_argument("--once", action="store_true", help="run queued jobs, then exit")
    p.set_defaults(func=cmd_learner)

    p = sub.add_parser("retrain", help="validate corrections and train now (all users, or one)")
    _add_user_args(p, required=False)
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser(
        "rollback", help="restore the previous adapter version (a user's, or shared)"
    )
    _add_user_args(p, required=False)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("export", help="dump everything stored about a user as JSON")
    _add_user_args(p, required=True)
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("forget", help="delete everything about a user, adapters included")
    _add_user_args(p, required=True)
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("bench", help="run the benchmarks and print a markdown report")
    p.add_argument(
        "which",
        nargs="*",
        default=["all"],
        help="any of: decode, concurrency, swap, adapters, live, all",
    )
    p.add_argument("--output", "-o", help="also write the report to this file")
    p.add_argument("--quick", action="store_true", help="smaller runs (smoke test)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="knowledge-editing eval: reliability, generalisation, locality")
    p.add_argument("--counts", default="1,10", help="sequential correction counts, e.g. 1,10,100")
    p.add_argument(
        "--groups", type=int, default=1, help="repeat on this many disjoint sets of facts"
    )
    p.add_argument(
        "--from-group",
        type=int,
        default=0,
        metavar="K",
        help="start at set K of --groups (to finish a long run that was stopped)",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="one correction at a time, each version starting from the last (as in a chat)",
    )
    p.add_argument("--output", "-o", help="also write the markdown table to this file")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _configure_logging(load_settings())  # a bad setting stops here, before any heavy import
        return int(args.func(args))
    except ConfigError as exc:
        print(exc.code, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
