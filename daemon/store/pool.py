"""The asyncpg pool and connections, and the Postgres outage boundary.

Supabase's pooler runs in session mode on port 5432 (prepared statements are fine) and in transaction mode
on 6543, where a prepared statement may land on another server connection; there the statement cache is
off. Any other transaction-mode pooler (a PgBouncer on another port) says so in the DSN with
``?statement_cache_size=0`` (taken out of the DSN before asyncpg sees it). Nothing here relies on session
state across transactions: every lock is transaction-scoped, nothing is SET, LISTENed or made temporary.

The outage boundary: a connection failure (refused, reset, timed out, the server shutting down) leaves this
module as ``errors.StoreUnavailable``, with the driver's error as its ``__cause__``, wherever it happens:
opening a pool or a connection, a pool opening one more, a query, a transaction's BEGIN, COMMIT or
ROLLBACK, a connection's reset on release. Code above catches ``StoreUnavailable`` by name. Errors that mean
"Postgres is here and says no" (a constraint, a syntax error) stay the driver's ``PostgresError``.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any, Final, TypeAlias
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import asyncpg.transaction

from daemon.errors import StoreUnavailable

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

# The pool as the work loops name it in their annotations, so they import no driver (lint-imports); its
# connections are the ``Connection`` below.
Pool: TypeAlias = asyncpg.Pool

TRANSACTION_POOLER_PORT: Final = 6543
STATEMENT_CACHE_PARAM: Final = "statement_cache_size"

# Postgres clients per process, fixed whatever the concurrency: a check holds a connection only for its one
# short transaction (the scrape happens outside it), so five serve 32 scrapes in flight. Supabase's Supavisor
# allows about 15 clients per database and role in session mode on the free tier: two daemons (10) and a few
# operator commands (one each) fit. README "Postgres connections" documents these numbers.
DAEMON_POOL_SIZE: Final = 5
COMMAND_CONNECTIONS: Final = 1

# Supabase's direct host, db.<project ref>.supabase.co, has only an IPv6 address on the free tier.
_SUPABASE_DIRECT = re.compile(r"db\.([a-z0-9]+)\.supabase\.co")


def dsn_warnings(dsn: str) -> list[str]:
    """What an operator should know about ``dsn`` before it fails at 3 a.m. (shown by ``check``, logged by ``run``)."""
    try:
        host = urlsplit(dsn).hostname or ""
    except ValueError:
        return []
    match = _SUPABASE_DIRECT.fullmatch(host)
    if match is None:
        return []
    return [
        f"DATABASE_URL names Supabase's direct host {host}, which has only an IPv6 address on the free tier"
        " (Oracle's networks are IPv4 by default): use the pooler, postgresql://postgres.<ref>:<password>@"
        "aws-0-<region>.pooler.supabase.com:5432/postgres?sslmode=require (session mode; 6543: transaction mode)"
    ]


# The driver's connection-level failures: Postgres is away, not wrong. Translated to StoreUnavailable here.
_DRIVER_CONNECTION_ERRORS: Final = (
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


def _unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable("postgres", f"{exc.__class__.__name__}: {exc}")


def _at_boundary(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """``method``, with the driver's connection failures raised as ``StoreUnavailable`` (the cause kept)."""

    @functools.wraps(method)
    async def translated(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except _DRIVER_CONNECTION_ERRORS as exc:
            raise _unavailable(exc) from exc

    return translated


class _Transaction(asyncpg.transaction.Transaction):  # type: ignore[misc]  # asyncpg ships no types
    """``async with conn.transaction()``: a connection lost at BEGIN, COMMIT or ROLLBACK is ``StoreUnavailable``
    (asyncpg's own checks the connection before COMMIT or ROLLBACK and raises ``InterfaceError``)."""

    __slots__ = ()
    __aenter__ = _at_boundary(asyncpg.transaction.Transaction.__aenter__)
    __aexit__ = _at_boundary(asyncpg.transaction.Transaction.__aexit__)


class Connection(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg's connection, whose connection failures leave as ``StoreUnavailable``: every statement seatwatch
    sends goes through these methods (a pool's ``fetch`` and ``execute`` run them on a pooled connection), and
    every transaction is a ``_Transaction``."""

    execute = _at_boundary(asyncpg.Connection.execute)
    executemany = _at_boundary(asyncpg.Connection.executemany)
    fetch = _at_boundary(asyncpg.Connection.fetch)
    fetchrow = _at_boundary(asyncpg.Connection.fetchrow)
    fetchval = _at_boundary(asyncpg.Connection.fetchval)

    def transaction(self, *, isolation: str | None = None, readonly: bool = False, deferrable: bool = False) -> Any:
        """``asyncpg.Connection.transaction``, as a ``_Transaction``."""
        try:
            super().transaction(isolation=isolation, readonly=readonly, deferrable=deferrable)  # checks it is open
        except _DRIVER_CONNECTION_ERRORS as exc:
            raise _unavailable(exc) from exc
        return _Transaction(self, isolation, readonly, deferrable)


async def _open(*args: Any, **kwargs: Any) -> Connection:
    """asyncpg's ``connect`` for the pool: a refusal leaves as ``StoreUnavailable``, and so does a connection
    the server closed at once (the pool would raise the driver's error for it)."""
    try:
        conn: Connection = await asyncpg.connect(*args, **kwargs)
    except _DRIVER_CONNECTION_ERRORS as exc:
        raise _unavailable(exc) from exc
    if conn.is_closed():
        raise StoreUnavailable("postgres", "the server closed the connection as it opened")
    return conn


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool that opens lazily beyond ``min_size`` and recycles idle connections."""
    try:
        return await asyncpg.create_pool(
            **connect_options(dsn),
            min_size=min_size,
            max_size=max_size,
            max_inactive_connection_lifetime=300,
            reset=_reset,
            connect=_open,
            connection_class=Connection,
        )
    except _DRIVER_CONNECTION_ERRORS as exc:
        raise _unavailable(exc) from exc


async def connect(dsn: str) -> Connection:
    """One connection (migrations, admin commands), with the pool's options."""
    return await _open(**connect_options(dsn), connection_class=Connection)


async def ping(pool: asyncpg.Pool | asyncpg.Connection) -> None:
    """Liveness: one ``SELECT 1``."""
    await pool.fetchval("SELECT 1")


async def server_version(conn: asyncpg.Connection) -> str:
    """The server's version string, as ``check`` shows it."""
    return str(await conn.fetchval("SHOW server_version"))
