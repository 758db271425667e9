"""Adaptive checking end to end: real Redis, real Postgres, a capacity-limited loopback scraper."""

from __future__ import annotations

import contextlib
import itertools
import logging
import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import anyio
import httpx
import orjson
import pytest

from daemon.adaptive.gate import Gate, MeteredScraper
from daemon.adaptive.limit import AdaptiveLimit
from daemon.adaptive.taker import Taker, make_limit
from daemon.checks.pipeline import Pipeline
from daemon.cron.scheduler import Scheduler
from daemon.keys import Keys
from daemon.primitives.breaker import BreakerConfig
from daemon.primitives.clients import RedisClients
from daemon.primitives.lock import CronLock
from daemon.primitives.queue import Queue
from daemon.primitives.scripts import Scripts
from daemon.runtime.metrics import Metrics
from daemon.runtime.schedule import CronWatch
from daemon.settings.config import Settings
from daemon.store import adaptive_queries as aq
from daemon.upstream.render import Renderer
from daemon.upstream.scraper import Scraper
from tests.support.capacity import CapacityScraper
from tests.support.procs import SIGNING_KEY, DaemonProcess, daemon_env, run_cli
from tests.support.seed import add_legacy_state, add_user, add_watch, clear
from tests.support.stubs import SCRAPER_TOKEN

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    import asyncpg

TERM = "2261"


class World:
    def __init__(self, pool: asyncpg.Pool, redis_url: str, prefix: str, database_url: str) -> None:
        self.pool = pool
        self.redis_url = redis_url
        self.prefix = prefix
        self.database_url = database_url
        self.scraper: CapacityScraper | None = None
        self.stack = contextlib.AsyncExitStack()

    def serve(self, *, slots: int = 4, service_s: float = 0.02, seats: Any = None) -> CapacityScraper:
        self.scraper = CapacityScraper(slots=slots, service_s=service_s, seats=seats).start()
        self.stack.callback(self.scraper.stop)
        return self.scraper

    async def watch(self, n: int, *, hot: bool = True, start: int = 10000) -> list[str]:
        """``n`` watched sections, each with one watcher (eligible when ``hot``) and a full legacy state."""
        nbrs = []
        for i in range(n):
            nbr = str(start + i)
            flags = {} if hot else {"notifications_enabled": False}
            user = await add_user(self.pool, f"s{nbr}@example.edu", **flags)
            await add_watch(self.pool, user, TERM, nbr)
            await add_legacy_state(self.pool, TERM, nbr, seats=0)
            nbrs.append(nbr)
        # Last checked an hour ago (by cron, say): every section is due at once.
        await self.pool.execute(
            "INSERT INTO seatwatch_section_states (term, class_nbr, subject, catalog_nbr, instructor_name, "
            "seats_available, seats_capacity, last_checked_at, last_changed_at) "
            "SELECT term, class_nbr, 'CSE', '240', 'Staff', 0, 30, now() - interval '1 hour', "
            "now() - interval '2 days' "
            "FROM class_watches ON CONFLICT DO NOTHING"
        )
        return nbrs

    async def dispatcher(self, consumer: str = "d1", plan_every_s: float = 0.3, **env: Any) -> Taker:
        assert self.scraper is not None
        settings = Settings.from_env(
            daemon_env(
                redis_url=self.redis_url,
                database_url=self.database_url,
                prefix=self.prefix,
                scraper_url=self.scraper.url,
                SEATWATCH_SCHEDULE="adaptive",
                SEATWATCH_CONSUMER=consumer,
                **env,
            )
        )
        clients = RedisClients(self.redis_url)
        self.stack.push_async_callback(clients.aclose)
        scripts = Scripts(clients.client("startup"))
        await scripts.load(clients.client("startup"))
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=40))
        self.stack.push_async_callback(http.aclose)
        limit = make_limit(settings)
        scraper = MeteredScraper(Scraper(http, self.scraper.url, SCRAPER_TOKEN, timeout_s=5), limit)
        pipeline = Pipeline(
            self.pool, scraper, Renderer("https://pickmyclass.test", "n@pickmyclass.test", SIGNING_KEY), Metrics()
        )
        return Taker(
            settings=settings,
            clients=clients,
            keys=Keys(self.prefix),
            scripts=scripts,
            breaker=BreakerConfig.from_settings(settings),
            pool=self.pool,
            pipeline=pipeline,
            gate=Gate(limit),
            plan_every_s=plan_every_s,
        )

    def scrapes(self, nbr: str) -> list[float]:
        assert self.scraper is not None
        return sorted(s.arrived for s in self.scraper.snapshot() if s.class_nbr == nbr)


@pytest.fixture
async def world(pool: asyncpg.Pool, redis_url: str, prefix: str, database_url: str) -> AsyncIterator[World]:
    await clear(pool)
    w = World(pool, redis_url, prefix, database_url)
    async with w.stack:
        yield w


async def run_for(seconds: float, *dispatchers: Taker, until: Callable[[], bool] | None = None) -> None:
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:
        for d in dispatchers:
            tg.start_soon(d.run, stopping)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (until and until()):
            await anyio.sleep(0.05)
        stopping.set()


FAST: dict[str, Any] = {
    "SEATWATCH_MIN_CHECK_INTERVAL_S": 1,
    "SEATWATCH_MAX_CHECK_INTERVAL_S": 6,
    "SEATWATCH_REDIS_BUDGET_PER_DAY": 10**8,
}


async def test_hot_sections_at_the_minimum_interval_cold_ones_at_the_maximum(world: World) -> None:
    """With budget to spare, sections someone waits on are checked every minimum interval, never closer;
    sections nobody waits on only at the maximum interval."""
    world.serve()
    hot = await world.watch(3, hot=True)
    cold = await world.watch(3, hot=False, start=20000)
    d = await world.dispatcher(**FAST, SEATWATCH_SCRAPES_PER_HOUR=360000)
    await run_for(4.5, d)
    for nbr in hot:
        times = world.scrapes(nbr)
        assert len(times) >= 3, (nbr, times)
        assert min(b - a for a, b in itertools.pairwise(times)) >= 1.0
    assert all(len(world.scrapes(nbr)) <= 1 for nbr in cold)
    check = d.check()
    assert (check["mode"], check["watched"], check["hot"]) == ("adaptive", 6, 3)
    assert (check["binding"], check["status"]) == ("min_interval", "healthy")
    assert 0.9 <= check["interval_p50_s"] <= 1.3


async def test_an_opening_is_emailed_within_about_one_interval(world: World) -> None:
    """A seat that opens in a watched full section has its email owed (outbox row) within ~one minimum interval."""
    opened_at = time.time() + 2.0
    world.serve(seats=lambda term, nbr, now: 2 if nbr == "10000" and now >= opened_at else 0)
    await world.watch(1)
    d = await world.dispatcher(**FAST, SEATWATCH_SCRAPES_PER_HOUR=360000)
    found: list[float] = []

    async def poll() -> None:
        while not found:
            if await world.pool.fetchval("SELECT count(*) FROM seatwatch_outbox"):
                found.append(time.time())
            await anyio.sleep(0.05)

    async with anyio.create_task_group() as tg:
        tg.start_soon(poll)
        await run_for(5, d, until=lambda: bool(found))
    assert found, "no email owed"
    assert found[0] - opened_at < 1.0 + 0.3


async def test_scrape_budget_is_spent_evenly_not_in_bursts(world: World) -> None:
    """SEATWATCH_SCRAPES_PER_HOUR paces every check: the total and any one-second window stay within 10 %."""
    world.serve(slots=8, service_s=0.01)
    await world.watch(30)
    d = await world.dispatcher(**FAST, SEATWATCH_SCRAPES_PER_HOUR=36000)  # 10 a second
    started = time.time()
    await run_for(4, d)
    assert world.scraper is not None
    served = world.scraper.snapshot()
    assert 30 <= len(served) <= 44
    assert world.scraper.max_in_window(1.0, since=started + 0.5) <= 11
    check = d.check()
    assert check["binding"] == "scrapes_per_hour"
    # Checks batch: one take call per several checks (with time compressed, a one-second minimum interval caps
    # a batch at one second of slots), each call about seven billed commands with what it runs.
    takes, checks = check["take_calls"], check["checks_here"]
    assert takes <= 0.25 * checks + 2, (takes, checks)
    assert d.usage.total["adaptive"] <= 8 * takes, (d.usage.total["adaptive"], takes)


async def test_two_daemons_share_the_budget_and_the_minimum_interval(world: World) -> None:
    """Two daemons on one Redis: together within the scrape budget, and no section checked twice within the
    minimum interval by either."""
    world.serve(slots=8, service_s=0.01)
    await world.watch(12)
    env: dict[str, Any] = {**FAST, "SEATWATCH_SCRAPES_PER_HOUR": 36000}
    a = await world.dispatcher("a", **env)
    b = await world.dispatcher("b", **env)
    await run_for(4, a, b)
    assert world.scraper is not None
    served = world.scraper.snapshot()
    assert 20 <= len(served) <= 44
    gap = world.scraper.min_gap_s()
    assert gap is not None
    assert gap >= 1.0
    assert min(a.figures.checks, b.figures.checks) > 0
    for d in (a, b):
        # Neither races the other for the shared pace in a loop: take calls stay a fraction of the checks, and
        # what they run (all-in, as billed) stays about seven commands a call.
        takes = d.figures.takes
        assert takes <= 0.5 * d.figures.checks + 3, (takes, d.figures.checks)
        assert d.usage.total["adaptive"] <= 8 * takes, (d.usage.total["adaptive"], takes)


async def test_watches_join_and_leave_the_schedule(world: World) -> None:
    """A new watch joins the plan at the next planning pass; a section nobody watches any more leaves it."""
    world.serve()
    await world.watch(2)
    d = await world.dispatcher(**FAST)
    await d.plan_once()
    planned = "SELECT term || '-' || class_nbr FROM seatwatch_adaptive_plan ORDER BY 1"
    assert len(await world.pool.fetch(planned)) == 2
    await world.pool.execute("DELETE FROM class_watches WHERE class_nbr = '10000'")
    await world.watch(1, start=30000)
    await d.plan_once()
    assert [r[0] for r in await world.pool.fetch(planned)] == [f"{TERM}-10001", f"{TERM}-30000"]
    assert d.usage.total["adaptive"] == 0  # planning is Postgres alone


async def test_falling_behind_is_reported_with_the_binding_budget(world: World, caplog: Any) -> None:
    """When the budgets cannot keep the maximum interval, health's schedule check is degraded, names the
    binding budget and what lifts it, and a warning says so."""
    world.serve()
    await world.watch(20)
    d = await world.dispatcher(
        SEATWATCH_MIN_CHECK_INTERVAL_S=1,
        SEATWATCH_MAX_CHECK_INTERVAL_S=4,
        SEATWATCH_SCRAPES_PER_HOUR=3600,
        SEATWATCH_REDIS_BUDGET_PER_DAY=10**8,
    )
    with caplog.at_level(logging.WARNING, logger="daemon.adaptive.taker"):
        await d.plan_once()
    check = d.check()
    assert check["status"] == "degraded"
    assert check["binding"] == "scrapes_per_hour"
    assert "SEATWATCH_SCRAPES_PER_HOUR" in check["lift"]
    assert (check["needed_checks_per_hour"], check["allowed_checks_per_hour"]) == (18000, 3600)
    assert any("behind" in r.getMessage() and "scrapes_per_hour" in r.getMessage() for r in caplog.records)


async def test_auto_concurrency_fills_the_scraper_without_queueing_in_it(world: World) -> None:
    """SEATWATCH_CONCURRENCY=auto against a 3-slot scraper: the limit settles near 3, requests wait inside
    the scraper less than one service time (median), and the measured capacity is what binds."""
    service_s = 0.1
    world.serve(slots=3, service_s=service_s)
    await world.watch(60)
    d = await world.dispatcher(
        **FAST, SEATWATCH_SCRAPES_PER_HOUR=3600000, SEATWATCH_CONCURRENCY="auto", SEATWATCH_CONCURRENCY_MAX=32
    )
    started = time.time()
    await run_for(5, d)
    assert world.scraper is not None
    later = [s.waited_s for s in world.scraper.snapshot() if s.arrived > started + 2]
    assert len(later) > 40
    assert statistics.median(later) <= service_s
    assert isinstance(d.gate.limit, AdaptiveLimit)
    assert 2 <= d.gate.limit.limit <= 7
    assert d.check()["binding"] == "scraper_capacity"


async def test_status_shows_the_schedule_and_what_the_budgets_can_reach(world: World) -> None:
    """`seatwatch status` shows the adaptive figures the daemon wrote and projects, for the sections watched
    now and the configured budgets, the interval adaptive checking reaches and which budget binds."""
    world.serve()
    await world.watch(3)
    await world.watch(2, hot=False, start=20000)
    d = await world.dispatcher()  # production intervals and the free tier's Redis day
    await d.plan_once()
    assert world.scraper is not None
    env = daemon_env(
        redis_url=world.redis_url,
        database_url=world.database_url,
        prefix=world.prefix,
        scraper_url=world.scraper.url,
        SEATWATCH_SCHEDULE="adaptive",
    )
    result = run_cli("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    schedule = orjson.loads(result.stdout)["schedule"]
    assert schedule["mode"] == "adaptive"
    assert schedule["watched"] == 5
    assert schedule["binding"] == "min_interval"
    projection = schedule["projection"]
    assert (projection["watched"], projection["hot"]) == (5, 3)
    assert projection["reachable_interval_s"] == 120
    assert projection["within_promise"] is True
    text = run_cli("status", env=env).stdout
    assert "schedule  adaptive  coverage=" in text
    assert "adaptive can reach: 5 watched (3 with someone waiting) checked every 120s" in text


async def test_cron_mode_reports_a_tick_that_finds_its_group_still_queued(
    world: World, redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """Cron mode: when a tick finds sections of its group still queued from that group's previous tick, the
    schedule check is degraded (behind, coverage, binding) and a warning says what would lift it."""
    await world.watch(4)
    clients = redis_clients
    queue = Queue(clients.client("queue"), clients.client("queue", blocking=True), keys, scripts, consumer="c")
    lock = CronLock(redis_clients.client("lock"), keys, scripts, ttl_s=50, holder="me")
    scheduler = Scheduler(
        cron="0,30 * * * *",
        tz=ZoneInfo("UTC"),
        stagger="parity",
        grace_s=3600,
        lock=lock,
        queue=queue,
        pool=world.pool,
        metrics=Metrics(),
    )
    watch = CronWatch(scheduler)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    await scheduler.run_slot(hour - timedelta(hours=1), anyio.Event())  # even group; nobody consumes
    assert watch.check()["status"] == "healthy"
    await scheduler.run_slot(hour, anyio.Event())  # even again: both even sections still queued
    check = watch.check()
    assert check["status"] == "degraded"
    assert (check["mode"], check["behind"], check["watched"], check["coverage"]) == ("cron", 2, 2, 0.0)
    assert check["binding"] == "scraper_capacity"
    assert "SEATWATCH_CONCURRENCY" in check["lift"]


async def test_the_daemon_runs_adaptive_checking_and_reports_its_schedule(world: World) -> None:
    """`seatwatch run` with SEATWATCH_SCHEDULE=adaptive and auto concurrency checks watched sections without
    cron ticks, and health carries the schedule check with its figures."""
    scraper = world.serve(slots=2, service_s=0.02)
    await world.watch(4)
    env = daemon_env(
        redis_url=world.redis_url,
        database_url=world.database_url,
        prefix=world.prefix,
        scraper_url=scraper.url,
        SEATWATCH_SCHEDULE="adaptive",
        SEATWATCH_CONCURRENCY="auto",
        SEATWATCH_CRON="0 0 1 1 *",
        **FAST,
    )
    proc = DaemonProcess(env).start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(scraper.snapshot()) < 8:
            await anyio.sleep(0.1)
        assert len(scraper.snapshot()) >= 8, proc.logs()
        _, body = proc.health()
        schedule = body["checks"]["schedule"]
        assert schedule["mode"] == "adaptive"
        assert schedule["watched"] == 4
        assert schedule["concurrency"]["mode"] == "auto"
        metrics = httpx.get(proc.health_url.replace("/api/monitoring/health", "/metrics")).text
        assert 'seatwatch_schedule{figure="coverage"}' in metrics
        # Four sections at a one-second minimum want 4 checks/s; the default 3,600 scrapes/h allow one.
        assert 'seatwatch_schedule_binding{budget="scrapes_per_hour"} 1.0' in metrics
    finally:
        assert proc.stop() == 0
    gap = scraper.min_gap_s()
    assert gap is not None
    assert gap >= 1.0


async def test_an_idle_daemon_spends_nothing_on_adaptive_checking(world: World) -> None:
    """With nothing watched, the planner reads Postgres but writes nothing to Redis, and the taker waits for
    it instead of polling: no adaptive command at all."""
    world.serve()
    d = await world.dispatcher(**FAST, plan_every_s=0.2)
    await run_for(2, d)
    assert d.usage.total["adaptive"] == 0


# -- what a check costs in Redis, and what survives a crash, an empty Redis and an upgrade -------------------


async def test_a_check_costs_under_a_tenth_of_a_billed_command_all_in(world: World) -> None:
    """With the production minimum interval, one take call (every command it runs counted, as Upstash bills)
    slots a batch of many checks: past start-up, the adaptive commands per check stay under 0.1, and planning
    costs none."""
    world.serve(slots=16, service_s=0.01)
    await world.watch(300)
    d = await world.dispatcher(
        SEATWATCH_MIN_CHECK_INTERVAL_S=120,
        SEATWATCH_MAX_CHECK_INTERVAL_S=3600,
        SEATWATCH_SCRAPES_PER_HOUR=36000,  # 10 a second: the pace binds
        SEATWATCH_REDIS_BUDGET_PER_DAY=10**8,
        SEATWATCH_CONCURRENCY=16,
    )
    marks: list[tuple[int, int]] = []

    async def window() -> None:
        for at_s in (3, 21):
            await anyio.sleep(at_s - (3 if marks else 0))
            marks.append((d.usage.total["adaptive"], d.figures.checks))

    async with anyio.create_task_group() as tg:
        tg.start_soon(window)
        await run_for(21.5, d)
    (c0, n0), (c1, n1) = marks
    commands, checks = c1 - c0, n1 - n0
    assert checks >= 120, checks
    assert commands / checks <= 0.1, (commands, checks, d.figures.takes)
    assert d.usage.total["adaptive"] <= 6 * d.figures.takes  # six billed a call, whatever the batch's size


async def test_nothing_due_costs_nothing_in_redis(world: World) -> None:
    """Sections watched but none due within a batch's horizon (all just checked, next due in ten minutes): the
    taker sleeps until the first is due, without a Redis command."""
    world.serve()
    await world.watch(5)
    await world.pool.execute("UPDATE seatwatch_section_states SET last_checked_at = now()")
    d = await world.dispatcher(SEATWATCH_MIN_CHECK_INTERVAL_S=600, SEATWATCH_MAX_CHECK_INTERVAL_S=3600)
    await run_for(3, d)
    assert d.figures.checks == 0
    assert d.usage.total["adaptive"] == 0


async def test_an_upgrade_in_place_drops_the_old_redis_plan_and_checks_every_section(world: World) -> None:
    """A daemon started on a Redis that holds the earlier adaptive layout (the due set and the per-section
    hashes) drops it, rebuilds the plan from Postgres and checks every watched section."""
    world.serve()
    nbrs = await world.watch(4)
    d = await world.dispatcher(**FAST, SEATWATCH_SCRAPES_PER_HOUR=360000)
    old = f"{world.prefix}:adaptive"
    redis = d.redis
    far_ms = int(time.time() * 1000) + 3_600_000  # the old layout had them due in an hour
    await redis.zadd(f"{old}:due", {f"{TERM}-{n}": far_ms for n in nbrs})
    await redis.hset(f"{old}:interval", mapping={f"{TERM}-{n}": 3_600_000 for n in nbrs})
    await redis.hset(f"{old}:last", mapping={f"{TERM}-{n}": far_ms - 3_600_000 for n in nbrs})
    await redis.hset(f"{old}:pace", "tat", far_ms)
    await redis.hset(f"{old}:report", "json", "{}")
    await run_for(3, d)
    assert all(world.scrapes(n) for n in nbrs), [len(world.scrapes(n)) for n in nbrs]
    assert await redis.exists(*(f"{old}:{k}" for k in ("due", "interval", "last", "pace", "report"))) == 0


async def test_a_lease_left_by_a_crash_comes_due_again(world: World) -> None:
    """A daemon that dies between leasing and slotting leaves its sections due again when the hold ends; one
    that dies after slotting leaves each due again one interval after its slot, never sooner."""
    world.serve()
    await world.watch(2)
    d = await world.dispatcher(**FAST)
    await d.plan_once()
    now_ms = int(time.time() * 1000) + 10_000  # past every first due time
    held = now_ms + 5000
    leased = await aq.lease(world.pool, now_ms=now_ms, until_ms=now_ms, n=10, held_until_ms=held)
    assert len(leased) == 2
    assert await aq.lease(world.pool, now_ms=held - 1, until_ms=held - 1, n=10, held_until_ms=held + 5000) == []
    again = await aq.lease(world.pool, now_ms=held + 1, until_ms=held + 1, n=10, held_until_ms=held + 5001)
    assert len(again) == 2  # the first holder died: due again
    # The dead holder's late settle touches nothing; the new holder's settles its slotted section alone.
    assert await aq.settle(world.pool, leased, [held, held], late_ms=100, held_until_ms=held) == set()
    slot = held + 2000
    settled = await aq.settle(world.pool, again, [slot, -1], late_ms=100, held_until_ms=held + 5001)
    assert settled == {(again[0].term, again[0].class_nbr)}
    interval_ms = await world.pool.fetchval(
        "SELECT interval_ms FROM seatwatch_adaptive_plan WHERE class_nbr = $1", again[0].class_nbr
    )
    slotted_due = slot + interval_ms + 100
    at = slotted_due - 1
    later = await aq.lease(world.pool, now_ms=at, until_ms=at, n=10, held_until_ms=at + 5000)
    assert [x.class_nbr for x in later] == [again[1].class_nbr]  # released at once; the slotted one not yet
    last = await aq.lease(world.pool, now_ms=slotted_due, until_ms=slotted_due, n=10, held_until_ms=at + 9000)
    assert [x.class_nbr for x in last] == [again[0].class_nbr]


@pytest.mark.slow
async def test_kill_9_leaves_every_section_due_again_and_never_checked_twice_too_soon(world: World) -> None:
    """`seatwatch run` in adaptive mode killed with SIGKILL mid-batch and started again: every section is
    checked again, and no two checks of one section come within the minimum interval."""
    scraper = world.serve(slots=4, service_s=0.02)
    nbrs = await world.watch(6)
    env = daemon_env(
        redis_url=world.redis_url,
        database_url=world.database_url,
        prefix=world.prefix,
        scraper_url=scraper.url,
        SEATWATCH_SCHEDULE="adaptive",
        SEATWATCH_CRON="0 0 1 1 *",
        SEATWATCH_SCRAPES_PER_HOUR=36000,
        **FAST,
    )
    proc = DaemonProcess(env).start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(scraper.snapshot()) < 8:
            await anyio.sleep(0.05)
        proc.kill()
        proc.wait()
    finally:
        proc.stop()
    killed_at = time.time()
    proc = DaemonProcess(env).start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(any(t > killed_at for t in world.scrapes(n)) for n in nbrs):
            await anyio.sleep(0.1)
    finally:
        assert proc.stop() == 0
    assert all(any(t > killed_at for t in world.scrapes(n)) for n in nbrs), proc.logs()
    gap = scraper.min_gap_s()
    assert gap is not None
    assert gap >= 1.0


async def test_redis_emptied_under_a_running_taker_loses_nothing(world: World) -> None:
    """Redis restarted empty (every key gone) while the taker runs: the pace and the breaker start afresh,
    every section keeps being checked, and none twice within the minimum interval."""
    world.serve(slots=8, service_s=0.01)
    nbrs = await world.watch(6)
    d = await world.dispatcher(**FAST, SEATWATCH_SCRAPES_PER_HOUR=36000)
    emptied: list[float] = []

    async def empty_redis() -> None:
        await anyio.sleep(2)
        keys = [k async for k in d.redis.scan_iter(match=f"{world.prefix}:*")]
        if keys:
            await d.redis.delete(*keys)
        emptied.append(time.time())

    async with anyio.create_task_group() as tg:
        tg.start_soon(empty_redis)
        await run_for(5, d)
    assert emptied
    assert all(any(t > emptied[0] + 0.5 for t in world.scrapes(n)) for n in nbrs)
    gap = world.scraper.min_gap_s() if world.scraper else None
    assert gap is not None
    assert gap >= 1.0


async def test_failures_open_the_breaker_without_waiting_for_the_next_batch(world: World) -> None:
    """Scrapes that fail are recorded as soon as they near the breaker's threshold, not with the next batch:
    the breaker opens after about its threshold of checks, and the batch already in hand is handed back."""
    scraper = world.serve()
    await world.watch(40)
    d = await world.dispatcher(
        SEATWATCH_MIN_CHECK_INTERVAL_S=10,  # batches of up to ten seconds of slots, a slot every 0.1 s
        SEATWATCH_MAX_CHECK_INTERVAL_S=60,
        SEATWATCH_SCRAPES_PER_HOUR=36000,
        SEATWATCH_REDIS_BUDGET_PER_DAY=10**8,
        SEATWATCH_BREAKER_FAILURES=4,
        SEATWATCH_BREAKER_RECOVERY_S=60,
        SEATWATCH_CONCURRENCY=16,
    )
    scraper.stop()  # connection refused: every scrape fails
    await run_for(3, d)
    state = await d.redis.hget(Keys(world.prefix).breaker, "state")
    assert state == "OPEN"
    # The threshold and a check or two that started while the outcome that opened it was on its way; without
    # early recording, the whole first batch (seventeen) would have run.
    assert d.figures.checks <= 4 + 2, d.figures.checks


async def test_the_breaker_closes_again_through_half_open_trials(world: World) -> None:
    """After the scraper recovers, the open breaker turns half-open, its trials (recorded as soon as they end)
    close it, and checking goes on at the pace."""
    failing_until = time.time() + 1.5

    def seats(term: str, nbr: str, now: float) -> int:
        if now < failing_until:
            raise RuntimeError("scraper down")  # the stub drops the connection: a failed scrape
        return 0

    world.serve(slots=8, service_s=0.01, seats=seats)
    nbrs = await world.watch(20)
    d = await world.dispatcher(
        **FAST,
        SEATWATCH_SCRAPES_PER_HOUR=36000,
        SEATWATCH_BREAKER_FAILURES=2,
        SEATWATCH_BREAKER_RECOVERY_S=1,
        SEATWATCH_BREAKER_SUCCESSES=2,
        SEATWATCH_BREAKER_HALF_OPEN_MAX=2,
    )
    await run_for(6, d)
    assert await d.redis.hget(Keys(world.prefix).breaker, "state") == "CLOSED"
    recovered = [t for n in nbrs for t in world.scrapes(n) if t > failing_until + 1.5]
    assert len(recovered) >= 15, len(recovered)
