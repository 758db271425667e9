"""Connections cut at the worst moment, through the TCP proxy, while one daemon process keeps running.

Redis: a script ran but its reply was lost (the queue's cycle, which also carries the breaker's admissions and
outcomes; the cron lock's acquire and release; the tick's enqueue). Postgres: the connection lost in the middle
of a section's transaction, the COMMIT's reply lost after the commit happened, and the outbox's connection lost
between Resend's answer and the rows being marked sent. Each time: every owed email
delivered exactly once, nothing counted twice, the same process still running.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest
import redis.asyncio as aioredis

from daemon.checks.outbox import OutboxSender
from daemon.cron.slots import slot_id
from daemon.keys import Keys
from daemon.primitives.breaker import BreakerConfig, CircuitBreaker
from daemon.primitives.scripts import source
from daemon.runtime.metrics import Metrics
from daemon.store.pool import create_pool
from daemon.upstream.resend import ResendTransport
from tests.support.ledger import settled
from tests.support.procs import Daemons, daemon_env, quiet_cron
from tests.support.proxy import Cut, postgres_proxy, redis_proxy
from tests.support.seed import clear, owed_emails, watched
from tests.support.stubs import RESEND_KEY, Reply, ResendStub, ScraperStub
from tests.support.wait import while_running

if TYPE_CHECKING:
    import asyncpg

    from daemon.primitives.clients import RedisClients
    from daemon.primitives.queue import Queue
    from daemon.primitives.scripts import Scripts

pytestmark = pytest.mark.slow

TERM = "2261"


def sha(script: str) -> bytes:
    return hashlib.sha1(source(script).encode()).hexdigest().encode()  # noqa: S324 - Redis names scripts by SHA-1


async def test_cycle_replies_lost_count_each_outcome_once(
    pool: asyncpg.Pool,
    redis_url: str,
    database_url: str,
    prefix: str,
    redis_clients: RedisClients,
    scripts: Scripts,
    queue: Queue,
    scraper: ScraperStub,
    resend: ResendStub,
    daemons: Daemons,
) -> None:
    """Queue cycles that ran but whose replies were lost: every job settles once, each email goes once, and
    three failed scrapes count three breaker failures, not six; the same process throughout."""
    await clear(pool)
    keys = Keys(prefix)
    opening = [str(13500 + i) for i in range(4)]
    failing = [str(13510 + i) for i in range(3)]
    emails = await watched(pool, opening + failing)
    owed = sorted(e for e in emails if e[1:6] in opening)
    for class_nbr in opening:
        scraper.set(TERM, class_nbr, seats=2)
    for class_nbr in failing:
        scraper.script(TERM, class_nbr, Reply(401, {"success": False, "error": "token"}))
    proxy, via = redis_proxy(redis_url)
    try:
        env = daemon_env(
            redis_url=via,
            database_url=database_url,
            prefix=prefix,
            scraper_url=scraper.url,
            resend_url=resend.url,
            health_port=None,
            **quiet_cron(),
        )
        proc = daemons.start(env)
        proc.wait_healthy()
        cycle = proxy.arm(Cut(sha("queue_cycle"), times=3))
        await queue.enqueue([(TERM, c) for c in opening])
        await while_running(
            lambda: settled(pool, queue, resend, len(owed), delayed=False), proc, "the openings settled"
        )
        assert cycle.fired >= 1

        failures = proxy.arm(Cut(sha("queue_cycle"), times=3))
        await queue.enqueue([(TERM, c) for c in failing])

        async def retried() -> bool:
            stats = await queue.stats()
            return stats.delayed == len(failing) and stats.pending == 0 and stats.waiting == 0

        await while_running(retried, proc, "the failed scrapes waiting for a retry")
        assert failures.fired >= 1
        breaker = CircuitBreaker(redis_clients.client("breaker"), keys, scripts, BreakerConfig())
        assert (await breaker.status()).failures == len(failing)
        await asyncio.sleep(0.5)
        assert collections.Counter(resend.delivered_to()) == collections.Counter(owed)
        for class_nbr in opening:
            assert scraper.calls(TERM, class_nbr) == 1
        assert proc.stop() == 0
    finally:
        proxy.stop()


async def test_lock_and_enqueue_replies_lost_still_run_the_slot_once(
    pool: asyncpg.Pool,
    redis_url: str,
    database_url: str,
    prefix: str,
    queue: Queue,
    scraper: ScraperStub,
    resend: ResendStub,
    daemons: Daemons,
) -> None:
    """The cron lock's acquire, the tick's enqueue and the lock's release each ran with their reply lost: the
    slot completes (marker done), the lock is free at once, not after its TTL, every email goes once."""
    await clear(pool)
    keys = Keys(prefix)
    sections = [str(13520 + i) for i in range(4)]
    emails = await watched(pool, sections)
    for class_nbr in sections:
        scraper.set(TERM, class_nbr, seats=2)
    slot = (datetime.now(UTC) - timedelta(minutes=1)).replace(second=0, microsecond=0)
    proxy, via = redis_proxy(redis_url)
    try:
        cuts = [proxy.arm(Cut(sha(name))) for name in ("lock_acquire", "queue_enqueue", "lock_release")]
        env = daemon_env(
            redis_url=via,
            database_url=database_url,
            prefix=prefix,
            scraper_url=scraper.url,
            resend_url=resend.url,
            health_port=None,
            SEATWATCH_CRON=f"{slot.minute} {slot.hour} * * *",
            SEATWATCH_TIMEZONE="UTC",
            SEATWATCH_STAGGER="none",
        )
        proc = daemons.start(env)
        admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:

            async def slot_done() -> bool:
                return bool(await admin.get(keys.slot(slot_id(slot))) == "done")

            await while_running(slot_done, proc, "the slot marked done", timeout_s=45)
            await while_running(
                lambda: settled(pool, queue, resend, len(emails), delayed=False), proc, "the slot's emails"
            )
            assert [c.fired for c in cuts] == [1, 1, 1]
            assert not await admin.exists(keys.lock)
        finally:
            await admin.aclose()
        await asyncio.sleep(0.5)
        assert collections.Counter(resend.delivered_to()) == collections.Counter(emails)
        # The enqueue ran but the tick could not know: the slot is retried, so a section may be checked twice
        # (the second check finds no edge); it is never emailed twice.
        assert all(1 <= scraper.calls(TERM, c) <= 2 for c in sections)
        assert proc.stop() == 0
    finally:
        proxy.stop()


@pytest.mark.parametrize(
    "cut",
    [
        Cut(b"seatwatch_claim", mode="request"),  # mid-transaction: observed, not yet claimed; rolled back
        Cut(b"COMMIT", after=b"seatwatch_claim"),  # the commit happened; its reply is lost
    ],
    ids=["mid-transaction", "commit-reply-lost"],
)
async def test_postgres_cut_mid_section_delivers_each_email_once(
    cut: Cut,
    pool: asyncpg.Pool,
    redis_url: str,
    database_url: str,
    prefix: str,
    queue: Queue,
    scraper: ScraperStub,
    resend: ResendStub,
    daemons: Daemons,
) -> None:
    """A section's transaction loses its connection mid-way, or after COMMIT ran with the reply lost: each
    owed email is delivered exactly once, soon, by the same process."""
    cut = Cut(cut.pattern, mode=cut.mode, after=cut.after)  # a fresh counter per run
    await clear(pool)
    sections = [str(13530 + i) for i in range(2)]
    emails = await watched(pool, sections, per_section=2)
    for class_nbr in sections:
        scraper.set(TERM, class_nbr, seats=2)
    proxy, via = postgres_proxy(database_url)
    try:
        env = daemon_env(
            redis_url=redis_url,
            database_url=via + "?statement_cache_size=0",  # every statement's text on the wire, as via a pooler
            prefix=prefix,
            scraper_url=scraper.url,
            resend_url=resend.url,
            health_port=None,
            **quiet_cron(),
        )
        proc = daemons.start(env)
        proc.wait_healthy()
        proxy.arm(cut)
        await queue.enqueue([(TERM, c) for c in sections])
        await while_running(
            lambda: settled(pool, queue, resend, len(emails), delayed=False), proc, "every email", timeout_s=20
        )
        assert cut.fired == 1
        await asyncio.sleep(0.5)
        assert collections.Counter(resend.delivered_to()) == collections.Counter(emails)
        assert await pool.fetchval("SELECT count(*) FROM seatwatch_outbox") == len(emails)
        assert proc.stop() == 0
        # The operator reads the driver's error, not the boundary's wrapper.
        lost = [line for line in proc.logs().splitlines() if "Postgres connection lost (" in line]
        assert lost, proc.logs()
        assert not any("(StoreUnavailable)" in line for line in lost), lost
    finally:
        proxy.stop()


async def test_a_batch_cut_off_before_it_is_marked_is_resent_at_once_not_after_its_lease(
    pool: asyncpg.Pool, database_url: str, resend: ResendStub
) -> None:
    """Postgres lost just after Resend accepted a batch, before its rows were marked sent: once Postgres answers
    the sender frees its own lease and resends the batch under its key (replayed: nothing delivered twice),
    within seconds instead of after the 120 s lease."""
    await owed_emails(pool, 1)
    proxy, via = postgres_proxy(database_url)
    try:
        cut = proxy.arm(Cut(b"SET status = 'sent', sent_at", mode="request"))
        sender_pool = await create_pool(via + "?statement_cache_size=0", min_size=1, max_size=2)
        try:
            async with httpx.AsyncClient() as http:
                sender = OutboxSender(
                    sender_pool, ResendTransport(http, resend.url, RESEND_KEY), Metrics(), requests_per_s=1000
                )
                stopping = anyio.Event()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(sender.run, stopping)
                    with anyio.fail_after(15):
                        while await pool.fetchval("SELECT count(*) FROM seatwatch_outbox WHERE status = 'sent'") < 1:
                            await anyio.sleep(0.1)
                    stopping.set()
                    sender.wake()
        finally:
            await sender_pool.close()
    finally:
        proxy.stop()
    assert cut.fired == 1
    assert len(resend.requests) == 2
    assert len({r.headers["Idempotency-Key"] for r in resend.requests}) == 1
    assert resend.delivered_to() == ["o0@example.edu"]
