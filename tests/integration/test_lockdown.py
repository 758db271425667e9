"""Supabase's public roles against seatwatch's objects, and `migrate` against a tampered bookkeeping table.

Every test first puts Supabase's default privileges in place on its own database (new tables, sequences and
functions in public granted to anon and authenticated), then migrates, then looks at what those roles can do.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

import asyncpg
import pytest

from daemon.errors import FatalStartError
from daemon.store.migrations import migrate, migrations, pending_migrations
from daemon.store.pool import connect
from tests.support.procs import daemon_env, quiet_cron, run_cli

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests.support.procs import Daemons
    from tests.support.stubs import ResendStub, ScraperStub

ROLES: Final = ("anon", "authenticated")
MIGRATION_NAMES: Final = [m.name for m in migrations()]

SUPABASE_DEFAULTS: Final = """
DO $$
DECLARE
    r text;
BEGIN
    -- Roles are server-wide and shared with other test runs: created only when missing, never dropped.
    FOREACH r IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN NOINHERIT', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END
$$;
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
"""

TABLE_PRIVILEGES: Final = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


@pytest.fixture
async def supabase(empty_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to an empty database with Supabase's default privileges in place (nothing migrated yet)."""
    conn = await connect(empty_database_url)
    try:
        await conn.execute(SUPABASE_DEFAULTS)
        yield conn
    finally:
        await conn.close()


async def exposed(conn: asyncpg.Connection) -> list[str]:
    """Everything of seatwatch's that anon or authenticated may read, change or execute, or that lacks RLS."""
    found: list[str] = []
    relations = await conn.fetch(
        """
        SELECT c.oid, c.relname, c.relkind::text AS relkind, c.relrowsecurity FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace AND c.relname LIKE 'seatwatch\\_%'
          AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
        """
    )
    assert {r["relname"] for r in relations} >= {"seatwatch_migrations", "seatwatch_outbox", "seatwatch_outbox_id_seq"}
    for r in relations:
        if r["relkind"] in ("r", "p") and not r["relrowsecurity"]:
            found.append(f"{r['relname']}: no row-level security")
        for role in ROLES:
            if r["relkind"] == "S":
                for privilege in ("USAGE", "SELECT", "UPDATE"):
                    if await conn.fetchval("SELECT has_sequence_privilege($1, $2::oid, $3)", role, r["oid"], privilege):
                        found.append(f"{r['relname']}: {role} {privilege}")
                continue
            for privilege in TABLE_PRIVILEGES:
                if await conn.fetchval("SELECT has_table_privilege($1, $2::oid, $3)", role, r["oid"], privilege):
                    found.append(f"{r['relname']}: {role} {privilege}")
            for privilege in ("SELECT", "INSERT", "UPDATE", "REFERENCES"):
                if await conn.fetchval("SELECT has_any_column_privilege($1, $2::oid, $3)", role, r["oid"], privilege):
                    found.append(f"{r['relname']}: {role} {privilege} on a column")
    policies = await conn.fetch("SELECT tablename, policyname FROM pg_policies WHERE tablename LIKE 'seatwatch\\_%'")
    found += [f"{p['tablename']}: policy {p['policyname']}" for p in policies]
    functions = await conn.fetch(
        "SELECT p.oid, p.oid::regprocedure::text AS name FROM pg_proc p "
        "WHERE p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'seatwatch\\_%'"
    )
    assert len(functions) >= 7
    for f in functions:
        for role in ROLES:
            if await conn.fetchval("SELECT has_function_privilege($1, $2::oid, 'EXECUTE')", role, f["oid"]):
                found.append(f"{f['name']}: {role} EXECUTE")
    return found


async def as_role(conn: asyncpg.Connection, role: str, sql: str) -> None:
    async with conn.transaction():
        await conn.execute(f"SET LOCAL ROLE {role}")
        await conn.execute(sql)


async def test_supabase_roles_find_nothing_of_seatwatchs(supabase: asyncpg.Connection) -> None:
    """After migrate under Supabase's default grants, anon and authenticated can read, change or run nothing."""
    # Supabase's default grants are in place, so every object migrate creates starts out granted to anon.
    assert await supabase.fetchval("SELECT count(*) FROM pg_default_acl WHERE defaclobjtype IN ('r', 'S', 'f')") == 3
    await migrate(supabase)
    assert await exposed(supabase) == []

    for role in ROLES:
        for sql in (
            "SELECT * FROM seatwatch_migrations",
            "DELETE FROM seatwatch_migrations",
            "SELECT * FROM seatwatch_outbox",
            "UPDATE seatwatch_section_states SET seats_available = 0",
            "SELECT nextval('seatwatch_outbox_id_seq')",
            "SELECT * FROM seatwatch_claim('2261', '12431', true, ARRAY['seat_available'])",
            "SELECT seatwatch_lock_down()",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await as_role(supabase, role, sql)
    assert await supabase.fetchval("SELECT count(*) FROM seatwatch_migrations") == len(MIGRATION_NAMES)


async def test_default_grants_would_expose_a_table_but_migrate_shuts_it(supabase: asyncpg.Connection) -> None:
    """A seatwatch table a later migration adds (here: made by hand) is shut by the next migrate's lock-down."""
    await migrate(supabase)
    await supabase.execute("CREATE TABLE seatwatch_later (id bigint GENERATED ALWAYS AS IDENTITY, note text)")
    await supabase.execute("CREATE FUNCTION seatwatch_later_fn() RETURNS int LANGUAGE sql AS 'SELECT 1'")
    await supabase.execute("GRANT SELECT (note) ON seatwatch_later TO anon")
    before = await exposed(supabase)
    assert "seatwatch_later: anon SELECT" in before
    assert "seatwatch_later: no row-level security" in before
    assert "seatwatch_later_fn(): authenticated EXECUTE" in before

    assert await migrate(supabase) == []
    assert await exposed(supabase) == []


async def test_lock_down_on_the_production_schema_keeps_the_web_apps_grants(supabase: asyncpg.Connection) -> None:
    """The lock-down touches seatwatch_* objects only: a web-app table's default grants stay as they were."""
    await supabase.execute("CREATE TABLE class_notes (id int)")
    await migrate(supabase)
    assert await supabase.fetchval("SELECT has_table_privilege('anon', 'class_notes', 'SELECT')") is True
    assert await supabase.fetchval("SELECT has_table_privilege('service_role', 'seatwatch_outbox', 'SELECT')") is True


@pytest.mark.parametrize(
    "tamper",
    [
        "DELETE FROM seatwatch_migrations",
        "DELETE FROM seatwatch_migrations WHERE name <> '0001_base_schema'",
        "UPDATE seatwatch_migrations SET checksum = 'bogus'",
    ],
)
async def test_migrate_survives_a_tampered_bookkeeping_table(supabase: asyncpg.Connection, tamper: str) -> None:
    """Rows deleted or bogus in seatwatch_migrations: migrate succeeds, re-running only 0001 (all conditional)."""
    await migrate(supabase)
    await supabase.execute(
        "SELECT * FROM seatwatch_observe_v3('2261', '1', 'C', '1', NULL, 'Staff', 0, 9, NULL, NULL, NULL)"
    )
    await supabase.execute(tamper)
    assert set(await migrate(supabase)) <= {"0001_base_schema"}
    names = await supabase.fetch("SELECT name FROM seatwatch_migrations ORDER BY name")
    assert [r["name"] for r in names] == MIGRATION_NAMES
    assert await supabase.fetchval("SELECT count(*) FROM seatwatch_section_states") == 1


async def test_a_bogus_row_does_not_skip_a_migration(supabase: asyncpg.Connection) -> None:
    """A row claiming a migration ran whose objects are missing does not stop migrate from applying it."""
    await supabase.execute(
        "CREATE TABLE seatwatch_migrations (name text PRIMARY KEY, checksum text NOT NULL, "
        "applied_at timestamptz NOT NULL DEFAULT now())"
    )
    await supabase.execute(
        "INSERT INTO seatwatch_migrations (name, checksum) VALUES ('0005_web_app_observations', 'x')"
    )
    applied = await migrate(supabase)
    assert applied == MIGRATION_NAMES
    assert await supabase.fetchval("SELECT to_regprocedure('seatwatch_lock_down()') IS NOT NULL")


@pytest.mark.slow
async def test_daemon_starts_after_anon_tried_and_rows_were_deleted(
    supabase: asyncpg.Connection,
    empty_database_url: str,
    redis_url: str,
    prefix: str,
    scraper: ScraperStub,
    resend: ResendStub,
    daemons: Daemons,
) -> None:
    """anon's DELETE is refused; rows deleted by the owner anyway: `migrate` exits 0 and `run` gets healthy."""
    await migrate(supabase)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_role(supabase, "anon", "DELETE FROM seatwatch_migrations")
    await supabase.execute("DELETE FROM seatwatch_migrations")

    env = daemon_env(
        redis_url=redis_url,
        database_url=empty_database_url,
        prefix=prefix,
        scraper_url=scraper.url,
        resend_url=resend.url,
        health_port=None,
        **quiet_cron(),
    )
    result = await asyncio.to_thread(run_cli, "migrate", env=env)
    assert result.returncode == 0, result.stderr
    await supabase.execute("DELETE FROM seatwatch_migrations")
    proc = daemons.start(env)
    await asyncio.to_thread(proc.wait_healthy)
    assert await supabase.fetchval("SELECT count(*) FROM seatwatch_migrations") == len(MIGRATION_NAMES)


async def test_a_migration_half_in_place_is_refused_with_what_is_missing(supabase: asyncpg.Connection) -> None:
    """Some of a migration's functions present, some not: migrate names both and changes nothing."""
    await migrate(supabase)
    await supabase.execute("DROP FUNCTION seatwatch_claim(text, text, boolean, text[])")
    await supabase.execute("DELETE FROM seatwatch_migrations WHERE name = '0002_seatwatch'")
    with pytest.raises(
        FatalStartError, match=r"0002_seatwatch is half in place: .*seatwatch_observe.* seatwatch_claim"
    ):
        await migrate(supabase)
    assert await pending_migrations(supabase) == ["0002_seatwatch"]
