"""The ``seatwatch`` command line.

Exit codes: 0 success, 1 failure, 2 usage, 3 lock held elsewhere (``tick``), 78 configuration.
Output for people goes to stdout/stderr here and only here; the daemon itself logs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from daemon.errors import ConfigError, Exit, FatalStartError, StoreUnavailable, driver_error
from daemon.settings.config import NEEDS_ALL, NEEDS_DATABASE, NEEDS_REDIS, NEEDS_STORES, Needs, Settings
from daemon.settings.service_env import CREDENTIALS, ENV_FILE, UNIT_FILE

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence


class _Version(argparse.Action):
    """``--version``, worked out only when asked for (in a checkout it asks git for the commit)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from daemon.version import version

        print(f"seatwatch {version()}")
        parser.exit()


def _settings_options() -> argparse.ArgumentParser:
    """``--env-file FILE [--credentials DIR]``, which every command but ``demo`` takes (SPEC §3)."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group(
        "settings (default: the environment; when it names none and seatwatch is installed here,"
        f" the unit's own {ENV_FILE} and {CREDENTIALS})"
    )
    group.add_argument(
        "--env-file",
        type=Path,
        default=argparse.SUPPRESS,  # a nested command's parser must not reset what its parent parsed
        metavar="FILE",
        help="take the settings from this systemd EnvironmentFile, read as systemd reads it, instead of the"
        " environment (as the service sees them)",
    )
    group.add_argument(
        "--credentials",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="DIR",
        help=f"the folder the unit's LoadCredential= hands over (default {CREDENTIALS}; readable by root only)",
    )
    return options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seatwatch", description="Watch class sections and email students when a seat opens."
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version (with its commit) and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    settings = _settings_options()
    sub.add_parser("run", parents=[settings], help="the daemon (systemd ExecStart)")
    sub.add_parser("migrate", parents=[settings], help="apply the SQL migrations (idempotent)")
    check = sub.add_parser(
        "check", parents=[settings], help="validate configuration and reach Postgres, Redis and the scraper"
    )
    check.add_argument(
        "--unit",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"refuse what `run` under this unit would (its TimeoutStopSec; default {UNIT_FILE} when installed)",
    )
    tick = sub.add_parser("tick", parents=[settings], help="run one enqueue tick now, under the cron lock")
    tick.add_argument(
        "--group",
        choices=("even", "odd", "all"),
        default=None,
        help="which sections (default: the group of the current half hour, or all)",
    )
    status = sub.add_parser("status", parents=[settings], help="breaker, lock, queue, outbox, ticks and Redis commands")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    breaker = sub.add_parser("breaker", parents=[settings], help="operator overrides for the circuit breaker")
    breaker_sub = breaker.add_subparsers(dest="action", required=True, metavar="ACTION")
    breaker_sub.add_parser("reset", parents=[settings], help="close the breaker and zero its counts")
    lock = sub.add_parser("lock", parents=[settings], help="operator overrides for the cron lock")
    lock_sub = lock.add_subparsers(dest="action", required=True, metavar="ACTION")
    release = lock_sub.add_parser("release", parents=[settings], help="release the cron lock")
    release.add_argument("--force", action="store_true", required=True, help="whoever holds it")
    dlq = sub.add_parser("dlq", parents=[settings], help="inspect and replay dead-lettered jobs")
    dlq_sub = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    dlq_list = dlq_sub.add_parser("list", parents=[settings], help="show dead letters")
    dlq_list.add_argument("--count", type=int, default=100)
    dlq_list.add_argument("--json", action="store_true")
    requeue = dlq_sub.add_parser(
        "requeue", parents=[settings], help="put dead letters back on the queue (all, or these ids)"
    )
    requeue.add_argument("ids", nargs="*", metavar="ID")
    dlq_sub.add_parser("purge", parents=[settings], help="delete every dead letter")
    prune = sub.add_parser(
        "prune", parents=[settings], help="delete what the privacy policy says is kept no longer (see README)"
    )
    prune.add_argument("--dry-run", action="store_true", help="delete nothing; print what a prune would delete")
    demo = sub.add_parser("demo", help="the whole pipeline on this machine with nothing configured")
    demo.add_argument("--dir", default="seatwatch-demo", help="where the demo keeps its servers and outbox")
    demo.add_argument("--port", type=int, default=8080, help="health port (0 = any free port)")
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    return parser


def load_settings(
    needs: Needs, args: argparse.Namespace | None = None, *, timeout_stop_s: float | None = None
) -> Settings:
    """Settings for a command from where SPEC §3 says (``service_env``), exiting 78 with every problem listed
    when they are unusable. ``timeout_stop_s``: the unit's TimeoutStopSec, when the command checks against it."""
    from daemon.settings.service_env import command_environment

    env_file = getattr(args, "env_file", None)
    credentials = getattr(args, "credentials", None)
    try:
        env, notes = command_environment(os.environ, env_file, credentials)
        for note in notes:
            _complain(f"note: {note}", priority=5)
        return Settings.from_env(env, needs=needs, timeout_stop_s=timeout_stop_s)
    except ConfigError as exc:
        _complain(str(exc))
        raise SystemExit(Exit.CONFIG) from None


def _complain(message: str, *, priority: int = 3) -> None:
    """A message for the operator on stderr; under journald each line carries its syslog ``priority`` (3: err),
    so ``journalctl -p err`` shows why a start failed, not only systemd's "Failed with result 'exit-code'"."""
    from daemon.settings.logs import stdout_is_journal

    text = f"seatwatch: {message}"
    if stdout_is_journal(sys.stderr):
        text = "\n".join(f"<{priority}>{line}" for line in text.splitlines())
    print(text, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``seatwatch`` command: parse the arguments, run the command, return its exit status."""
    args = _parser().parse_args(argv)
    command: str = args.command
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": _run,
        "migrate": _migrate,
        "check": _check,
        "tick": _tick,
        "status": _status,
        "breaker": _breaker,
        "lock": _lock,
        "dlq": _dlq,
        "prune": _prune,
        "demo": _demo,
    }
    try:
        return handlers[command](args)
    except KeyboardInterrupt:
        return 130


def _async(fn: Callable[[], Awaitable[int]]) -> int:
    """Run an operator command; Redis or Postgres being away is a one-line failure, not a traceback."""
    import asyncpg
    import redis.exceptions

    from daemon.secret import redact_url

    try:
        return anyio.run(fn)
    except (
        StoreUnavailable,
        redis.exceptions.RedisError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        OSError,
    ) as exc:
        shown = driver_error(exc)
        _complain(f"{shown.__class__.__name__}: {redact_url(str(shown))}")
        return Exit.FAILURE


def _configure_logs(settings: Settings) -> None:
    from daemon.settings import logs
    from daemon.settings.config import secret_values

    logs.configure(fmt=settings.log_format, level=settings.log_level, secrets=secret_values(settings))


# -- commands --------------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    from daemon.runtime import systemd

    settings = load_settings(NEEDS_ALL, args, timeout_stop_s=systemd.timeout_stop_s())
    _configure_logs(settings)
    from daemon.runtime.supervisor import run_daemon

    return run_daemon(settings)


def _migrate(args: argparse.Namespace) -> int:
    settings = load_settings(NEEDS_DATABASE, args)
    _configure_logs(settings)
    from daemon.store.migrations import migrate
    from daemon.store.pool import connect

    async def go() -> int:
        conn = await connect(settings.database_url.reveal())
        try:
            applied = await migrate(conn)
        except FatalStartError as exc:  # a migration half in place: an operator must look
            print(f"seatwatch: {exc}", file=sys.stderr)
            return Exit.CONFIG
        finally:
            await conn.close()
        print("applied: " + ", ".join(applied) if applied else "nothing to do: every migration is applied")
        return Exit.OK

    return _async(go)


def _check(args: argparse.Namespace) -> int:
    from daemon.runtime import systemd
    from daemon.settings.service_env import installed

    # The same validation as `run`: under systemd its own TimeoutStopSec, else the unit file's.
    timeout_stop_s = systemd.timeout_stop_s()
    if timeout_stop_s is None:
        timeout_stop_s = systemd.unit_file_timeout_stop_s(args.unit or installed(UNIT_FILE))
    settings = load_settings(NEEDS_ALL, args, timeout_stop_s=timeout_stop_s)
    from daemon.commands.checks import run_checks

    results = anyio.run(run_checks, settings)
    width = max(len(name) for name, _, _ in results)
    for name, ok, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'} {name.ljust(width)}  {detail}")
    return Exit.OK if all(ok for _, ok, _ in results) else Exit.FAILURE


def _tick(args: argparse.Namespace) -> int:
    settings = load_settings(NEEDS_STORES, args)
    _configure_logs(settings)
    from daemon.commands.admin import tick_now

    return _async(lambda: tick_now(settings, args.group))


def _status(args: argparse.Namespace) -> int:
    settings = load_settings(NEEDS_STORES, args)
    from daemon.commands.admin import status

    return _async(lambda: status(settings, as_json=args.json))


def _breaker(args: argparse.Namespace) -> int:
    settings = load_settings(NEEDS_REDIS, args)
    from daemon.commands.admin import breaker_reset

    return _async(lambda: breaker_reset(settings))


def _lock(args: argparse.Namespace) -> int:
    settings = load_settings(NEEDS_REDIS, args)
    from daemon.commands.admin import lock_release

    return _async(lambda: lock_release(settings))


def _dlq(args: argparse.Namespace) -> int:
    settings = load_settings(NEEDS_REDIS, args)
    from daemon.commands import admin

    if args.action == "list":
        return _async(lambda: admin.dlq_list(settings, count=args.count, as_json=args.json))
    if args.action == "requeue":
        return _async(lambda: admin.dlq_requeue(settings, args.ids))
    return _async(lambda: admin.dlq_purge(settings))


def _prune(args: argparse.Namespace) -> int:
    settings = load_settings(NEEDS_DATABASE, args)
    _configure_logs(settings)
    from daemon.commands.prune import prune

    return _async(lambda: prune(settings, dry_run=args.dry_run))


def _demo(args: argparse.Namespace) -> int:
    from daemon.commands.demo import run_demo

    return run_demo(dir_=args.dir, port=args.port, duration_s=args.duration, env=dict(os.environ))
