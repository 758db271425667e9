"""The outage boundary: Redis and Postgres being away leaves the client layer as ``StoreUnavailable`` (the
driver's error as its cause), wherever it happens; a store that answers "no" keeps the driver's error.

Real servers behind the TCP proxy of ``tests/support``: a cut closes the connections and refuses new ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
import pytest
import redis.exceptions

from daemon.commands.embedded import free_port
from daemon.errors import StoreUnavailable, error_name
from daemon.primitives.clients import RedisClients
from daemon.store.pool import connect, create_pool
from tests.support.proxy import Cut, postgres_proxy, redis_proxy
from tests.support.wait import eventually

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from daemon.primitives.clients import CountingRedis
    from tests.support.proxy import TcpProxy


@pytest.fixture
async def pg_via(database_url: str) -> AsyncIterator[tuple[TcpProxy, asyncpg.Pool]]:
    proxy, via = postgres_proxy(database_url)
    pool = await create_pool(via + "?statement_cache_size=0", min_size=1, max_size=2)
    try:
        yield proxy, pool
    finally:
        pool.terminate()
        proxy.stop()


async def _transaction(pool: asyncpg.Pool, *statements: str) -> None:
    async with pool.acquire() as conn, conn.transaction():
        for statement in statements:
            await conn.fetch(statement)


def _assert_postgres_unavailable(exc: BaseException) -> None:
    assert isinstance(exc, StoreUnavailable)
    assert exc.store == "postgres"
    assert exc.__cause__ is not None
    assert not isinstance(exc.__cause__, StoreUnavailable)
    assert error_name(exc) == exc.__cause__.__class__.__name__


async def test_a_query_on_a_cut_pool_raises_store_unavailable_and_the_pool_recovers(
    pg_via: tuple[TcpProxy, asyncpg.Pool],
) -> None:
    proxy, pool = pg_via
    assert await pool.fetchval("SELECT 1") == 1
    proxy.cut()
    with pytest.raises(StoreUnavailable) as caught:
        await pool.fetchval("SELECT 1")
    _assert_postgres_unavailable(caught.value)
    # While it stays away, a new connection the pool opens is refused the same way.
    with pytest.raises(StoreUnavailable) as refused:
        await pool.fetch("SELECT 1")
    _assert_postgres_unavailable(refused.value)
    proxy.restore()

    async def answers() -> bool:
        try:
            return bool(await pool.fetchval("SELECT 1") == 1)
        except StoreUnavailable:
            return False

    await eventually(answers, 10, "the pool to answer again")


@pytest.mark.parametrize(
    ("cut", "statements"),
    [
        (Cut(b"SELECT 4242", mode="request"), ("SELECT 1", "SELECT 4242")),  # a query inside the transaction
        (Cut(b"COMMIT", mode="reply"), ("SELECT 1",)),  # the COMMIT ran; its reply is lost
    ],
    ids=["mid-transaction", "commit-reply-lost"],
)
async def test_a_connection_lost_in_a_transaction_raises_store_unavailable(
    cut: Cut, statements: tuple[str, ...], pg_via: tuple[TcpProxy, asyncpg.Pool]
) -> None:
    proxy, pool = pg_via
    armed = proxy.arm(Cut(cut.pattern, mode=cut.mode))  # a fresh counter per run
    with pytest.raises(StoreUnavailable) as caught:
        await _transaction(pool, *statements)
    assert armed.fired == 1
    _assert_postgres_unavailable(caught.value)


async def test_postgres_saying_no_keeps_the_drivers_error(pg_via: tuple[TcpProxy, asyncpg.Pool]) -> None:
    _, pool = pg_via
    with pytest.raises(asyncpg.UndefinedTableError):
        await pool.fetch("SELECT * FROM seatwatch_no_such_table")
    with pytest.raises(asyncpg.PostgresSyntaxError):
        await pool.execute("SELEKT 1")


async def test_opening_a_pool_or_a_connection_where_nothing_listens_raises_store_unavailable() -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    with pytest.raises(StoreUnavailable) as pooled:
        await create_pool(nowhere)
    _assert_postgres_unavailable(pooled.value)
    with pytest.raises(StoreUnavailable) as single:
        await connect(nowhere)
    _assert_postgres_unavailable(single.value)


async def test_a_cut_redis_raises_store_unavailable_and_a_redis_no_stays_a_redis_error(
    redis_url: str, prefix: str
) -> None:
    proxy, via = redis_proxy(redis_url)
    clients = RedisClients(via)
    client = clients.client("test")
    try:
        key = f"{prefix}:boundary"
        await client.set(key, "not a number", ex=60)
        with pytest.raises(redis.exceptions.ResponseError):
            await client.incr(key)
        proxy.cut()
        with pytest.raises(StoreUnavailable) as caught:
            await client.get(key)
        proxy.restore()
        assert caught.value.store == "redis"
        assert isinstance(caught.value.__cause__, (redis.exceptions.ConnectionError, OSError))
        await eventually(lambda: _answers(client, key), 10, "Redis to answer again")
        await client.delete(key)
    finally:
        await clients.aclose()
        proxy.stop()


async def _answers(client: CountingRedis, key: str) -> bool:
    try:
        return bool(await client.get(key) == "not a number")
    except StoreUnavailable:
        return False
