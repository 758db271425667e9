"""Fault paths found in review: lost replies, failing releases, poison bytes, outbox pauses and key expiry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import anyio
import httpx
import pytest

from daemon.checks.consumer import Consumer
from daemon.checks.outbox import OutboxSender
from daemon.checks.settlement import _Unsent
from daemon.cron.scheduler import Scheduler, enqueue_under
from daemon.cron.slots import slot_id
from daemon.jobs import Done, Malformed
from daemon.primitives.breaker import BreakerConfig, CircuitBreaker
from daemon.primitives.clients import RedisClients
from daemon.primitives.lock import CronLock
from daemon.primitives.queue import Queue
from daemon.runtime.metrics import Metrics
from daemon.upstream.resend import ResendTransport
from tests.support.proxy import redis_proxy
from tests.support.queued import stream_sections
from tests.support.seed import add_user, add_watch, clear, owed_emails
from tests.support.stubs import RESEND_KEY, Reply, ResendStub
from tests.support.wait import eventually

if TYPE_CHECKING:
    import asyncpg

    from daemon.checks.pipeline import Ticket
    from daemon.keys import Keys
    from daemon.primitives.scripts import Scripts


UTC_ZONE = ZoneInfo("UTC")


def make_queue(clients: RedisClients, keys: Keys, scripts: Scripts, **kwargs: Any) -> Queue:
    return Queue(
        clients.client("queue"), clients.client("queue", blocking=True), keys, scripts, consumer="c1", **kwargs
    )


async def test_lock_acquire_retried_by_the_same_owner_gets_the_same_grant(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """An acquire whose reply was lost, retried with the same owner token, finds the lock already its own."""
    lock = CronLock(redis_clients.client("lock"), keys, scripts, ttl_s=60, holder="me")
    owner = lock.new_owner()
    first = await lock.acquire(slot="2026-11-29T00:00Z", owner=owner)
    again = await lock.acquire(slot="2026-11-29T00:00Z", owner=owner)
    assert (again.owner, again.fence, again.acquired_at_ms) == (first.owner, first.fence, first.acquired_at_ms)
    assert await lock.release(again, slot="2026-11-29T00:00Z", slot_outcome="done")


async def test_a_cycle_retried_under_its_id_changes_nothing_twice(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """The same cycle id twice: breaker failures count once, a poison entry is dead-lettered once."""
    queue = make_queue(redis_clients, keys, scripts, breaker=BreakerConfig(failures=5))
    await queue.ensure_group()
    poison = Malformed("0-1", {"junk": "x"}, "malformed entry: no term or class_nbr")
    outcomes = [("f", ""), ("f", "")]
    first = await queue.cycle(outcomes, [Done(poison, "poison", error=poison.reason)], [], cycle_id="abc123")
    second = await queue.cycle(outcomes, [Done(poison, "poison", error=poison.reason)], [], cycle_id="abc123")
    assert first == second
    assert first.breaker.failures == 2
    breaker = CircuitBreaker(redis_clients.client("breaker"), keys, scripts, BreakerConfig(failures=5))
    assert (await breaker.status()).failures == 2
    assert await redis_clients.client("admin").xlen(keys.dead_letters) == 1


async def test_invalid_utf8_entry_is_dead_lettered_and_the_stream_flows(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """Bytes that are not UTF-8 in a stream entry go to the dead letters; the job behind it still runs."""
    queue = make_queue(redis_clients, keys, scripts, visibility_timeout_s=5)
    await queue.ensure_group()
    await redis_clients.client("admin").execute_command(
        "XADD", keys.stream, "*", "id", b"\xff\xfe", "term", "2261", "class_nbr", "12431"
    )
    await queue.enqueue([("2261", "12433")])
    done: list[str] = []

    async def handler(ticket: Ticket) -> None:
        done.append(ticket.job.id)

    consumer = Consumer(queue, handler, concurrency=2, idle_block_s=1, idle_maintenance_s=5, settle_linger_s=0.01)
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer.run, stopping)
        with anyio.fail_after(10):
            while not done or await redis_clients.client("admin").xlen(keys.dead_letters) == 0:
                await anyio.sleep(0.05)
        stopping.set()
    dead = await queue.dead_letters()
    assert done == ["2261-12433"]
    # The same reason whichever path took it (the blocking read or the settle script).
    assert len(dead) == 1
    assert dead[0][1]["error"] == "malformed entry: id does not match term and class_nbr"


async def test_a_failing_release_does_not_take_the_scheduler_down(
    redis_url: str, redis_clients: RedisClients, keys: Keys, scripts: Scripts, pool: asyncpg.Pool
) -> None:
    """The tick's work is done and kept even when releasing the lock fails; the lock then expires by itself."""
    await clear(pool)
    user = await add_user(pool, "r@example.edu")
    await add_watch(pool, user, "2261", "12430")
    queue = make_queue(redis_clients, keys, scripts)
    # The lock talks to Redis through a proxy; the outage arrives between enqueue and release: the tick is held
    # at its read of the watches (a table lock) while the proxy is cut, then let go.
    proxy, via = redis_proxy(redis_url)
    lock_clients = RedisClients(via)
    lock = CronLock(lock_clients.client("lock"), keys, scripts, ttl_s=2, holder="me")
    scheduler = Scheduler(
        cron="* * * * *",
        tz=UTC_ZONE,
        stagger="none",
        grace_s=60,
        lock=lock,
        queue=queue,
        pool=pool,
        metrics=Metrics(),
    )
    slot = datetime.now(UTC).replace(second=0, microsecond=0)
    admin = redis_clients.client("admin")
    try:
        async with pool.acquire() as blocker, anyio.create_task_group() as tg:
            holding = blocker.transaction()
            await holding.start()
            await blocker.execute("LOCK TABLE class_watches IN ACCESS EXCLUSIVE MODE")
            tg.start_soon(scheduler.run_slot, slot, anyio.Event())
            await eventually(lambda: admin.exists(keys.lock), what="the cron lock taken")
            proxy.cut()
            await holding.commit()
    finally:
        await lock_clients.aclose()
        proxy.stop()
    assert scheduler.last_tick is not None
    assert scheduler.last_tick.enqueued == 1
    assert scheduler.holding is None
    assert not scheduler.overdue()
    assert await admin.exists(keys.lock)  # not released: it expires by itself


async def test_a_slot_skipped_beyond_the_grace_degrades_until_the_next_tick(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts, pool: asyncpg.Pool
) -> None:
    """A slot that could not run within its grace leaves the scheduler overdue until a later slot runs."""
    await clear(pool)
    queue = make_queue(redis_clients, keys, scripts)
    lock = CronLock(redis_clients.client("lock"), keys, scripts, ttl_s=50, holder="me")
    blocker = CronLock(redis_clients.client("lock"), keys, scripts, ttl_s=50, holder="someone-else")
    scheduler = Scheduler(
        cron="* * * * *", tz=UTC_ZONE, stagger="none", grace_s=1, lock=lock, queue=queue, pool=pool, metrics=Metrics()
    )
    held = await blocker.acquire()
    old_slot = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=1)
    await scheduler.run_slot(old_slot, anyio.Event())  # busy lock, grace over: given up
    assert scheduler.overdue()
    await blocker.release(held)
    await scheduler.run_slot(datetime.now(UTC).replace(second=0, microsecond=0), anyio.Event())
    assert not scheduler.overdue()
    assert scheduler.last_tick is not None
    assert scheduler.last_tick.slot == slot_id(datetime.now(UTC).replace(second=0, microsecond=0))


# -- the outbox ---------------------------------------------------------------------------------------------


async def test_a_429_pauses_every_batch_not_just_its_own(pool: asyncpg.Pool, resend: ResendStub) -> None:
    """After a 429 with Retry-After the sender sends nothing at all until the pause is over."""
    await owed_emails(pool, 2)
    resend.script(Reply(429, {"name": "rate_limit_exceeded", "message": "slow down"}, {"Retry-After": "30"}))
    async with httpx.AsyncClient() as http:
        sender = OutboxSender(pool, ResendTransport(http, resend.url, RESEND_KEY), Metrics(), requests_per_s=1000)
        assert await sender.send_one()
        assert not await sender.send_one()
    assert len(resend.requests) == 1
    assert await pool.fetchval("SELECT count(*) FROM seatwatch_outbox WHERE batch_key IS NULL") == 1


async def test_an_old_batch_nothing_could_have_delivered_goes_again_under_a_new_key(
    pool: asyncpg.Pool, resend: ResendStub
) -> None:
    """At the key's expiry a batch that only ever got 429s is re-formed under a new key and then delivered."""
    await owed_emails(pool, 1)
    resend.script(Reply(429, {"name": "rate_limit_exceeded", "message": "quota"}, {"Retry-After": "1"}))
    async with httpx.AsyncClient() as http:
        sender = OutboxSender(pool, ResendTransport(http, resend.url, RESEND_KEY), Metrics(), requests_per_s=1000)
        await sender.send_one()
        await pool.execute(
            "UPDATE seatwatch_outbox_batches SET created_at = now() - interval '24 hours', next_attempt_at = now()"
        )
        resend.script(Reply(429, {"name": "rate_limit_exceeded", "message": "quota"}, {"Retry-After": "0"}))
        sender._not_before = 0  # the test does not wait out the pause
        await sender.send_one()
        sender._not_before = 0
        await sender.send_one()
    keys = [r.headers["Idempotency-Key"] for r in resend.requests]
    assert len(keys) == 3
    assert keys[0] == keys[1] != keys[2]
    assert resend.delivered_to() == ["o0@example.edu"]
    assert await pool.fetchval("SELECT status FROM seatwatch_outbox") == "sent"


async def test_an_old_batch_that_may_have_been_delivered_is_failed_not_resent(
    pool: asyncpg.Pool, resend: ResendStub
) -> None:
    """At the key's expiry a batch that once got no clear answer (a 500) is marked failed, never re-keyed."""
    await owed_emails(pool, 1)
    resend.script(Reply(500, {"name": "internal_server_error", "message": "?"}))
    async with httpx.AsyncClient() as http:
        sender = OutboxSender(pool, ResendTransport(http, resend.url, RESEND_KEY), Metrics(), requests_per_s=1000)
        await sender.send_one()
        await pool.execute(
            "UPDATE seatwatch_outbox_batches SET created_at = now() - interval '24 hours', next_attempt_at = now()"
        )
        resend.script(Reply(503, {"name": "internal_server_error", "message": "still down"}))
        await sender.send_one()
        assert not await sender.send_one()
    row = await pool.fetchrow("SELECT status, last_error FROM seatwatch_outbox")
    assert row is not None
    assert row["status"] == "failed"
    assert "maybe delivered once" in row["last_error"]
    assert len({r.headers["Idempotency-Key"] for r in resend.requests}) == 1


async def run_until(consumer: Consumer, done: list[str], want: int) -> None:
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer.run, stopping)
        with anyio.fail_after(15):
            while len(done) < want:
                await anyio.sleep(0.05)
        stopping.set()


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("attempts", "nan", "malformed entry: attempts or enqueued_ms is not a whole number"),
        ("attempts", "1e3", "malformed entry: attempts or enqueued_ms is not a whole number"),
        ("class_nbr", "10001 ", "malformed entry: term or class_nbr is not printable ASCII"),
    ],
)
async def test_entries_lua_and_python_read_differently_are_rejected_by_both_paths(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts, field: str, value: str, reason: str
) -> None:
    """A busy consumer (the settle script reads) and an idle one (the blocking read) reject the same entries."""
    queue = make_queue(redis_clients, keys, scripts, visibility_timeout_s=5)
    await queue.ensure_group()
    admin = redis_clients.client("admin")
    entry = {"id": "2261-10001", "term": "2261", "class_nbr": "10001", "attempts": "0", "enqueued_ms": "0"}
    entry[field] = value
    if field == "class_nbr":
        entry["id"] = f"2261-{value}"
    done: list[str] = []

    async def handler(ticket: Ticket) -> None:
        done.append(ticket.job.id)

    # Busy: jobs ahead of it keep the consumer on the script path when it reaches the bad entry.
    await queue.enqueue([("2261", str(20000 + i)) for i in range(6)])
    await admin.xadd(keys.stream, entry)  # type: ignore[arg-type]
    await queue.enqueue([("2261", "20100")])
    consumer = Consumer(queue, handler, concurrency=2, idle_block_s=1, idle_maintenance_s=5, settle_linger_s=0.01)
    await run_until(consumer, done, 7)
    # Idle: the blocking read wakes on the bad entry alone.
    consumer = Consumer(queue, handler, concurrency=2, idle_block_s=1, idle_maintenance_s=5, settle_linger_s=0.01)
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer.run, stopping)
        await eventually(lambda: consumer._reader_waiting_on_stream, what="the reader blocking on the stream")
        await admin.xadd(keys.stream, entry)  # type: ignore[arg-type]
        await queue.enqueue([("2261", "20200")])
        with anyio.fail_after(15):
            while len(done) < 8:
                await anyio.sleep(0.05)
        stopping.set()
    reasons = [f["error"] for _, f in await queue.dead_letters()]
    assert reasons == [reason, reason]
    assert len(done) == 8


async def test_a_vanished_group_is_recreated_while_busy(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """The stream deleted mid-run: the next settle call recreates the group and later jobs run."""
    queue = make_queue(redis_clients, keys, scripts, visibility_timeout_s=5)
    await queue.ensure_group()
    done: list[str] = []
    gate = anyio.Event()

    async def handler(ticket: Ticket) -> None:
        done.append(ticket.job.id)
        await gate.wait()

    consumer = Consumer(queue, handler, concurrency=2, idle_block_s=1, idle_maintenance_s=5, settle_linger_s=0.01)
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer.run, stopping)
        await queue.enqueue([("2261", "30001"), ("2261", "30002")])
        with anyio.fail_after(10):
            while len(done) < 2:
                await anyio.sleep(0.05)
        await redis_clients.client("admin").delete(keys.stream, keys.jobs)  # gone with its group
        await queue.enqueue([("2261", str(30010 + i)) for i in range(5)])
        gate.set()
        with anyio.fail_after(15):
            while len(done) < 7:
                await anyio.sleep(0.05)
        stopping.set()
    assert sorted(done[2:]) == [f"2261-{30010 + i}" for i in range(5)]
    assert consumer.state.redis_ok


async def test_jobs_admitted_by_a_cycle_whose_reply_was_lost_go_back_to_the_queue(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """A cycle that ran (fetching and admitting two jobs) but whose reply never arrived is confirmed by its id
    at the next settle, and the jobs it admitted go back to the stream with no attempt spent, not stranded."""
    queue = make_queue(redis_clients, keys, scripts)
    await queue.ensure_group()
    await queue.enqueue([("2261", "40001"), ("2261", "40002")])
    lost = await queue.cycle([], [], [], fetch=2, cycle_id="lost-reply")
    assert lost.admitted == 2

    async def never_called(ticket: Ticket) -> None:
        raise AssertionError("nothing runs here")

    consumer = Consumer(queue, never_called, concurrency=2)
    consumer.settlement.unconfirmed = _Unsent("lost-reply", [], [], [], 2)
    result = await consumer.settlement.cycle([], keep_trying=lambda: False)
    assert result is not None
    assert consumer.settlement.unconfirmed is None
    admin = redis_clients.client("admin")
    queued = await stream_sections(admin, keys)
    assert sorted((job, a) for _, job, a in queued) == [("2261-40001", 0), ("2261-40002", 0)]
    assert (await admin.xpending(keys.stream, keys.group))["pending"] == 0


async def test_a_tick_skips_sections_that_cannot_travel_as_jobs(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """A watched class number with a blank in it is skipped (and said so) instead of dead-lettered every tick."""
    await clear(pool)
    user = await add_user(pool, "w@example.edu")
    await add_watch(pool, user, "2261", "10002")
    await add_watch(pool, user, "2261", "10004 ")
    lock = CronLock(redis_clients.client("lock"), keys, scripts, ttl_s=30, holder="me")
    grant = await lock.acquire()
    result = await enqueue_under(grant, pool, make_queue(redis_clients, keys, scripts), "all", None)
    await lock.release(grant)
    assert (result.sections, result.enqueued) == (1, 1)
    assert "1 watched sections have unusable term or class numbers" in caplog.text
