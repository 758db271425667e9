"""``seatwatch check``: the configuration is valid and every dependency answers."""

from __future__ import annotations

import os
import pwd
from typing import TYPE_CHECKING

import httpx
import redis.exceptions

from daemon.commands.script_probe import exercise_scripts
from daemon.errors import StoreUnavailable, error_name
from daemon.primitives.clients import REDIS_ERRORS, RedisClients
from daemon.primitives.scripts import Scripts
from daemon.secret import redact_url
from daemon.store.migrations import pending_migrations
from daemon.store.pool import connect, dsn_warnings, server_version

if TYPE_CHECKING:
    from pathlib import Path

    from daemon.settings.config import Settings

Result = tuple[str, bool, str]


async def run_checks(settings: Settings) -> list[Result]:
    """``seatwatch check``: (name, ok, detail) for configuration, Postgres, Redis, scraper and email."""
    results: list[Result] = [
        (
            "configuration",
            True,
            f"valid; cron {settings.cron!r} in {settings.timezone}, email via {settings.email_transport}",
        )
    ]
    results.append(await _postgres(settings))
    results.append(await _redis(settings))
    results.append(await _scraper(settings))
    results.append(_email(settings))
    return results


async def _postgres(settings: Settings) -> Result:
    ok, detail = await _postgres_reached(settings)
    for warning in dsn_warnings(settings.database_url.reveal()):
        detail += f"\n      warning: {warning}"
    return ("postgres", ok, detail)


async def _postgres_reached(settings: Settings) -> tuple[bool, str]:
    try:
        conn = await connect(settings.database_url.reveal())
    except (StoreUnavailable, OSError) as exc:
        return (False, f"cannot connect to {redact_url(settings.database_url.reveal())}: {error_name(exc)}")
    except Exception as exc:
        return (False, f"{exc.__class__.__name__}: {exc}")
    try:
        version = await server_version(conn)
        pending = await pending_migrations(conn)
    finally:
        await conn.close()
    if pending:
        # Not a failure: `seatwatch run` applies them at start (and `seatwatch migrate` does it now).
        return (True, f"PostgreSQL {version}; to apply at start: {', '.join(pending)}")
    return (True, f"PostgreSQL {version}; migrations up to date")


async def _redis(settings: Settings) -> Result:
    clients = RedisClients(settings.redis_url.reveal())
    tried: list[str] = []
    try:
        client = clients.client("admin")
        await client.ping()
        info = await client.info("server")
        await Scripts(client).load(client)
        tried.append("")  # loaded: a refusal from here on is a script refused when it ran
        await exercise_scripts(settings, client, tried)
        return (
            "redis",
            True,
            f"Redis {info.get('redis_version', '?')}; {settings.redis_prefix}:* keys; each of the"
            f" {len(set(tried) - {''})} Lua scripts ran once on throwaway keys (removed)",
        )
    except redis.exceptions.ResponseError as exc:
        if not tried:
            return ("redis", False, f"a script does not load: {exc}")
        return ("redis", False, f"Redis refused the {tried[-1]} script when it ran: {exc}")
    except (*REDIS_ERRORS, OSError) as exc:
        return (
            "redis",
            False,
            f"cannot reach {redact_url(settings.redis_url.reveal())}: {error_name(exc)}",
        )
    finally:
        await clients.aclose()


async def _scraper(settings: Settings) -> Result:
    url = f"{settings.scraper_url.rstrip('/')}/health"
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(url)
    except httpx.HTTPError as exc:
        return ("scraper", False, f"cannot reach {redact_url(url)}: {exc.__class__.__name__}")
    if response.status_code != 200:
        return ("scraper", False, f"{redact_url(url)} answered {response.status_code}")
    return ("scraper", True, f"{redact_url(url)} answered 200")


def _email(settings: Settings) -> Result:
    if settings.email_transport == "file":
        assert settings.outbox_dir is not None
        return _outbox_folder(settings.outbox_dir)
    return (
        "email",
        True,
        f"Resend at {settings.resend_api_url} from {settings.from_email} (key set, not contacted)",
    )


def _outbox_folder(folder: Path, service_user: str = "seatwatch") -> Result:
    """Whether the daemon can write the file transport's folder. Creates nothing: run as root, a folder made
    here would be root's, and the daemon (the unit's user) could not write into it."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return ("email", False, f"file transport: {existing} is not a folder, so {folder} cannot be made")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(service_user)
        except KeyError:
            owner = None
        if owner is not None and existing == folder and existing.stat().st_uid != owner.pw_uid:
            return (
                "email",
                False,
                f"file transport: {folder} is not owned by {service_user}, the unit's user, which must write it"
                f" (chown -R {service_user}: {folder})",
            )
    elif not os.access(existing, os.W_OK | os.X_OK):
        return ("email", False, f"file transport: cannot write to {existing}")
    made = "" if existing == folder else " (made by the daemon at its first email)"
    return ("email", True, f"file transport into {folder}{made}")
