"""Postgres: the asyncpg pool, the migrations, and typed calls to seatwatch's SQL functions.

Supabase's pooler runs in session mode on port 5432 (prepared statements are fine) and in transaction mode
on 6543, where a prepared statement may land on another server connection; there the statement cache is
off. Nothing here relies on session state across transactions: the migration lock is transaction-scoped.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import asyncpg

from daemon.detect import PreviousState

if TYPE_CHECKING:
    from collections.abc import Sequence

logger = logging.getLogger(__name__)

TRANSACTION_POOLER_PORT: Final = 6543

# Connection-level failures: Postgres is away, not wrong. Jobs that hit these are deferred, not failed.
CONNECTION_ERRORS: Final = (
    OSError,
    ConnectionError,
    TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InterfaceError,
)


def connect_options(dsn: str) -> dict[str, Any]:
    """asyncpg options for ``dsn``: no statement cache behind a transaction-mode pooler."""
    options: dict[str, Any] = {"dsn": dsn, "command_timeout": 60}
    try:
        port = urlsplit(dsn).port
    except ValueError:
        port = None
    if port == TRANSACTION_POOLER_PORT:
        options["statement_cache_size"] = 0
    return options


async def _reset(conn: asyncpg.Connection) -> None:
    """Ready a connection for its next user without a round trip when there is nothing to undo.

    asyncpg's default reset sends four statements on every release (advisory unlock, CLOSE, UNLISTEN,
    RESET ALL). seatwatch keeps no session state (its locks are transaction-scoped), so only a
    transaction left open by a cancellation needs rolling back.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool that opens lazily beyond ``min_size`` and recycles idle connections."""
    return await asyncpg.create_pool(
        **connect_options(dsn),
        min_size=min_size,
        max_size=max_size,
        max_inactive_connection_lifetime=300,
        reset=_reset,
    )


async def connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(**connect_options(dsn))


# -- migrations ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations() -> list[Migration]:
    """The numbered files of ``daemon/sql``, in order."""
    folder = resources.files("daemon") / "sql"
    found = [
        Migration(entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(found, key=lambda m: m.name)


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply every migration not yet recorded, in one transaction; return the names applied.

    A transaction-scoped advisory lock makes concurrent runs queue behind each other (and works through a
    transaction-mode pooler, where session locks would not); the second run then finds nothing to do.
    """
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('seatwatch:migrate', 0))")
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS seatwatch_migrations (
                name       text PRIMARY KEY,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {r["name"]: r["checksum"] for r in await conn.fetch("SELECT name, checksum FROM seatwatch_migrations")}
        for migration in migrations():
            if migration.name in done:
                if done[migration.name] != migration.checksum:
                    logger.warning("migration %s changed after it was applied; it is not run again", migration.name)
                continue
            logger.info("applying migration %s", migration.name)
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO seatwatch_migrations (name, checksum) VALUES ($1, $2)",
                migration.name,
                migration.checksum,
            )
            applied.append(migration.name)
    return applied


async def pending_migrations(conn: asyncpg.Connection) -> list[str]:
    """Names of migrations not applied yet (for `check` and start-up)."""
    exists = await conn.fetchval("SELECT to_regclass('seatwatch_migrations') IS NOT NULL")
    done: set[str] = set()
    if exists:
        done = {r["name"] for r in await conn.fetch("SELECT name FROM seatwatch_migrations")}
    return [m.name for m in migrations() if m.name not in done]


# -- typed calls -------------------------------------------------------------------------------------


async def sections_to_check(conn: asyncpg.Connection | asyncpg.Pool, group: str) -> list[tuple[str, str]]:
    """(term, class_nbr) of every watched section in ``group`` (even, odd or all)."""
    rows = await conn.fetch("SELECT term, class_nbr FROM seatwatch_sections_to_check($1)", group)
    return [(r["term"], r["class_nbr"]) for r in rows]


async def observe(conn: asyncpg.Connection, term: str, class_nbr: str, data: Sequence[Any]) -> PreviousState | None:
    """Lock the section, record the observation (and its class_states mirror), return the previous state.

    ``data`` is (subject, catalog_nbr, title, instructor, seats_available, seats_capacity,
    non_reserved_seats, location, meeting_times). Must run inside the caller's transaction.
    """
    row = await conn.fetchrow(
        "SELECT * FROM seatwatch_observe_v2($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        term,
        class_nbr,
        *data,
    )
    if row is None or row["prev_source"] is None:
        return None
    return PreviousState(
        source=row["prev_source"],
        instructor=row["prev_instructor"],
        seats_available=row["prev_seats_available"],
        non_reserved_seats=row["prev_non_reserved_seats"],
    )


@dataclass(frozen=True)
class Claim:
    """One notification this transaction claimed: exactly one email is owed for it."""

    watch_id: str
    user_id: str
    email: str
    notification_type: str


async def claim(
    conn: asyncpg.Connection, term: str, class_nbr: str, *, reset_seat: bool, types: Sequence[str]
) -> list[Claim]:
    """Reset seat claims if asked, then claim ``types`` for every eligible watcher of the section."""
    rows = await conn.fetch(
        "SELECT * FROM seatwatch_claim($1, $2, $3, $4::text[])", term, class_nbr, reset_seat, list(types)
    )
    return [Claim(str(r["watch_id"]), str(r["user_id"]), r["email"], r["notification_type"]) for r in rows]


async def watch_courses(conn: asyncpg.Connection, watch_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Each watch's own (subject, catalog_nbr), for emails whose scraped course code was unusable."""
    rows = await conn.fetch("SELECT id, subject, catalog_nbr FROM class_watches WHERE id = ANY($1::uuid[])", watch_ids)
    return {str(r["id"]): (r["subject"], r["catalog_nbr"]) for r in rows}


@dataclass(frozen=True)
class OutboxRow:
    watch_id: str
    user_id: str
    notification_type: str
    term: str
    class_nbr: str
    payload: str
    unsubscribe_token: str


async def insert_outbox(conn: asyncpg.Connection, rows: Sequence[OutboxRow]) -> None:
    """Write the rendered emails in one statement, inside the caller's transaction."""
    if not rows:
        return
    await conn.execute(
        """
        INSERT INTO seatwatch_outbox
            (class_watch_id, user_id, notification_type, term, class_nbr, payload, unsubscribe_token)
        SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
        """,
        [r.watch_id for r in rows],
        [r.user_id for r in rows],
        [r.notification_type for r in rows],
        [r.term for r in rows],
        [r.class_nbr for r in rows],
        [r.payload for r in rows],
        [r.unsubscribe_token for r in rows],
    )


async def outbox_counts(conn: asyncpg.Connection | asyncpg.Pool) -> dict[str, int]:
    """Pending and failed outbox rows, for health, status and metrics."""
    row = await conn.fetchrow(
        """
        SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
               count(*) FILTER (WHERE status = 'failed') AS failed,
               count(*) FILTER (WHERE status = 'failed' AND created_at > now() - interval '24 hours') AS failed_24h
        FROM seatwatch_outbox
        WHERE status IN ('pending', 'failed')
        """
    )
    assert row is not None
    return {
        "pending": int(row["pending"]),
        "failed": int(row["failed"]),
        "failed_24h": int(row["failed_24h"]),
    }
