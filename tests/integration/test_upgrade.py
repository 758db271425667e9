"""Upgrading in place: a daemon started on a Redis holding the old queue layout finishes that work.

The old layout kept one stream entry per section (fields id, term, class_nbr, attempts, enqueued_ms), a jobs
hash (job id -> entry id, or ``z`` while delayed) as the dedup index, and delayed jobs as members of the
delayed set named by job id with their payload in a hash. The tests write that layout directly, as the old
scripts did, then run the new consumer over it.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from daemon.primitives.breaker import BreakerConfig
from daemon.primitives.queue import Queue
from tests.support.consuming import Recorder, consuming, drained, make_consumer
from tests.support.queued import queued_ids
from tests.support.wait import eventually

if TYPE_CHECKING:
    from daemon.keys import Keys
    from daemon.primitives.clients import RedisClients
    from daemon.primitives.scripts import Scripts

TERM = "2261"
FAST_BREAKER = BreakerConfig(failures=3, recovery_s=1.0, successes=1, half_open_max=2, trial_ttl_s=3)


def job_id(n: int) -> str:
    return f"{TERM}-{20000 + n}"


async def old_entry(r: aioredis.Redis, keys: Keys, n: int, attempts: int = 0) -> str:
    """One section as the old queue_enqueue wrote it: a stream entry and its dedup index field."""
    fields = {
        "id": job_id(n),
        "term": TERM,
        "class_nbr": str(20000 + n),
        "attempts": str(attempts),
        "enqueued_ms": str(int(time.time() * 1000)),
    }
    eid: Any = await r.xadd(keys.stream, fields)  # type: ignore[arg-type]
    await r.hset(keys.jobs, job_id(n), eid)
    return str(eid)


async def old_delayed(r: aioredis.Redis, keys: Keys, n: int, due_in_ms: int, attempts: int) -> None:
    """One section waiting for its retry as the old q_delay kept it."""
    now_ms = int(time.time() * 1000)
    await r.zadd(keys.delayed, {job_id(n): now_ms + due_in_ms})
    payload = {"term": TERM, "class_nbr": str(20000 + n), "attempts": attempts, "enqueued_ms": now_ms}
    await r.hset(keys.delayed_payloads, job_id(n), json.dumps(payload))
    await r.hset(keys.jobs, job_id(n), "z")


async def old_layout(r: aioredis.Redis, keys: Keys) -> set[str]:
    """Sections 0-5 waiting, 6-7 read by the old daemon (host "old") and never acknowledged, 8 due for a
    retry, 9 due in a second; returns their ids."""
    await r.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    for n in range(8):
        await old_entry(r, keys, n)
    await r.xreadgroup(keys.group, "old", {keys.stream: ">"}, count=2)  # sections 0 and 1: in flight
    await old_delayed(r, keys, 8, due_in_ms=-1000, attempts=1)
    await old_delayed(r, keys, 9, due_in_ms=1000, attempts=1)
    return {job_id(n) for n in range(10)}


def new_queue(redis_clients: RedisClients, keys: Keys, scripts: Scripts, consumer: str) -> Queue:
    return Queue(
        redis_clients.client("queue"),
        redis_clients.client("queue", blocking=True),
        keys,
        scripts,
        consumer=consumer,
        visibility_timeout_s=1.0,
        max_attempts=3,
        breaker=FAST_BREAKER,
    )


async def test_a_new_daemon_finishes_every_section_of_the_old_layout(
    redis_url: str, redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """Waiting, in-flight (of the old daemon's name) and delayed sections of the old layout all run, each
    once, and the new daemon leaves nothing queued."""
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        owed = await old_layout(r, keys)
        handler = Recorder()
        queue = new_queue(redis_clients, keys, scripts, "old")  # the same host, upgraded
        async with consuming(make_consumer(queue, handler)):
            await eventually(lambda: {job for job, _ in handler.done} == owed, timeout_s=15, what="every section")
            await eventually(lambda: drained(r, keys), what="the queue to empty")
        assert sorted(job for job, _ in handler.done) == sorted(owed)  # each once
        attempts = dict(handler.done)
        # The in-flight deliveries of the old daemon were lost with it: each spent an attempt.
        assert (attempts[job_id(0)], attempts[job_id(1)], attempts[job_id(2)], attempts[job_id(8)]) == (2, 2, 1, 2)
    finally:
        await r.aclose()


async def test_old_in_flight_entries_of_a_gone_host_are_taken_over_and_nothing_is_enqueued_twice(
    redis_url: str, redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """A new daemon of another name takes the old host's in-flight entries after the visibility timeout; a
    tick during the upgrade skips every section the old layout still holds, so none is queued twice."""
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        owed = await old_layout(r, keys)
        queue = new_queue(redis_clients, keys, scripts, "new")
        ticked = await queue.enqueue([(TERM, str(20000 + n)) for n in range(12)])
        assert (ticked.added, ticked.skipped) == (2, 10)  # only the two sections the old layout did not hold
        assert await queued_ids(r, keys) == owed | {job_id(10), job_id(11)}
        handler = Recorder()
        async with consuming(make_consumer(queue, handler)):
            await eventually(
                lambda: {job for job, _ in handler.done} == owed | {job_id(10), job_id(11)},
                timeout_s=20,
                what="every section, the old host's after the visibility timeout",
            )
            await eventually(lambda: drained(r, keys), what="the queue to empty")
        assert len(handler.done) == 12  # each once
    finally:
        await r.aclose()
