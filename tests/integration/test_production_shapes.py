"""Production shapes: Redis over TLS (``rediss://``, a private CA) and Postgres through PgBouncer in transaction
mode with the statement cache off. Every place that needs a lock works through the pooler, and nothing relies
on session state (session advisory locks, SET, LISTEN, temporary tables, prepared statements)."""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import orjson
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from daemon.checks.outbox import OutboxSender
from daemon.detect import Observation
from daemon.runtime.metrics import Metrics
from daemon.store import db
from daemon.store.migrations import migrate, migrations
from daemon.store.pool import connect, create_pool
from daemon.upstream.resend import ResendTransport
from tests.support.procs import Daemons, NotifySocket, daemon_env, quiet_cron, run_cli
from tests.support.seed import add_user, add_watch, clear, watched
from tests.support.shapes import PgBouncer
from tests.support.stubs import RESEND_KEY, ResendStub, ScraperStub
from tests.support.wait import eventually

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import asyncpg

    from tests.support.servers import TestServers
    from tests.support.shapes import RedisProc

TERM = "2261"


@pytest.fixture
async def bounced(pgbouncer: PgBouncer, database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on this module's database through the transaction-mode pooler, statement cache off by the DSN."""
    created = await create_pool(pgbouncer.url_for(database_url), min_size=1, max_size=8)
    try:
        yield created
    finally:
        await created.close()


async def test_the_pooler_is_really_in_transaction_mode(servers: TestServers, database_url: str) -> None:
    """One client connection runs on two server backends across transactions: session state would not follow."""
    bouncer = PgBouncer(servers.database_url, pool_size=2).start()
    try:
        url = bouncer.url_for(database_url)
        a, b = await connect(url), await connect(url)
        try:
            first = await a.fetchval("SELECT pg_backend_pid()")
            async with b.transaction():  # takes the only idle server connection, the one ``a`` just used
                assert await b.fetchval("SELECT pg_backend_pid()") == first
                second = await a.fetchval("SELECT pg_backend_pid()")
            assert second != first
        finally:
            await a.close()
            await b.close()
    finally:
        bouncer.stop()


async def test_redis_over_tls_needs_the_ca(tls_redis: RedisProc) -> None:
    """The TLS Redis answers a ``rediss://`` client that trusts the private CA; one that does not trust it, and
    a plain-text client, are refused."""
    client = aioredis.Redis.from_url(tls_redis.url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()
    for url in (f"rediss://127.0.0.1:{tls_redis.port}/0", f"redis://127.0.0.1:{tls_redis.port}/0"):
        refused = aioredis.Redis.from_url(url, socket_timeout=2, retry=None)
        try:
            with pytest.raises((redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
                await refused.ping()
        finally:
            await refused.aclose()


async def test_concurrent_migrations_through_the_pooler_apply_once(
    empty_database_url: str, pgbouncer: PgBouncer
) -> None:
    """Three `migrate` runs at once through the pooler: the transaction-scoped advisory lock serialises them."""
    url = pgbouncer.url_for(empty_database_url)

    async def one() -> list[str]:
        conn = await connect(url)
        try:
            return await migrate(conn)
        finally:
            await conn.close()

    results = sorted(await asyncio.gather(one(), one(), one()), key=len)
    assert results[0] == results[1] == []
    assert results[2] == [m.name for m in migrations()]
    conn = await connect(url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM seatwatch_migrations") == len(migrations())
    finally:
        await conn.close()


def _observation(seats: int) -> Observation:
    return Observation(
        subject="CSE",
        catalog_nbr="240",
        title="Intro",
        instructor="Staff",
        seats_available=seats,
        seats_capacity=30,
        non_reserved_seats=None,
        location=None,
        meeting_times=None,
    )


async def test_the_section_lock_holds_through_the_pooler(bounced: asyncpg.Pool) -> None:
    """A second observation of a section waits for the first transaction through the pooler, then sees it;
    the lock is gone at COMMIT (nothing held in the server session afterwards)."""
    await clear(bounced)
    async with bounced.acquire() as first, first.transaction():
        await db.observe(first, TERM, "55500", _observation(0).row())

        async def second() -> Any:
            async with bounced.acquire() as conn, conn.transaction():
                return await db.observe(conn, TERM, "55500", _observation(3).row())

        task = asyncio.create_task(second())
        other = asyncio.create_task(_observe_alone(bounced, "55502"))
        await asyncio.sleep(0.5)
        assert not task.done()  # blocked on the section's lock
        assert await other  # another section is not
    previous = await asyncio.wait_for(task, 10)
    assert previous is not None
    assert previous.seats_available == 0
    held = await bounced.fetchval(ADVISORY_LOCKS_HERE)
    assert held == 0


# Scoped to this test's database: the server may be shared with other work that holds advisory locks.
ADVISORY_LOCKS_HERE = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


async def _observe_alone(pool: asyncpg.Pool, class_nbr: str) -> bool:
    async with pool.acquire() as conn, conn.transaction():
        await db.observe(conn, TERM, class_nbr, _observation(1).row())
    return True


async def test_two_senders_through_the_pooler_send_each_email_once(bounced: asyncpg.Pool, resend: ResendStub) -> None:
    """Two outbox senders draining at once through the pooler form disjoint batches: every row sent once."""
    await clear(bounced)
    user = await add_user(bounced, "many@example.edu")
    for i in range(250):
        watch = await add_watch(bounced, user, TERM, str(60000 + i))
        await bounced.execute(
            "INSERT INTO notifications_sent (class_watch_id, notification_type) VALUES ($1, 'seat_available')", watch
        )
        payload = orjson.dumps({"from": "n@pickmyclass.test", "to": [f"r{i}@example.edu"], "subject": "s", "html": "h"})
        await bounced.execute(
            "INSERT INTO seatwatch_outbox (class_watch_id, user_id, notification_type, term, class_nbr, payload, "
            "unsubscribe_token) VALUES ($1, $2, 'seat_available', $3, $4, $5, 'tok')",
            watch,
            user,
            TERM,
            str(60000 + i),
            payload.decode(),
        )
    async with httpx.AsyncClient() as http:
        senders = [
            OutboxSender(
                bounced, ResendTransport(http, resend.url, RESEND_KEY), Metrics(), owner=f"s{n}", requests_per_s=1000
            )
            for n in range(2)
        ]
        async with anyio.create_task_group() as tg:
            for sender in senders:
                tg.start_soon(sender.drain)
    delivered = resend.delivered_to()
    assert delivered == sorted(f"r{i}@example.edu" for i in range(250))
    assert await bounced.fetchval("SELECT count(*) FROM seatwatch_outbox WHERE status = 'sent'") == 250


# -- whole daemons in both shapes --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["direct", "production"])
async def test_a_daemon_delivers_in_both_shapes(
    shape: str,
    request: pytest.FixtureRequest,
    pool: asyncpg.Pool,
    redis_url: str,
    database_url: str,
    prefix: str,
    scraper: ScraperStub,
    resend: ResendStub,
    daemons: Daemons,
) -> None:
    """`run` + `tick` + `status` on plain Redis and a direct Postgres, and on TLS Redis and PgBouncer in
    transaction mode: every eligible watcher gets one email, nobody else, and no session lock is left."""
    if shape == "production":
        redis_url = request.getfixturevalue("tls_redis").url
        daemon_db = request.getfixturevalue("pgbouncer").url_for(database_url)
    else:
        daemon_db = database_url
    await clear(pool)
    emails = await watched(pool, ["12380", "12381", "12382"], per_section=2)
    blocked = await add_user(pool, "off@example.edu", notifications_enabled=False)
    await add_watch(pool, blocked, TERM, "12380")
    for class_nbr in ("12380", "12381", "12382"):
        scraper.set(TERM, class_nbr, seats=2)
    notify = NotifySocket()
    try:
        daemon_vars = daemon_env(
            redis_url=redis_url,
            database_url=daemon_db,
            prefix=prefix,
            scraper_url=scraper.url,
            resend_url=resend.url,
            health_port=None,
            **quiet_cron(),
        )
        proc = daemons.start(daemon_vars, notify=notify)
        notify.wait_for("READY=1")
        tick = run_cli("tick", "--group", "all", env=daemon_vars)
        assert tick.returncode == 0, tick.stderr
        await eventually(lambda: len(resend.deliveries) == len(emails), what="every email")
        status = run_cli("status", "--json", env=daemon_vars)
        assert status.returncode == 0, status.stderr
        body = orjson.loads(status.stdout)
        assert body["outbox"]["pending"] == 0
        assert body["breaker"]["state"] == "CLOSED"
        await asyncio.sleep(0.5)
        assert resend.delivered_to() == emails
        assert await pool.fetchval(ADVISORY_LOCKS_HERE) == 0
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        notify.close()
