"""The asyncpg pool and connections, and the Postgres outage boundary.

Supabase's pooler runs in session mode on port 5432 (prepared statements are fine) and in transaction mode
on 6543, where a prepared statement may land on another server connection; there the statement cache is
off. Any other transaction-mode pooler (a PgBouncer on another port) says so in the DSN with
``?statement_cache_size=0`` (taken out of the DSN before asyncpg sees it). Nothing here relies on session
state across transactions: every lock is transaction-scoped, nothing is SET, LISTENed or made temporary.

Opening a pool or a connection that cannot reach the server raises ``errors.StoreUnavailable`` (the
driver's error as its cause). Queries on an open pool raise the driver's errors; ``CONNECTION_ERRORS`` names
the ones that mean "Postgres is away, not wrong", ``StoreUnavailable`` first.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from daemon.errors import StoreUnavailable

TRANSACTION_POOLER_PORT: Final = 6543
STATEMENT_CACHE_PARAM: Final = "statement_cache_size"

# Connection-level failures: Postgres is away, not wrong. Jobs that hit these are deferred, not failed.
CONNECTION_ERRORS: Final = (
    StoreUnavailable,
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
    """asyncpg options for ``dsn``: no statement cache behind a transaction-mode pooler.

    Port 6543 (Supabase's transaction pooler) turns the cache off; ``?statement_cache_size=N`` in the DSN
    sets it explicitly (0 for any transaction-mode pooler) and wins over the port.
    """
    options: dict[str, Any] = {"command_timeout": 60}
    try:
        parts = urlsplit(dsn)
        port = parts.port
    except ValueError:
        options["dsn"] = dsn
        return options
    query = parse_qsl(parts.query, keep_blank_values=True)
    if port == TRANSACTION_POOLER_PORT:
        options["statement_cache_size"] = 0
    cache = [value for name, value in query if name == STATEMENT_CACHE_PARAM]
    if cache:
        options["statement_cache_size"] = int(cache[-1])
        rest = urlencode([(name, value) for name, value in query if name != STATEMENT_CACHE_PARAM])
        dsn = urlunsplit(parts._replace(query=rest))
    options["dsn"] = dsn
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
    try:
        return await asyncpg.create_pool(
            **connect_options(dsn),
            min_size=min_size,
            max_size=max_size,
            max_inactive_connection_lifetime=300,
            reset=_reset,
        )
    except _DRIVER_CONNECTION_ERRORS as exc:
        raise StoreUnavailable("postgres", f"{exc.__class__.__name__}: {exc}") from exc


async def connect(dsn: str) -> asyncpg.Connection:
    """One connection (migrations, admin commands), with the pool's options."""
    try:
        return await asyncpg.connect(**connect_options(dsn))
    except _DRIVER_CONNECTION_ERRORS as exc:
        raise StoreUnavailable("postgres", f"{exc.__class__.__name__}: {exc}") from exc


_DRIVER_CONNECTION_ERRORS: Final = CONNECTION_ERRORS[1:]


async def ping(pool: asyncpg.Pool | asyncpg.Connection) -> None:
    """Liveness: one ``SELECT 1``."""
    await pool.fetchval("SELECT 1")


async def server_version(conn: asyncpg.Connection) -> str:
    """The server's version string, as ``check`` shows it."""
    return str(await conn.fetchval("SHOW server_version"))
