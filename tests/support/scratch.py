"""Scratch databases for the benches: made and migrated on the local Postgres (``BENCH_DATABASE_URL`` to point
elsewhere), dropped at the end."""

from __future__ import annotations

import os
import uuid
from typing import Final

import asyncpg

from daemon.store.migrations import migrate
from daemon.store.pool import connect
from tests.support.servers import local_postgres_url

ADMIN_DSN: Final = os.environ.get("BENCH_DATABASE_URL") or local_postgres_url(os.environ)[0]


async def migrated_database(prefix: str) -> str:
    """A new database named ``{prefix}_{random}`` with seatwatch's schema; its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    conn = await connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return url


async def drop_database(url: str) -> None:
    """Drop the database at ``url`` (made by ``migrated_database``), whoever is still connected."""
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await admin.close()
