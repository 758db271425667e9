"""Fixtures on real servers: Redis isolated by a random key prefix per test, Postgres by a database per module.

How the servers were found is printed in the pytest header (see ``tests/support/servers.py``).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

import pytest
import redis.asyncio as aioredis

from daemon.keys import Keys
from daemon.primitives.clients import RedisClients
from daemon.primitives.queue import Queue
from daemon.primitives.scripts import Scripts
from daemon.store.migrations import migrate
from daemon.store.pool import connect, create_pool
from tests.support.procs import Daemons
from tests.support.servers import TestServers
from tests.support.shapes import PgBouncer, RedisProc
from tests.support.stubs import ResendStub, ScraperStub

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    import asyncpg

_SERVERS: TestServers | None = None


def _servers() -> TestServers:
    global _SERVERS
    if _SERVERS is None:
        _SERVERS = TestServers().start()
    return _SERVERS


def pytest_report_header(config: pytest.Config) -> list[str]:
    return ["seatwatch test servers: " + "; ".join(_servers().how)]


# Tests that measure time (pacing, evenness, latency) and so run alone, after the parallel pass, where
# no other test competes for the two cores (scripts/test runs ``-m "not serial"`` on workers, then ``-m serial``).
SERIAL_MODULES = frozenset({"test_adaptive"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in SERIAL_MODULES:
            item.add_marker(pytest.mark.serial)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SERVERS is not None:
        _SERVERS.stop()


@pytest.fixture(scope="session")
def servers() -> TestServers:
    return _servers()


@pytest.fixture(scope="session")
def redis_url(servers: TestServers) -> str:
    return servers.redis_url


# -- Redis ---------------------------------------------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    return f"swtest:{uuid.uuid4().hex[:10]}"


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


async def delete_prefix(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        batch = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for start in range(0, len(batch), 500):
            await client.delete(*batch[start : start + 500])
    finally:
        await client.aclose()


@pytest.fixture
async def redis_clients(redis_url: str, prefix: str) -> AsyncIterator[RedisClients]:
    clients = RedisClients(redis_url)
    try:
        yield clients
    finally:
        await clients.aclose()
        await delete_prefix(redis_url, prefix)


@pytest.fixture
async def scripts(redis_clients: RedisClients) -> Scripts:
    loaded = Scripts(redis_clients.client("startup"))
    await loaded.load(redis_clients.client("startup"))
    return loaded


@pytest.fixture
async def queue(redis_clients: RedisClients, keys: Keys, scripts: Scripts) -> Queue:
    """The test's own handle on the queue, for enqueueing and reading stats (it consumes nothing)."""
    made = Queue(
        redis_clients.client("queue"),
        redis_clients.client("queue", blocking=True),
        keys,
        scripts,
        consumer="test",
    )
    await made.ensure_group()
    return made


# -- Postgres ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def migrated_template(servers: TestServers) -> Iterator[str]:
    """A database with every migration applied, copied for each module that wants one."""
    name = servers.create_database("template")

    async def run() -> None:
        conn = await connect(servers.url_for(name))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(run())
    yield name
    servers.drop_database(name)


@pytest.fixture(scope="module")
def database_url(servers: TestServers, migrated_template: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, migrated database for this test module."""
    label = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    name = servers.create_database(label, template=migrated_template)
    yield servers.url_for(name)
    servers.drop_database(name)


@pytest.fixture
def empty_database_url(servers: TestServers, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database with nothing in it, for one test."""
    name = servers.create_database("empty")
    yield servers.url_for(name)
    servers.drop_database(name)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    created = await create_pool(database_url, min_size=1, max_size=8)
    try:
        yield created
    finally:
        await created.close()


# -- loopback stand-ins for the scraper and Resend ------------------------------------------------------------


@pytest.fixture
def scraper() -> Iterator[ScraperStub]:
    """A loopback scraper speaking POST /scrape; sections answer what the test sets."""
    stub = ScraperStub().start()
    yield stub
    stub.stop()


@pytest.fixture
def resend() -> Iterator[ResendStub]:
    """A loopback Resend with its idempotency-key semantics, recording every request."""
    stub = ResendStub().start()
    yield stub
    stub.stop()


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    """Starts real ``seatwatch run`` processes for a test; kills any still running when it ends."""
    made = Daemons()
    yield made
    made.kill_all()


# -- the production shapes: Redis over TLS, Postgres through a transaction-mode pooler ------------------------


@pytest.fixture(scope="session")
def tls_redis() -> Iterator[RedisProc]:
    """A private redis-server speaking only TLS (a throwaway CA), reached by ``rediss://`` with that CA."""
    server = RedisProc(tls=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pgbouncer(servers: TestServers) -> Iterator[PgBouncer]:
    """A private PgBouncer in transaction mode in front of the test Postgres, few server connections."""
    bouncer = PgBouncer(servers.database_url).start()
    yield bouncer
    bouncer.stop()
