"""Redis restarted empty while daemons run: the stream, its group, the breaker, the lock, the slot markers and
the fencing counter are gone. The daemons recover without a restart, the next tick re-enqueues, nothing owed
is lost (the outbox lives in Postgres).

What fencing means after the counter is lost (README, "Redis restarted empty"): tokens start again at 1, so
they are no longer increasing across the loss. A grant taken before the loss is still refused: the enqueue
compares its token with the lock's current metadata, which is gone (refused) or belongs to a new holder whose
token is a small new number (refused unless equal). Equality needs two losses within one tick; even then the
stale tick can only enqueue sections again, which the queue deduplicates and which never sends an email twice
(the claims are in Postgres). Fencing keeps a stale tick from doing work twice; exactly-once email never rests on it.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import TYPE_CHECKING

import pytest

from daemon.keys import Keys
from daemon.primitives.clients import RedisClients
from daemon.primitives.lock import CronLock
from daemon.primitives.queue import Queue
from daemon.primitives.scripts import Scripts
from tests.support.ledger import settled
from tests.support.procs import Daemons, daemon_env, quiet_cron, run_cli
from tests.support.seed import clear, watched
from tests.support.shapes import RedisProc
from tests.support.stubs import Reply, ResendStub, ScraperStub, section_data
from tests.support.wait import eventually

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    import asyncpg

pytestmark = pytest.mark.slow

TERM = "2261"


@pytest.fixture
def own_redis() -> Iterator[RedisProc]:
    """A private redis-server this test may restart empty (the shared one stays up for everyone else)."""
    server = RedisProc().start()
    yield server
    server.stop()


@pytest.fixture
async def own_clients(own_redis: RedisProc) -> AsyncIterator[RedisClients]:
    clients = RedisClients(own_redis.url)
    try:
        yield clients
    finally:
        await clients.aclose()


async def test_fencing_after_the_counter_is_lost(own_redis: RedisProc, own_clients: RedisClients) -> None:
    """After Redis loses everything, a grant from before is refused by the enqueue, the next grant starts at
    fence 1 again, the old holder's release does not free the new holder's lock, and the new holder enqueues."""
    keys = Keys("fence")
    scripts = Scripts(own_clients.client("startup"))
    await scripts.load(own_clients.client("startup"))
    queue = Queue(own_clients.client("queue"), own_clients.client("queue", blocking=True), keys, scripts, consumer="t")
    old_lock = CronLock(own_clients.client("lock"), keys, scripts, ttl_s=60, holder="old")
    for _ in range(3):
        await old_lock.release(await old_lock.acquire())
    old = await old_lock.acquire()
    assert old.fence == 4

    own_redis.restart_empty()
    await own_clients.pool.disconnect()  # this test's own connections died with the server
    await scripts.load(own_clients.client("startup"))  # not needed by the daemon (NOSCRIPT reloads); quicker here
    assert (await queue.enqueue([(TERM, "14000")], fence=old.fence)).fenced  # the lock it was checked against is gone

    new_lock = CronLock(own_clients.client("lock"), keys, scripts, ttl_s=60, holder="new")
    new = await new_lock.acquire()
    assert new.fence == 1  # the counter started again
    assert (await queue.enqueue([(TERM, "14000")], fence=old.fence)).fenced
    assert not await old_lock.release(old)  # owner-checked: the old grant cannot free the new holder's lock
    assert (await new_lock.status()).locked
    result = await queue.enqueue([(TERM, "14000")], fence=new.fence)
    assert (result.fenced, result.added) == (False, 1)
    assert await new_lock.release(new)


async def test_daemons_recover_from_redis_restarted_empty_and_lose_nothing(
    pool: asyncpg.Pool,
    own_redis: RedisProc,
    own_clients: RedisClients,
    database_url: str,
    scraper: ScraperStub,
    resend: ResendStub,
    daemons: Daemons,
) -> None:
    """Redis restarted empty while two daemons work through a tick: both stay up (no restart) and healthy again,
    the next tick re-enqueues what was lost, and every owed email is delivered exactly once."""
    await clear(pool)
    sections = [str(14100 + i) for i in range(12)]
    emails = await watched(pool, sections)
    for class_nbr in sections:
        scraper.script(TERM, class_nbr, Reply(200, {"success": True, "data": section_data(seats=2)}, delay_s=0.4))
    prefix = "restart"
    for n in range(2):
        env = daemon_env(
            redis_url=own_redis.url,
            database_url=database_url,
            prefix=prefix,
            scraper_url=scraper.url,
            resend_url=resend.url,
            health_port=None,
            SEATWATCH_CONCURRENCY="2",
            SEATWATCH_CONSUMER=f"d{n}",
            **quiet_cron(),
        )
        daemons.start(env)
    for proc in daemons.started:
        proc.wait_healthy()
    pids = [proc.process.pid for proc in daemons.started if proc.process is not None]
    assert run_cli("tick", "--group", "all", env=daemons.started[0].env).returncode == 0
    await eventually(lambda: len(scraper.requests) >= 3, 20, "scrapes in flight")

    own_redis.restart_empty()
    lost_at = time.monotonic()
    for proc in daemons.started:
        proc.wait_healthy(timeout_s=30)
    recovered_s = time.monotonic() - lost_at
    tick = run_cli("tick", "--group", "all", env=daemons.started[1].env)  # the next tick: the lost jobs come back
    assert tick.returncode == 0, tick.stderr
    assert f"{len(sections)} enqueued" in tick.stdout  # Redis really forgot: every section is new to it

    keys = Keys(prefix)
    scripts = Scripts(own_clients.client("startup"))
    queue = Queue(own_clients.client("queue"), own_clients.client("queue", blocking=True), keys, scripts, consumer="t")
    try:
        await eventually(lambda: settled(pool, queue, resend, len(emails), delayed=False), 40, "the ledger settled")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {resend.delivered_to()}\n{daemons.logs()}") from None
    await asyncio.sleep(0.5)
    assert collections.Counter(resend.delivered_to()) == collections.Counter(emails)
    assert [proc.process.pid for proc in daemons.started if proc.process is not None] == pids
    for proc in daemons.started:
        proc.assert_running()
    assert recovered_s < 30
    for proc in daemons.started:
        assert proc.stop() == 0
