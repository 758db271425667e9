"""The schema: numbered SQL files under ``store/sql``, applied once each, in order, under an advisory lock.

``seatwatch_migrations`` records what ran, but it is not trusted alone: a row deleted (or a bogus one added)
there must not make the next start re-run a migration and fail, or skip one. Each migration is judged by what
it creates (its top-level ``CREATE FUNCTION seatwatch_*`` and ``CREATE TABLE seatwatch_*``): all present, it
counts as applied (and is recorded if its row is missing); none present, it runs (even if a row claims it
ran). After every run the lock-down (``seatwatch_lock_down()``, SPEC §6) shuts Supabase's public roles out
of every seatwatch object, those of later migrations included.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Final

from daemon.errors import FatalStartError

if TYPE_CHECKING:
    import asyncpg

logger = logging.getLogger(__name__)

_FUNCTION: Final = re.compile(r"^CREATE FUNCTION (seatwatch_\w+)\s*\(", re.MULTILINE)
_TABLE: Final = re.compile(r"^CREATE TABLE (IF NOT EXISTS )?(seatwatch_\w+)", re.MULTILINE)


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file."""

    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """What was applied, so a file changed afterwards is noticed."""
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def functions(self) -> list[str]:
        """Names of the seatwatch functions it creates (CREATE FUNCTION fails if one exists)."""
        return _FUNCTION.findall(self.sql)

    @property
    def tables(self) -> list[tuple[str, bool]]:
        """(name, created only if absent) of the seatwatch tables it creates."""
        return [(name, bool(guarded)) for guarded, name in _TABLE.findall(self.sql)]


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
    """Apply every migration not yet in place, in one transaction, then the lock-down; return the names applied.

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
            recorded = migration.name in done
            state = await _objects_state(conn, migration)
            if state == "present" or (state == "none" and recorded):
                if not recorded:
                    logger.warning(
                        "migration %s is not recorded in seatwatch_migrations, but everything it creates exists: "
                        "recorded without running it again",
                        migration.name,
                    )
                    await _record(conn, migration)
                elif done[migration.name] != migration.checksum:
                    logger.warning("migration %s changed after it was applied; it is not run again", migration.name)
                continue
            if recorded:
                logger.warning(
                    "migration %s is recorded in seatwatch_migrations, but what it creates is missing: applying it",
                    migration.name,
                )
            logger.info("applying migration %s", migration.name)
            await conn.execute(migration.sql)
            await _record(conn, migration)
            applied.append(migration.name)
        await lock_down(conn)
    return applied


async def lock_down(conn: asyncpg.Connection) -> int:
    """Shut anon, authenticated and PUBLIC out of every seatwatch object (idempotent); statements it ran."""
    if await conn.fetchval("SELECT to_regprocedure('seatwatch_lock_down()') IS NULL"):
        return 0
    statements = int(await conn.fetchval("SELECT seatwatch_lock_down()") or 0)
    if statements:
        logger.info("lock-down: %d grants or row-level security settings of seatwatch objects corrected", statements)
    return statements


async def _objects_state(conn: asyncpg.Connection, migration: Migration) -> str:
    """'none' (it creates nothing the catalog could show), 'present', 'absent', or FatalStartError if partial.

    'absent' means running it cannot collide: none of its functions, nor of its unguarded tables, exists.
    """
    functions = migration.functions
    tables = migration.tables
    if not functions and not tables:
        return "none"
    found_functions = set(
        await conn.fetchval(
            "SELECT coalesce(array_agg(DISTINCT proname::text), '{}') FROM pg_proc "
            "WHERE pronamespace = current_schema()::regnamespace AND proname = ANY($1::text[])",
            functions,
        )
    )
    found_tables = set(
        await conn.fetchval(
            "SELECT coalesce(array_agg(t), '{}') FROM unnest($1::text[]) AS t WHERE to_regclass(t) IS NOT NULL",
            [name for name, _ in tables],
        )
    )
    if found_functions == set(functions) and found_tables == {name for name, _ in tables}:
        return "present"
    colliding = found_functions | {name for name, guarded in tables if not guarded and name in found_tables}
    if not colliding:
        return "absent"
    missing = sorted((set(functions) - found_functions) | ({name for name, _ in tables} - found_tables))
    raise FatalStartError(
        f"migration {migration.name} is half in place: {', '.join(sorted(colliding))} exist but "
        f"{', '.join(missing)} do not; restore the missing objects or remove the present ones, then migrate"
    )


async def _record(conn: asyncpg.Connection, migration: Migration) -> None:
    await conn.execute(
        "INSERT INTO seatwatch_migrations (name, checksum) VALUES ($1, $2) "
        "ON CONFLICT (name) DO UPDATE SET checksum = EXCLUDED.checksum, applied_at = now()",
        migration.name,
        migration.checksum,
    )


async def pending_migrations(conn: asyncpg.Connection) -> list[str]:
    """Names of migrations `migrate` would apply now (for `check` and start-up), judged as `migrate` judges them."""
    exists = await conn.fetchval("SELECT to_regclass('seatwatch_migrations') IS NOT NULL")
    done: set[str] = set()
    if exists:
        done = {r["name"] for r in await conn.fetch("SELECT name FROM seatwatch_migrations")}
    pending = []
    for migration in migrations():
        try:
            state = await _objects_state(conn, migration)
        except FatalStartError:
            state = "partial"
        if not (state == "present" or (state == "none" and migration.name in done)):
            pending.append(migration.name)
    return pending
