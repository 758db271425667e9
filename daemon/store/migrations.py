"""The schema: numbered SQL files under ``store/sql``, applied once each, in order, under an advisory lock."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncpg

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file."""

    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """What was applied, so a file changed afterwards is noticed."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations() -> list[Migration]:
    """The numbered files of ``daemon/store/sql``, in order."""
    folder = resources.files("daemon.store") / "sql"
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
