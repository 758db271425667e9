"""A real ``seatwatch run`` process: systemd notify, ticks, shutdown, crashes, outages, misfires."""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
import redis.asyncio as aioredis

from daemon.cron.slots import group_for, slot_id
from daemon.keys import Keys
from tests.support.procs import Daemons, NotifySocket, quiet_cron, run_cli, stub_env
from tests.support.proxy import postgres_proxy, redis_proxy
from tests.support.seed import clear, watched
from tests.support.stubs import Reply, ResendStub, ScraperStub
from tests.support.wait import eventually

if TYPE_CHECKING:
    import asyncpg

pytestmark = pytest.mark.slow

TERM = "2261"


async def test_ready_manual_tick_delivers_and_sigterm_exits_zero(
    pool: asyncpg.Pool,
    redis_url: str,
    database_url: str,
    prefix: str,
    scraper: ScraperStub,
    resend: ResendStub,
    daemons: Daemons,
) -> None:
    """READY=1 on a real notify socket; `seatwatch tick --group even` checks only even sections and the
    owed email arrives; SIGTERM brings STOPPING=1 and exit 0."""
    await clear(pool)
    await watched(pool, ["12340", "12341"])
    for class_nbr in ("12340", "12341"):
        scraper.set(TERM, class_nbr, seats=2)
    notify = NotifySocket()
    try:
        # A daily cron an hour ago: no tick of its own during the test.
        daemon_vars = stub_env(
            redis_url,
            database_url,
            prefix,
            scraper,
            resend,
            **quiet_cron(),
        )
        proc = daemons.start(daemon_vars, notify=notify)
        ready = notify.wait_for("READY=1")
        assert any(line.startswith("STATUS=") for line in ready.split("\n"))

        tick = run_cli("tick", "--group", "even", env=daemon_vars)
        assert tick.returncode == 0, tick.stderr
        assert "1 enqueued" in tick.stdout
        await eventually(lambda: len(resend.deliveries) == 1, what="the even section's email", timeout_s=20)
        assert resend.delivered_to() == ["s12340-0@example.edu"]
        assert scraper.calls(TERM, "12341") == 0

        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        notify.wait_for("STOPPING=1", timeout_s=5)
    finally:
        notify.close()


async def test_start_runs_the_missed_slot_within_grace_and_checks_its_parity(
    pool: asyncpg.Pool,
    redis_url: str,
    database_url: str,
    prefix: str,
    scraper: ScraperStub,
    resend: ResendStub,
    daemons: Daemons,
) -> None:
    """A daemon started 5 minutes after a slot runs it once (the right parity group); the marker says done."""
    await clear(pool)
    emails = await watched(pool, ["12342", "12343", "12344", "12345"])
    for class_nbr in ("12342", "12343", "12344", "12345"):
        scraper.set(TERM, class_nbr, seats=1)
    slot = (datetime.now(UTC) - timedelta(minutes=5)).replace(second=0, microsecond=0)
    cron = f"{slot.minute} {slot.hour} * * *"
    proc = daemons.start(
        stub_env(redis_url, database_url, prefix, scraper, resend, SEATWATCH_CRON=cron, SEATWATCH_TIMEZONE="UTC")
    )
    expected = {"even": ["12342", "12344"], "odd": ["12343", "12345"]}[group_for(slot, "parity")]
    await eventually(lambda: len(resend.deliveries) == 2, what="the slot's emails", timeout_s=20)
    assert resend.delivered_to() == sorted(e for e in emails if e[1:6] in expected)
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert await client.get(Keys(prefix).slot(slot_id(slot))) == "done"
    finally:
        await client.aclose()
    assert proc.stop() == 0


async def test_start_skips_a_slot_older_than_the_grace(
    pool: asyncpg.Pool,
    redis_url: str,
    database_url: str,
    prefix: str,
    scraper: ScraperStub,
    resend: ResendStub,
    daemons: Daemons,
) -> None:
    """A daemon started an hour after a slot (grace 600 s) does not run it."""
    await clear(pool)
    await watched(pool, ["12346", "12347"])
    slot = (datetime.now(UTC) - timedelta(hours=1)).replace(second=0, microsecond=0)
    proc = daemons.start(
        stub_env(
            redis_url,
            database_url,
            prefix,
            scraper,
            resend,
            SEATWATCH_CRON=f"{slot.minute} {slot.hour} * * *",
            SEATWATCH_TIMEZONE="UTC",
        )
    )
    proc.wait_for_log("no cron slot within the misfire grace")
    await asyncio.sleep(1)
    assert scraper.requests == []
    assert proc.stop() == 0


async def test_two_daemons_run_each_slot_once(
    pool: asyncpg.Pool,
    redis_url: str,
    database_url: str,
    prefix: str,
    scraper: ScraperStub,
    resend: ResendStub,
    daemons: Daemons,
) -> None:
    """Two daemons on one Redis and one cron slot: one tick, every section checked exactly once."""
    await clear(pool)
    sections = [str(12350 + i) for i in range(12)]
    await watched(pool, sections)
    for class_nbr in sections:
        scraper.set(TERM, class_nbr, seats=1)
    for n in range(2):
        daemons.start(
            stub_env(
                redis_url,
                database_url,
                prefix,
                scraper,
                resend,
                SEATWATCH_CRON="* * * * *",
                SEATWATCH_TIMEZONE="UTC",
                SEATWATCH_STAGGER="none",
                SEATWATCH_CONSUMER=f"twin-{n}",
                SEATWATCH_LOCK_TTL_S="50",
            )
        )
    try:
        await eventually(lambda: len(resend.deliveries) == len(sections), what="every section's email", timeout_s=20)
    except AssertionError:
        raise AssertionError(daemons.logs()) from None
    await asyncio.sleep(1.5)
    assert sorted(d.message["to"][0] for d in resend.deliveries) == sorted(f"s{c}-0@example.edu" for c in sections)
    ticked = [
        line.split("daemon.cron.scheduler: tick ")[1].split(" ")[0]
        for proc in daemons.started
        for line in proc.logs().splitlines()
        if "daemon.cron.scheduler: tick " in line
    ]
    assert ticked
    assert len(ticked) == len(set(ticked)), ticked  # no slot ran twice
    for class_nbr in sections:
        assert scraper.calls(TERM, class_nbr) == len(ticked)
    for proc in daemons.started:
        assert proc.stop() == 0


async def test_sigterm_mid_work_drains_and_loses_nothing(
    pool: asyncpg.Pool,
    redis_url: str,
    database_url: str,
    prefix: str,
    scraper: ScraperStub,
    resend: ResendStub,
    daemons: Daemons,
) -> None:
    """SIGTERM while slow scrapes run: exit 0 within the grace, and after a restart every email arrives once."""
    await clear(pool)
    sections = [str(12360 + i) for i in range(8)]
    emails = await watched(pool, sections)
    for class_nbr in sections:
        scraper.script(TERM, class_nbr, Reply(200, {"success": True, "data": _data(seats=1)}, delay_s=1.0))
    daemon_vars = stub_env(
        redis_url,
        database_url,
        prefix,
        scraper,
        resend,
        SEATWATCH_CONCURRENCY="4",
        **quiet_cron(),
    )
    proc = daemons.start(daemon_vars)
    proc.wait_healthy()
    assert run_cli("tick", "--group", "all", env=daemon_vars).returncode == 0
    await eventually(lambda: len(scraper.requests) >= 2, what="scrapes in flight", timeout_s=20)
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert time.monotonic() - started < 10
    assert "draining" in proc.logs()

    again = daemons.start(daemon_vars)
    await eventually(lambda: len(resend.deliveries) == len(sections), timeout_s=30, what="every email")
    await asyncio.sleep(1)
    assert resend.delivered_to() == emails
    assert again.stop() == 0


def _data(**kwargs: Any) -> dict[str, Any]:
    from tests.support.stubs import section_data

    return section_data(**kwargs)


async def test_killed_between_commit_and_send_delivers_once_after_restart(
    pool: asyncpg.Pool,
    redis_url: str,
    database_url: str,
    prefix: str,
    scraper: ScraperStub,
    resend: ResendStub,
    daemons: Daemons,
) -> None:
    """SIGKILL while Resend holds the batch's answer: the restart resends the same batch, delivered once."""
    await clear(pool)
    await watched(pool, ["12370"], per_section=2)
    scraper.set(TERM, "12370", seats=3)
    # Resend takes the batch, delivers it, and is slow to answer: the daemon dies before the answer comes.
    resend.script(Reply(200, None, {"X-Stub-Deliver": "1"}, delay_s=5))
    daemon_vars = stub_env(
        redis_url,
        database_url,
        prefix,
        scraper,
        resend,
        **quiet_cron(),
    )
    proc = daemons.start(daemon_vars)
    proc.wait_healthy()
    assert run_cli("tick", "--group", "all", env=daemon_vars).returncode == 0
    await eventually(lambda: len(resend.requests) == 1, what="the first batch request", timeout_s=20)
    proc.kill()
    assert len(resend.deliveries) == 2
    assert await pool.fetchval("SELECT count(*) FROM seatwatch_outbox WHERE status = 'pending'") == 2

    again = daemons.start(daemon_vars)

    async def sent() -> bool:
        return bool(await pool.fetchval("SELECT count(*) = 2 FROM seatwatch_outbox WHERE status = 'sent'"))

    await eventually(sent, what="the outbox rows marked sent", timeout_s=20)
    keys = {r.headers["Idempotency-Key"] for r in resend.requests}
    assert len(resend.requests) == 2
    assert len(keys) == 1
    assert len(resend.deliveries) == 2
    assert again.stop() == 0


async def test_killed_before_commit_sends_once_after_restart(
    pool: asyncpg.Pool,
    redis_url: str,
    database_url: str,
    prefix: str,
    scraper: ScraperStub,
    resend: ResendStub,
    daemons: Daemons,
) -> None:
    """SIGKILL while the scrape is in flight: nothing was committed; the restart resumes the job, one email."""
    await clear(pool)
    await watched(pool, ["12372"])
    scraper.script(TERM, "12372", Reply(200, {"success": True, "data": _data(seats=4)}, delay_s=3))
    daemon_vars = stub_env(
        redis_url,
        database_url,
        prefix,
        scraper,
        resend,
        **quiet_cron(),
    )
    proc = daemons.start(daemon_vars)
    proc.wait_healthy()
    assert run_cli("tick", "--group", "all", env=daemon_vars).returncode == 0
    await eventually(lambda: len(scraper.requests) == 1, what="the scrape in flight", timeout_s=20)
    proc.kill()
    assert await pool.fetchval("SELECT count(*) FROM seatwatch_outbox") == 0

    again = daemons.start(daemon_vars)
    await eventually(lambda: len(resend.deliveries) == 1, what="the email after restart", timeout_s=20)
    again.wait_for_log("resumed 1 unacknowledged jobs")
    await asyncio.sleep(1)
    assert resend.delivered_to() == ["s12372-0@example.edu"]
    assert again.stop() == 0


async def test_health_follows_redis_and_postgres_outages_without_restart(
    pool: asyncpg.Pool,
    redis_url: str,
    database_url: str,
    prefix: str,
    scraper: ScraperStub,
    resend: ResendStub,
    daemons: Daemons,
) -> None:
    """Health is 200, then 500 while Redis (then Postgres) is cut off, then 200 again, same process; work resumes."""
    await clear(pool)
    await watched(pool, ["12374"])
    scraper.set(TERM, "12374", seats=2)
    redis_cut, redis_via = redis_proxy(redis_url)
    pg_cut, pg_via = postgres_proxy(database_url)
    try:
        daemon_vars = stub_env(
            redis_via,
            pg_via,
            prefix,
            scraper,
            resend,
            **quiet_cron(),
        )
        proc = daemons.start(daemon_vars)
        body = proc.wait_healthy()
        assert body["checks"]["redis"]["status"] == "healthy"

        for cut, name in ((redis_cut, "redis"), (pg_cut, "database")):
            cut.cut()
            deadline = time.monotonic() + 20
            code, body = proc.health()
            while code != 500 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                code, body = proc.health()
            assert code == 500
            assert body["status"] == "unhealthy"
            assert body["checks"][name]["status"] == "unhealthy"
            cut.restore()
            proc.wait_healthy(timeout_s=30)

        # The same process still works end to end after both outages.
        tick_vars = dict(daemon_vars, REDIS_URL=redis_url, DATABASE_URL=database_url)
        assert run_cli("tick", "--group", "all", env=tick_vars).returncode == 0
        await eventually(lambda: len(resend.deliveries) == 1, timeout_s=30, what="the email after outages")
        assert proc.stop() == 0
    finally:
        redis_cut.stop()
        pg_cut.stop()


async def test_port_in_use_fails_start_clearly(
    redis_url: str,
    database_url: str,
    prefix: str,
    scraper: ScraperStub,
    resend: ResendStub,
    daemons: Daemons,
) -> None:
    """A health port already bound makes `run` exit 1 naming the address."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = daemons.start(
            stub_env(redis_url, database_url, prefix, scraper, resend, SEATWATCH_HEALTH_LISTEN=f"127.0.0.1:{port}")
        )
        assert proc.wait(20) == 1
        assert f"127.0.0.1:{port}" in proc.logs()
