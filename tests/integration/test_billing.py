"""The daemon's own Redis count is what Upstash bills: every command a script runs, not just the script call."""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING

import pytest

from daemon.errors import LockBusy
from daemon.jobs import Done, Job
from daemon.keys import Keys
from daemon.primitives.clients import RedisClients
from daemon.primitives.lock import CronLock
from daemon.primitives.queue import Queue
from daemon.primitives.scripts import SCRIPTS, Scripts, source
from daemon.primitives.usage import UsageLedger
from tests.support.monitor import Monitor, billable
from tests.support.shapes import RedisProc
from tests.support.wait import eventually

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture(scope="module")
def private_redis() -> Iterator[RedisProc]:
    """A redis-server nothing else talks to, so MONITOR sees only this test's commands."""
    server = RedisProc().start()
    yield server
    server.stop()


def test_every_script_is_wrapped_to_count_what_it_runs() -> None:
    """Each script's text shadows ``redis`` with the counting table and returns ``{calls, reply}``."""
    for name in SCRIPTS:
        text = source(name)
        assert text.startswith("local __redis, __calls = redis, 0\nlocal redis = setmetatable("), name
        assert text.rstrip().endswith("return {__calls, __reply}"), name


async def test_script_inner_commands_are_counted_as_billed(private_redis: RedisProc) -> None:
    """Over a window of lock and script calls, the ledger equals MONITOR's all-in count (inner commands too)."""
    clients = RedisClients(private_redis.url)
    monitor = Monitor(private_redis.port)
    try:
        keys = Keys("billing")
        startup = clients.client("startup")
        scripts = Scripts(startup)
        await scripts.load(startup)
        lock = CronLock(clients.client("lock"), keys, scripts, ttl_s=60, holder="billing")
        # The MONITOR thread reads behind the server: wait for a marker so nothing of the loading lands after start.
        await clients.ping()
        await eventually(lambda: any(cmd == "PING" for _, cmd, _ in monitor.lines), what="the marker PING")
        before = sum(clients.usage.total.values())
        start = time.time()
        grant = await lock.acquire(slot="2026-12-04T20:00")
        with pytest.raises(LockBusy):
            await lock.acquire()
        await lock.status()
        assert await lock.release(grant, slot="2026-12-04T20:00", slot_outcome="done", tick="{}")
        counted = sum(clients.usage.total.values()) - before
        top_level_calls = 4
        # What the server ran for these calls, inner commands included; the MONITOR thread may lag a little.
        await eventually(lambda: billable(monitor.commands(start)) >= counted, what="MONITOR caught up", timeout_s=5)
        seen = billable(monitor.commands(start))
        assert counted == seen, (monitor.lines, dict(clients.usage.total))
        assert counted > top_level_calls, "a script's inner commands went uncounted"
        assert billable(monitor.commands(start, top_level=True)) == top_level_calls
    finally:
        monitor.close()
        await clients.aclose()


async def test_queue_cycle_inner_commands_are_counted_as_billed(private_redis: RedisProc) -> None:
    """Over a window of queue calls (enqueue, read, cycle with settlement and fetch, heartbeat, maintenance,
    stats, dead-letter requeue), the ledger equals MONITOR's all-in count, the scripts' inner commands too."""
    clients = RedisClients(private_redis.url)
    monitor = Monitor(private_redis.port)
    try:
        keys = Keys("billing-queue")
        startup = clients.client("startup")
        scripts = Scripts(startup)
        await scripts.load(startup)
        queue = Queue(
            clients.client("queue"), clients.client("queue", blocking=True), keys, scripts, consumer="c1", batch_size=3
        )
        await queue.ensure_group()
        await clients.ping()
        await eventually(lambda: any(cmd == "PING" for _, cmd, _ in monitor.lines), what="the marker PING")
        before = sum(clients.usage.total.values())
        start = time.time()
        await queue.enqueue([("2261", str(10000 + n)) for n in range(5)])
        read = [j for j in await queue.read(1, 0.1) if isinstance(j, Job)]
        await queue.heartbeat([read[0].entry_id])
        done = [Done(read[0], "ack"), Done(read[1], "retry", delay_s=30, attempts=1), Done(read[2], "dead", error="x")]
        result = await queue.cycle([("s", ""), ("f", "")], done, [], fetch=1)
        assert len(result.fetched) == 2
        await queue.cycle([], [Done(j, "ack") for j in result.fetched], [])
        await queue.maintain()
        await queue.stats()
        await queue.requeue_dead()
        counted = sum(clients.usage.total.values()) - before
        await eventually(lambda: billable(monitor.commands(start)) >= counted, what="MONITOR caught up", timeout_s=5)
        seen = billable(monitor.commands(start))
        assert counted == seen, (monitor.lines, dict(clients.usage.total))
        assert counted > 2 * billable(monitor.commands(start, top_level=True)), "inner commands went uncounted"
    finally:
        monitor.close()
        await clients.aclose()


async def test_usage_flush_costs_one_command_and_today_sums_every_process(redis_url: str, keys: Keys) -> None:
    """A ledger flush writes the day's totals with one HSET (and one EXPIRE the first time a day is written);
    today() sums every process's fields by purpose, and equals what the processes counted, flushes included."""
    processes = [RedisClients(redis_url), RedisClients(redis_url)]
    try:
        ledgers = []
        for clients in processes:
            scripts = Scripts(clients.client("startup"))
            await scripts.load(clients.client("startup"))
            ledgers.append(UsageLedger(clients, keys, scripts, time.time))
        for ledger, clients in zip(ledgers, processes, strict=True):
            await clients.client("queue").get(keys.stream)
            before = clients.usage.total["usage"]
            assert await ledger.flush()
            assert clients.usage.total["usage"] - before == 2  # HSET and the day's EXPIRE
            await clients.client("queue").get(keys.stream)
            before = clients.usage.total["usage"]
            assert await ledger.flush()
            assert clients.usage.total["usage"] - before == 1  # HSET alone
        today = await ledgers[0].today()
        counted = collections.Counter[str]()
        for clients in processes:
            counted.update({p: n for p, n in clients.usage.total.items() if p != "admin"})
        assert today == dict(counted)
        # Nothing left to flush but today()'s own read (an admin command, counted after the flushes).
        assert [dict(clients.usage.unflushed) for clients in processes] == [{"admin": 1}, {}]
    finally:
        for clients in processes:
            await clients.aclose()
