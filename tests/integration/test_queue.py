"""The queue against real Redis, in one process: dedup, retries, dead letters, the breaker, trimming, shutdown.

Each consumer runs the real ``Consumer`` loops in an anyio task group; its handler records what it saw in a
Python list. Redis is inspected with a plain client that is not counted. Tests that kill real processes
live in ``test_queue_processes.py``.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import redis.asyncio as aioredis

from daemon.errors import DeferJob, PermanentJobError, RetryableJobError
from daemon.jobs import Done, Malformed
from daemon.primitives import queue as queue_module
from daemon.primitives.breaker import BreakerConfig, CircuitBreaker
from daemon.primitives.queue import Queue
from tests.support.consuming import Recorder, consuming, drained, make_consumer, pending_count
from tests.support.entries import MALFORMED, VALID, fields
from tests.support.queued import delayed_sections, stream_sections
from tests.support.wait import eventually

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from daemon.checks.pipeline import Ticket
    from daemon.keys import Keys
    from daemon.primitives.clients import RedisClients
    from daemon.primitives.scripts import Scripts

TERM = "2261"
FAST_BREAKER = BreakerConfig(failures=3, recovery_s=1.0, successes=1, half_open_max=2, trial_ttl_s=3)


def section(n: int) -> tuple[str, str]:
    return TERM, str(10000 + n)


def job_id(n: int) -> str:
    return f"{TERM}-{10000 + n}"


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client for looking at the keys; its commands are not counted."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def make_queue(redis_clients: RedisClients, keys: Keys, scripts: Scripts) -> Callable[..., Queue]:
    def make(
        consumer: str = "c1",
        *,
        visibility_timeout_s: float = 3.0,
        max_attempts: int = 3,
        breaker: BreakerConfig = FAST_BREAKER,
        batch_size: int = queue_module.BATCH_SIZE,
    ) -> Queue:
        return Queue(
            redis_clients.client("queue"),
            redis_clients.client("queue", blocking=True),
            keys,
            scripts,
            consumer=consumer,
            visibility_timeout_s=visibility_timeout_s,
            max_attempts=max_attempts,
            breaker=breaker,
            batch_size=batch_size,
        )

    return make


async def queued_now(r: aioredis.Redis, keys: Keys, expected: set[str]) -> bool:
    return {job for _eid, job, _a in await stream_sections(r, keys)} | set(await delayed_sections(r, keys)) == expected


async def has_delayed(r: aioredis.Redis, keys: Keys, job: str) -> bool:
    return job in await delayed_sections(r, keys)


async def xlen_is(r: aioredis.Redis, key: str, n: int) -> bool:
    return int(await r.xlen(key)) == n


async def dead_letters(r: aioredis.Redis, keys: Keys) -> list[dict[str, str]]:
    entries: Any = await r.xrange(keys.dead_letters)
    return [dict(fields) for _eid, fields in entries]


# -- enqueue and dedup -----------------------------------------------------------------------------------


async def test_enqueue_twice_while_waiting_adds_one_entry(make_queue: Callable[..., Queue], r: aioredis.Redis) -> None:
    """A section enqueued twice (in one call and in two) while its job waits is queued once, in one batch entry."""
    queue = make_queue()
    await queue.ensure_group()
    first = await queue.enqueue([section(1), section(1), section(2)])
    second = await queue.enqueue([section(1), section(2)])
    assert (first.added, first.skipped, first.entries) == (2, 1, 1)
    assert (second.added, second.skipped, second.entries) == (0, 2, 0)
    assert await r.xlen(queue.keys.stream) == 1
    queued = await stream_sections(r, queue.keys)
    assert [(job, attempts) for _eid, job, attempts in queued] == [(job_id(1), 0), (job_id(2), 0)]


async def test_running_job_is_not_enqueued_again_until_acknowledged(
    make_queue: Callable[..., Queue], r: aioredis.Redis
) -> None:
    """While a job runs a new enqueue skips it; once acknowledged the next enqueue adds it again."""
    queue = make_queue()
    await queue.ensure_group()
    release = anyio.Event()

    async def hold(ticket: Ticket) -> None:
        await release.wait()

    handler = Recorder(hold)
    async with consuming(make_consumer(queue, handler)):
        await queue.enqueue([section(1)])
        await eventually(lambda: handler.started, what="the job to start")
        assert (await queue.enqueue([section(1)])).skipped == 1
        assert await r.xlen(queue.keys.stream) == 1
        release.set()
        await eventually(lambda: drained(r, queue.keys), what="the ack")
        again = await queue.enqueue([section(1)])
        assert (again.added, again.skipped) == (1, 0)
        await eventually(lambda: len(handler.done) == 2, what="the second run")
    assert handler.done == [(job_id(1), 1), (job_id(1), 1)]


async def test_job_delayed_for_retry_is_not_enqueued_again(make_queue: Callable[..., Queue], r: aioredis.Redis) -> None:
    """A job waiting in the delayed set for its retry is skipped by enqueue, then retried exactly once."""
    queue = make_queue()
    await queue.ensure_group()

    async def fail_first(ticket: Ticket) -> None:
        if ticket.job.attempt == 1:
            raise RetryableJobError("scraper 502", delay_s=1.0)

    handler = Recorder(fail_first)
    async with consuming(make_consumer(queue, handler)):
        await queue.enqueue([section(1)])
        await eventually(lambda: has_delayed(r, queue.keys, job_id(1)), what="the job to be delayed")
        skipped = await queue.enqueue([section(1)])
        assert (skipped.added, skipped.skipped) == (0, 1)
        assert await r.xlen(queue.keys.stream) == 0
        await eventually(lambda: handler.done, what="the retry")
        await anyio.sleep(0.3)
    assert handler.started == [(job_id(1), 1), (job_id(1), 2)]
    assert handler.done == [(job_id(1), 2)]
    assert await drained(r, queue.keys)


# -- retries and dead letters ----------------------------------------------------------------------------


async def test_job_failing_twice_then_succeeding_runs_attempts_1_2_3(
    make_queue: Callable[..., Queue], r: aioredis.Redis
) -> None:
    """Two retryable failures then a success: deliveries carry attempts 1, 2, 3 and nothing is dead-lettered."""
    queue = make_queue(max_attempts=3)
    await queue.ensure_group()

    async def fail_twice(ticket: Ticket) -> None:
        if ticket.job.attempt < 3:
            raise RetryableJobError(f"flaky {ticket.job.attempt}")

    handler = Recorder(fail_twice)
    consumer = make_consumer(queue, handler)
    async with consuming(consumer):
        await queue.enqueue([section(1)])
        await eventually(lambda: handler.done, what="the third attempt")
        await eventually(lambda: drained(r, queue.keys), what="the ack")
    assert handler.started == [(job_id(1), 1), (job_id(1), 2), (job_id(1), 3)]
    assert consumer.state.retried == 2
    assert consumer.state.completed == 1
    assert await dead_letters(r, queue.keys) == []


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (RetryableJobError("scraper timed out"), "scraper timed out"),
        (ValueError("bad body"), "ValueError: bad body"),
    ],
    ids=["retryable", "unexpected"],
)
async def test_always_failing_job_is_dead_lettered_after_max_attempts(
    make_queue: Callable[..., Queue], r: aioredis.Redis, error: Exception, expected: str
) -> None:
    """A job that always fails runs max_attempts times, then is dead-lettered once with its last error."""
    queue = make_queue(max_attempts=3)
    await queue.ensure_group()

    async def always_fail(ticket: Ticket) -> None:
        raise error

    handler = Recorder(always_fail)
    async with consuming(make_consumer(queue, handler)):
        await queue.enqueue([section(1)])
        await eventually(lambda: r.xlen(queue.keys.dead_letters), what="the dead letter")
        await anyio.sleep(0.5)  # long enough for a (wrong) fourth attempt: retry_base_s is 0.05
    assert handler.started == [(job_id(1), 1), (job_id(1), 2), (job_id(1), 3)]
    letters = await dead_letters(r, queue.keys)
    assert len(letters) == 1
    assert letters[0]["id"] == job_id(1)
    assert (letters[0]["term"], letters[0]["class_nbr"]) == section(1)
    assert letters[0]["attempts"] == "3"
    assert letters[0]["error"] == expected
    assert await drained(r, queue.keys)


async def test_a_failing_section_is_dead_lettered_alone_and_never_holds_back_its_batchmates(
    make_queue: Callable[..., Queue], r: aioredis.Redis
) -> None:
    """In one batch entry, a section that keeps failing is retried and dead-lettered alone; its four
    batchmates run once each and are acknowledged with the first settlement, before its retries end."""
    queue = make_queue(max_attempts=3)
    await queue.ensure_group()

    async def section_3_fails(ticket: Ticket) -> None:
        if ticket.job.id == job_id(3):
            raise RetryableJobError("scraper 502", delay_s=0.5)

    handler = Recorder(section_3_fails)
    async with consuming(make_consumer(queue, handler)):
        added = await queue.enqueue([section(n) for n in range(1, 6)])
        assert added.entries == 1
        await eventually(lambda: len(handler.done) == 4, what="the batchmates")
        # The batch is settled: the batchmates are gone from Redis while section 3 waits for its retry.
        await eventually(lambda: queued_now(r, queue.keys, {job_id(3)}), what="only the failing section to stay queued")
        assert [run for run in handler.started if run[0] == job_id(3)] == [(job_id(3), 1)]
        await eventually(lambda: r.xlen(queue.keys.dead_letters), what="the dead letter")
        await anyio.sleep(0.3)
    assert sorted(handler.done) == [(job_id(n), 1) for n in (1, 2, 4, 5)]
    assert [run for run in handler.started if run[0] == job_id(3)] == [(job_id(3), a) for a in (1, 2, 3)]
    letters = await dead_letters(r, queue.keys)
    assert [(d["id"], d["attempts"]) for d in letters] == [(job_id(3), "3")]
    assert await drained(r, queue.keys)


async def test_a_malformed_section_in_a_batch_is_dead_lettered_alone(
    make_queue: Callable[..., Queue], r: aioredis.Redis
) -> None:
    """A batch entry with one section that is not a job: that section becomes a dead letter, the others run."""
    queue = make_queue()
    await queue.ensure_group()
    batch = json.dumps([["2261", "10001", 0], ["22 61", "10002", 0], ["2261", "10003", 0]])
    await r.xadd(queue.keys.stream, {"batch": batch, "enqueued_ms": "1"})
    handler = Recorder()
    async with consuming(make_consumer(queue, handler)):
        await eventually(lambda: len(handler.done) == 2, what="the two good sections")
        await eventually(lambda: drained(r, queue.keys), what="the entry's settlement")
    assert sorted(handler.done) == [(job_id(1), 1), (job_id(3), 1)]
    letters = await dead_letters(r, queue.keys)
    assert [(d["error"], json.loads(d["raw"])) for d in letters] == [
        ("malformed entry: term or class_nbr is not printable ASCII", {"section": '["22 61","10002",0]'})
    ]


async def test_permanent_error_dead_letters_at_once(make_queue: Callable[..., Queue], r: aioredis.Redis) -> None:
    """PermanentJobError dead-letters the job on its first attempt with the error text; no retry."""
    queue = make_queue(max_attempts=5)
    await queue.ensure_group()

    async def reject(ticket: Ticket) -> None:
        raise PermanentJobError("scraper said 400: no such term")

    handler = Recorder(reject)
    consumer = make_consumer(queue, handler)
    async with consuming(consumer):
        await queue.enqueue([section(1)])
        await eventually(lambda: r.xlen(queue.keys.dead_letters), what="the dead letter")
        await anyio.sleep(0.3)
    assert handler.started == [(job_id(1), 1)]
    letters = await dead_letters(r, queue.keys)
    assert [(d["id"], d["attempts"], d["error"]) for d in letters] == [
        (job_id(1), "1", "scraper said 400: no such term")
    ]
    assert consumer.state.dead_lettered == 1
    assert await drained(r, queue.keys)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"foo": "bar"}, "malformed entry: no term or class_nbr"),
        (
            {"id": "2261-99999", "term": "2261", "class_nbr": "12345", "attempts": "0", "enqueued_ms": "1"},
            "malformed entry: id does not match term and class_nbr",
        ),
        (
            {"id": "2261-12345", "term": "2261", "class_nbr": "12345", "attempts": "x", "enqueued_ms": "1"},
            "malformed entry: attempts or enqueued_ms is not a whole number",
        ),
    ],
    ids=["no-fields", "id-mismatch", "bad-attempts"],
)
async def test_malformed_entry_is_dead_lettered_and_stream_keeps_flowing(
    make_queue: Callable[..., Queue], r: aioredis.Redis, fields: dict[str, str], reason: str
) -> None:
    """A raw entry that is not a job goes to the dead letters at once with the reason; later jobs complete."""
    queue = make_queue()
    await queue.ensure_group()
    poison_id = await r.xadd(queue.keys.stream, fields)  # type: ignore[arg-type]
    handler = Recorder()
    async with consuming(make_consumer(queue, handler)):
        await queue.enqueue([section(n) for n in range(5)])
        await eventually(lambda: len(handler.done) == 5, what="the jobs behind the poison entry")
        await eventually(lambda: drained(r, queue.keys), what="the stream to empty")
    assert sorted(handler.done) == [(job_id(n), 1) for n in range(5)]
    letters = await dead_letters(r, queue.keys)
    assert len(letters) == 1
    assert letters[0]["error"] == reason
    assert letters[0]["entry"] == poison_id
    raw: Any = json.loads(letters[0]["raw"])
    assert raw == fields


# -- the breaker and deferral ----------------------------------------------------------------------------


async def test_breaker_denied_job_is_deferred_without_spending_attempts(
    make_queue: Callable[..., Queue], redis_clients: RedisClients, keys: Keys, scripts: Scripts, r: aioredis.Redis
) -> None:
    """With the breaker open the job waits, unrun and with no attempt spent, and runs as attempt 1 after recovery."""
    breaker = CircuitBreaker(redis_clients.client("breaker"), keys, scripts, FAST_BREAKER)
    await breaker.record([("f", "")] * FAST_BREAKER.failures)
    opened_at = time.monotonic()
    assert (await breaker.status()).state == "OPEN"

    queue = make_queue(max_attempts=1)  # a spent attempt would dead-letter it
    await queue.ensure_group()
    handler = Recorder()
    consumer = make_consumer(queue, handler)
    async with consuming(consumer):
        await queue.enqueue([section(1)])
        await eventually(lambda: has_delayed(r, queue.keys, job_id(1)), what="the job to be deferred")
        assert handler.started == []
        assert (await delayed_sections(r, queue.keys))[job_id(1)][1] == 0
        await eventually(lambda: handler.done, what="the job to run after recovery")
        ran_after_s = time.monotonic() - opened_at
        await eventually(lambda: drained(r, queue.keys), what="the ack")
    assert ran_after_s >= FAST_BREAKER.recovery_s - 0.1
    assert handler.done == [(job_id(1), 1)]
    assert handler.tickets[0].trial != ""  # it ran as a half-open trial
    assert consumer.state.deferred >= 1
    assert await dead_letters(r, queue.keys) == []
    assert (await breaker.status()).state == "CLOSED"  # its success closed the breaker


async def test_defer_job_does_not_spend_an_attempt(make_queue: Callable[..., Queue], r: aioredis.Redis) -> None:
    """DeferJob puts the job back for later with the same attempt number, even when max_attempts is 1."""
    queue = make_queue(max_attempts=1)
    await queue.ensure_group()

    deliveries: list[int] = []

    async def defer_twice(ticket: Ticket) -> None:
        deliveries.append(ticket.job.attempt)
        if len(deliveries) <= 2:
            raise DeferJob("scraper rate limited", delay_s=0.1)

    handler = Recorder(defer_twice)
    consumer = make_consumer(queue, handler)
    async with consuming(consumer):
        await queue.enqueue([section(1)])
        await eventually(lambda: handler.done, what="the job to run after two deferrals")
        await eventually(lambda: drained(r, queue.keys), what="the ack")
    assert handler.started == [(job_id(1), 1)] * 3
    assert consumer.state.deferred == 2
    assert await dead_letters(r, queue.keys) == []


# -- dead-letter administration and stats ----------------------------------------------------------------


async def test_requeue_dead_purge_dead_and_dead_letters(make_queue: Callable[..., Queue], r: aioredis.Redis) -> None:
    """dead_letters lists them; requeue_dead puts jobs back once with fresh attempts; purge_dead drops the rest."""
    queue = make_queue()
    await queue.ensure_group()
    rejected: set[str] = set()

    async def reject_once(ticket: Ticket) -> None:
        if ticket.job.id not in rejected:
            rejected.add(ticket.job.id)
            raise PermanentJobError("gone")

    await r.xadd(queue.keys.stream, {"junk": "1"})
    await queue.enqueue([section(1), section(2), section(3)])
    handler = Recorder(reject_once)
    async with consuming(make_consumer(queue, handler)):
        await eventually(lambda: xlen_is(r, queue.keys.dead_letters, 4), what="four dead letters")
        await eventually(lambda: drained(r, queue.keys), what="the stream to empty")

    listed = await queue.dead_letters()
    assert len(listed) == 4
    by_id = {fields["id"]: eid for eid, fields in listed if fields["id"]}
    assert set(by_id) == {job_id(1), job_id(2), job_id(3)}
    assert {fields["error"] for _eid, fields in listed if fields["id"]} == {"gone"}
    assert len(await queue.dead_letters(count=2)) == 2

    await queue.enqueue([section(3)])  # the next tick already queued section 3 again
    one = await queue.requeue_dead([by_id[job_id(1)], "0-1"])
    assert one == {"requeued": 1, "already_queued": 0, "invalid": 0, "missing": 1}
    rest = await queue.requeue_dead()
    assert rest == {"requeued": 1, "already_queued": 1, "invalid": 1, "missing": 0}
    queued = await stream_sections(r, queue.keys)
    assert sorted(job for _eid, job, _a in queued) == [job_id(1), job_id(2), job_id(3)]
    assert {attempts for _eid, _job, attempts in queued} == {0}

    remaining = await queue.dead_letters()
    assert len(remaining) == 1  # the junk entry has no job to requeue and stays
    assert json.loads(remaining[0][1]["raw"]) == {"junk": "1"}

    async with consuming(make_consumer(queue, handler)):
        await eventually(lambda: len(handler.done) == 3, what="the requeued jobs")
        await eventually(lambda: drained(r, queue.keys), what="the acks")
    assert sorted(handler.done) == [(job_id(n), 1) for n in (1, 2, 3)]

    assert await queue.purge_dead() == 1
    assert await queue.dead_letters() == []
    assert await r.xlen(queue.keys.dead_letters) == 0


async def test_stats_counts_waiting_pending_delayed_and_dead(make_queue: Callable[..., Queue]) -> None:
    """stats reports sections waiting, pending (read, unsettled), delayed with its due time, and dead letters."""
    queue = make_queue(batch_size=3)
    await queue.ensure_group()
    empty = await queue.stats()
    assert empty.as_dict() == {"waiting": 0, "pending": 0, "delayed": 0, "dead_letters": 0}
    assert empty.next_due_in_s is None

    await queue.enqueue([section(n) for n in range(5)])  # two entries: three sections, then two
    read = await queue.read(1, 0.1)
    jobs = [j for j in read if not isinstance(j, Malformed)]
    assert len(jobs) == 3
    stats = await queue.stats()
    assert stats.as_dict() == {"waiting": 2, "pending": 3, "delayed": 0, "dead_letters": 0}

    await queue.cycle(
        [],
        [
            Done(jobs[0], "retry", delay_s=30, error="later", attempts=1),
            Done(jobs[1], "dead", error="gone", attempts=1),
            Done(jobs[2], "ack"),
        ],
        [],
    )
    stats = await queue.stats()
    assert stats.as_dict() == {"waiting": 2, "pending": 0, "delayed": 1, "dead_letters": 1}
    assert stats.next_due_in_s is not None
    assert 28 <= stats.next_due_in_s <= 30


async def test_stream_holds_only_outstanding_entries(make_queue: Callable[..., Queue], r: aioredis.Redis) -> None:
    """Acknowledged entries are deleted: after draining 60 jobs (three batch entries) XLEN is 0."""
    queue = make_queue(visibility_timeout_s=60, batch_size=20)  # no reclaim in the test could hide an entry
    await queue.ensure_group()
    await queue.enqueue([section(n) for n in range(60)])
    assert await r.xlen(queue.keys.stream) == 3
    handler = Recorder()
    async with consuming(make_consumer(queue, handler, concurrency=8)):
        await eventually(lambda: len(handler.done) == 60, what="60 jobs")
        await eventually(lambda: drained(r, queue.keys), what="the stream to empty")
    assert await r.xlen(queue.keys.stream) == 0
    assert len(set(handler.done)) == 60


async def test_dead_letter_stream_is_capped(make_queue: Callable[..., Queue], r: aioredis.Redis) -> None:
    """The dead-letter stream is trimmed (MAXLEN ~) near DEAD_LETTER_MAXLEN however many entries die."""
    queue = make_queue()
    await queue.ensure_group()
    cap = queue_module.DEAD_LETTER_MAXLEN
    total = cap + 1500
    for start in range(0, total, 2500):
        poison = [
            Done(Malformed(f"{n + 1}-0", {"n": str(n)}, "malformed entry"), "poison", error="malformed entry")
            for n in range(start, min(total, start + 2500))
        ]
        await queue.cycle([], poison, [])
    length = await r.xlen(queue.keys.dead_letters)
    config: Any = await r.config_get("stream-node-max-entries")
    node_entries = int(config["stream-node-max-entries"])
    assert cap <= length < cap + node_entries
    newest: Any = await r.xrevrange(queue.keys.dead_letters, count=1)
    assert newest[0][1]["raw"] == f'{{"n":"{total - 1}"}}'  # trimming drops the oldest


@pytest.mark.slow
async def test_a_batch_held_past_the_visibility_timeout_is_kept_by_heartbeats(
    make_queue: Callable[..., Queue], r: aioredis.Redis
) -> None:
    """While slow sections hold their batch past the visibility timeout, heartbeats keep it: another
    consumer's maintenance takes nothing over, and no section of the batch runs twice."""
    visibility_s = 2.0
    queue = make_queue(visibility_timeout_s=visibility_s)
    await queue.ensure_group()
    release = anyio.Event()

    async def hold_all_but_one(ticket: Ticket) -> None:
        if ticket.job.id != job_id(0):
            await release.wait()

    handler = Recorder(hold_all_but_one)
    other = make_queue("c2", visibility_timeout_s=visibility_s)
    async with consuming(make_consumer(queue, handler, concurrency=4)):
        await queue.enqueue([section(n) for n in range(4)])
        await eventually(lambda: (job_id(0), 1) in handler.done, what="the quick job to finish")
        try:
            for _ in range(3):
                await anyio.sleep(visibility_s * 0.6)
                taken = await other.maintain()
                assert (taken.requeued, taken.dead) == (0, 0)
            assert await pending_count(r, queue.keys) == 1
        finally:
            release.set()
        await eventually(lambda: drained(r, queue.keys), what="the batch's ack")
    assert sorted(handler.started) == [(job_id(n), 1) for n in range(4)]  # never redelivered


async def test_restarted_consumer_resumes_its_own_unacknowledged_jobs_at_once(
    make_queue: Callable[..., Queue], r: aioredis.Redis
) -> None:
    """Entries read by a consumer that died are run by its successor of the same name before any timeout."""
    queue = make_queue("c1", visibility_timeout_s=60)
    await queue.ensure_group()
    await queue.enqueue([section(1), section(2)])
    assert len(await queue.read(10, 0.1)) == 2  # read, never settled: the process "died"
    assert await pending_count(r, queue.keys) == 1  # one entry carries both
    handler = Recorder()
    started = time.monotonic()
    async with consuming(make_consumer(make_queue("c1", visibility_timeout_s=60), handler)):
        await eventually(lambda: len(handler.done) == 2, timeout_s=5, what="the resumed jobs")
        await eventually(lambda: drained(r, queue.keys), what="the acks")
    assert time.monotonic() - started < 5
    assert sorted(handler.done) == [(job_id(1), 2), (job_id(2), 2)]  # the lost delivery spent an attempt


# -- shutdown --------------------------------------------------------------------------------------------


async def test_stopping_lets_running_jobs_finish_and_settles_them(
    make_queue: Callable[..., Queue], r: aioredis.Redis
) -> None:
    """Setting stopping reads nothing more, lets running jobs finish, and acknowledges them before run returns."""
    queue = make_queue()
    await queue.ensure_group()

    async def slow(ticket: Ticket) -> None:
        await anyio.sleep(0.5)

    handler = Recorder(slow)
    consumer = make_consumer(queue, handler)
    stopping = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer.run, stopping)
            await queue.enqueue([section(n) for n in range(3)])
            await eventually(lambda: len(handler.started) == 3, what="three jobs to start")
            stopping.set()
            await anyio.sleep(0.1)
            await queue.enqueue([section(9)])  # arrives after stopping: must not be taken
    assert sorted(handler.done) == [(job_id(n), 1) for n in range(3)]
    assert consumer.state.completed == 3
    assert await pending_count(r, queue.keys) == 0
    assert [job for _eid, job, _a in await stream_sections(r, queue.keys)] == [job_id(9)]


async def test_job_cancelled_by_shutdown_returns_to_stream_with_attempts_unchanged(
    make_queue: Callable[..., Queue], r: aioredis.Redis
) -> None:
    """A job cancelled when the grace runs out goes back to the stream, unacknowledged nowhere, attempts kept."""
    queue = make_queue(max_attempts=3)
    await queue.ensure_group()
    cancelled: list[str] = []

    async def fail_then_hang(ticket: Ticket) -> None:
        if ticket.job.attempt == 1:
            raise RetryableJobError("first try fails")
        try:
            await anyio.sleep(60)
        except anyio.get_cancelled_exc_class():
            cancelled.append(ticket.job.id)
            raise

    handler = Recorder(fail_then_hang)
    stopping = anyio.Event()
    with anyio.fail_after(15):
        with anyio.CancelScope() as grace:
            async with anyio.create_task_group() as tg:
                tg.start_soon(make_consumer(queue, handler).run, stopping)
                await queue.enqueue([section(1)])
                await eventually(lambda: len(handler.started) == 2, what="the second attempt to start")
                stopping.set()
                await anyio.sleep(0.2)
                grace.cancel()
    assert cancelled == [job_id(1)]
    assert await pending_count(r, queue.keys) == 0
    queued = await stream_sections(r, queue.keys)
    assert [(job, attempts) for _eid, job, attempts in queued] == [(job_id(1), 1)]  # attempt 2 was not spent

    rerun = Recorder()
    async with consuming(make_consumer(queue, rerun)):
        await eventually(lambda: rerun.done, what="the returned job to run")
    assert rerun.done == [(job_id(1), 2)]


# -- cost ------------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_idle_consumer_only_blocks_on_the_stream(
    make_queue: Callable[..., Queue], redis_clients: RedisClients
) -> None:
    """Idle, a consumer sends one blocking read per idle_block_s and no other command (no polling)."""
    queue = make_queue(visibility_timeout_s=60)  # first maintenance only after 30 s
    handler = Recorder()
    consumer = make_consumer(queue, handler, idle_block_s=1.0, idle_maintenance_s=600)
    async with consuming(consumer):
        await eventually(lambda: consumer.state.stats is not None, what="start-up")
        await anyio.sleep(0.5)
        before = redis_clients.usage.total["queue"]
        await anyio.sleep(3.2)
        during = redis_clients.usage.total["queue"] - before
    assert 1 <= during <= 4
    assert set(redis_clients.usage.total) <= {"queue", "startup"}


async def test_busy_consumer_spends_at_most_one_command_per_job(
    make_queue: Callable[..., Queue], redis_clients: RedisClients, r: aioredis.Redis
) -> None:
    """Draining 400 no-op jobs at concurrency 8 costs at most 0.1 billed commands per job, all-in (what the
    scripts run counted, SPEC §5), enqueue included: batch entries, one admission and one settlement each."""
    queue = make_queue()
    await queue.ensure_group()
    handler = Recorder()
    consumer = make_consumer(queue, handler, concurrency=8)
    async with consuming(consumer):
        await eventually(lambda: consumer.state.stats is not None, what="start-up")
        await anyio.sleep(0.2)
        before = sum(redis_clients.usage.total.values())
        await queue.enqueue([section(n) for n in range(400)])
        await eventually(lambda: len(handler.done) == 400, what="400 jobs")
        await eventually(lambda: drained(r, queue.keys), what="the last acks")
        spent = sum(redis_clients.usage.total.values()) - before
    assert spent <= 40, f"{spent} commands for 400 jobs"


async def test_every_malformed_entry_gets_the_same_reason_on_both_read_paths(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """Each entry of the validation table is rejected with its reason by the blocking read (Python's parse_entry)
    and by the cycle script's own read (Lua's q_not_a_job); a valid entry is a job on both."""
    queue = Queue(
        redis_clients.client("queue"), redis_clients.client("queue", blocking=True), keys, scripts, consumer="c1"
    )
    await queue.ensure_group()
    admin = redis_clients.client("admin")
    # XADD needs at least one field, so the table's empty entry travels with an unrelated one.
    table = [(entry or {"other": "x"}, reason) for entry, reason in MALFORMED] + [(f, None) for f in [fields(), *VALID]]
    for entry, reason in table:
        await admin.xadd(keys.stream, entry)  # type: ignore[arg-type]
        (read,) = await queue.read(1, 0.1)
        assert (read.reason if isinstance(read, Malformed) else None) == reason, (entry, "python")
        await admin.xadd(keys.stream, entry)  # type: ignore[arg-type]
        # Settling the first read (as poison, or as acknowledged) and fetching the second in one call.
        settle = Done(read, "poison", error=read.reason) if isinstance(read, Malformed) else Done(read, "ack")
        result = await queue.cycle([], [settle], [], fetch=1)
        lua: list[str | None] = [why for _, why in result.poisoned] or [None]
        assert lua == [reason], (entry, "lua")
        if result.fetched:
            await queue.cycle([], [Done(result.fetched[0], "ack")], [])
