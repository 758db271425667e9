"""Smoke: the migrated template has seatwatch's tables."""

import asyncpg


async def test_migrated_database_has_outbox(pool: asyncpg.Pool) -> None:
    """A migrated database has the outbox table and the migration ledger."""
    names = {r["name"] for r in await pool.fetch("SELECT name FROM seatwatch_migrations")}
    assert names == {"0001_base_schema", "0002_seatwatch"}
    assert await pool.fetchval("SELECT count(*) FROM seatwatch_outbox") == 0
