"""Resend's daily and monthly quotas (SPEC §7.4): a quota 429 pauses sending until the reset without spending
retries, the configured quota is never overrun, and health, status and metrics say so."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

import httpx
import orjson
import pytest

from daemon.checks.outbox import OutboxSender, quota_reset
from daemon.runtime.metrics import Metrics
from daemon.store import outbox_queries
from daemon.upstream.resend import ResendTransport
from tests.support.procs import daemon_env, quiet_cron, run_cli
from tests.support.seed import add_user, add_watch, clear, owed_emails
from tests.support.stubs import RESEND_KEY

if TYPE_CHECKING:
    import asyncpg

    from tests.support.procs import Daemons
    from tests.support.stubs import ResendStub, ScraperStub

NOW: Final = datetime(2026, 12, 4, 20, 0, tzinfo=UTC)


class Clock:
    """The sender's monotonic clock and its UTC wall clock, moved together by the test."""

    def __init__(self) -> None:
        self.mono_s = 1000.0
        self.utc = NOW

    def mono(self) -> float:
        return self.mono_s

    def wall(self) -> datetime:
        return self.utc

    def advance(self, seconds: float) -> None:
        self.mono_s += seconds
        self.utc += timedelta(seconds=seconds)


def sender(
    pool: asyncpg.Pool,
    http: httpx.AsyncClient,
    resend: ResendStub,
    clock: Clock,
    *,
    quota_per_day: int = 0,
    quota_per_month: int = 0,
) -> OutboxSender:
    return OutboxSender(
        pool,
        ResendTransport(http, resend.url, RESEND_KEY, timeout_s=2),
        Metrics(),
        requests_per_s=1000,
        clock=clock.mono,
        utc_now=clock.wall,
        quota_per_day=quota_per_day,
        quota_per_month=quota_per_month,
    )


async def owed_together(pool: asyncpg.Pool, n: int) -> None:
    """``n`` pending seat emails that may share a batch, each with the claim that owes it."""
    await clear(pool)
    for i in range(n):
        user = await add_user(pool, f"q{i}@example.edu")
        watch = await add_watch(pool, user, "2261", f"1250{i}")
        await pool.execute(
            "INSERT INTO notifications_sent (class_watch_id, notification_type) VALUES ($1, 'seat_available')", watch
        )
        payload = orjson.dumps({"from": "n@pickmyclass.test", "to": [f"q{i}@example.edu"], "subject": "s"}).decode()
        await pool.execute(
            "INSERT INTO seatwatch_outbox (class_watch_id, user_id, notification_type, term, class_nbr, payload, "
            "unsubscribe_token) VALUES ($1, $2, 'seat_available', '2261', $3, $4, 'tok')",
            watch,
            user,
            f"1250{i}",
            payload,
        )


def test_quota_resets_at_utc_midnight_and_the_first_of_the_month() -> None:
    """Daily: the next UTC midnight; monthly: the first of the next month (December rolls into January)."""
    assert quota_reset("daily", NOW) == datetime(2026, 12, 5, tzinfo=UTC)
    assert quota_reset("monthly", NOW) == datetime(2027, 1, 1, tzinfo=UTC)
    assert quota_reset("monthly", datetime(2026, 2, 28, 23, 59, tzinfo=UTC)) == datetime(2026, 3, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("name", "until"), [("daily_quota_exceeded", "2026-12-05"), ("monthly_quota_exceeded", "2027-01-01")]
)
async def test_a_quota_429_pauses_until_the_reset_without_spending_retries(
    pool: asyncpg.Pool, resend: ResendStub, name: str, until: str
) -> None:
    """After a quota 429 nothing is sent (no request at all) until the quota resets; the attempt is not counted."""
    await owed_emails(pool, 3)  # three batches of one
    resend.quota_left, resend.quota_name = 1, name
    clock = Clock()
    async with httpx.AsyncClient() as http:
        outbox = sender(pool, http, resend, clock)
        assert await outbox.send_one()  # sent
        assert await outbox.send_one()  # 429: quota
        assert outbox.quota_pause is not None
        assert outbox.quota_pause.until.date().isoformat() == until
        assert not outbox.failing
        for _ in range(5):
            clock.advance(600)
            assert not await outbox.send_one()
        assert len(resend.requests) == 2
        refused = await pool.fetchrow(
            "SELECT attempts, refused, ambiguous, next_attempt_at - now() AS wait FROM seatwatch_outbox_batches "
            "WHERE status = 'pending'"
        )
        assert refused is not None
        assert (refused["attempts"], refused["refused"], refused["ambiguous"]) == (0, 0, False)
        assert refused["wait"] > timedelta(minutes=30)  # at the real reset, not in 60 s

        # The quota resets.
        clock.advance((outbox.quota_pause.until - clock.utc).total_seconds() + 1)
        resend.quota_left = 100
        await pool.execute("UPDATE seatwatch_outbox_batches SET next_attempt_at = now() WHERE status = 'pending'")
        while await outbox.send_one():
            pass
        assert outbox.quota_pause is None
    assert resend.delivered_to() == ["o0@example.edu", "o1@example.edu", "o2@example.edu"]
    keys = [r.headers["Idempotency-Key"] for r in resend.requests]
    assert len(keys) == 4
    assert keys[1] == keys[2]  # the same batch, under its key, after the pause


async def test_the_sender_never_starts_a_batch_the_daily_quota_cannot_take(
    pool: asyncpg.Pool, resend: ResendStub
) -> None:
    """With 2 a day configured and 5 owed: one batch of 2 goes, then nothing until the next UTC day."""
    await owed_together(pool, 5)
    clock = Clock()
    async with httpx.AsyncClient() as http:
        outbox = sender(pool, http, resend, clock, quota_per_day=2, quota_per_month=3000)
        while await outbox.send_one():
            pass
        assert len(resend.requests) == 1
        assert len(resend.deliveries) == 2
        assert await outbox_queries.sent_counts(pool) == (2, 2)
        assert outbox.quota_pause is not None
        assert outbox.quota_pause.period == "daily"
        assert not await outbox.send_one()
    assert await pool.fetchval("SELECT count(*) FROM seatwatch_outbox WHERE status = 'pending'") == 3


async def test_the_monthly_quota_caps_a_batch_too(pool: asyncpg.Pool, resend: ResendStub) -> None:
    """With 3 a month configured and 1 already sent this month, a batch holds at most 2."""
    await owed_together(pool, 4)
    await pool.execute(
        "UPDATE seatwatch_outbox SET status = 'sent', sent_at = now() WHERE id = (SELECT min(id) FROM seatwatch_outbox)"
    )
    clock = Clock()
    async with httpx.AsyncClient() as http:
        outbox = sender(pool, http, resend, clock, quota_per_day=0, quota_per_month=3)
        while await outbox.send_one():
            pass
    assert [len(r.json()) for r in resend.requests] == [2]
    assert outbox.quota_pause is not None
    assert outbox.quota_pause.period == "monthly"


@pytest.mark.slow
async def test_health_status_and_metrics_show_the_quota_pause(
    database_url: str,
    pool: asyncpg.Pool,
    redis_url: str,
    prefix: str,
    scraper: ScraperStub,
    resend: ResendStub,
    daemons: Daemons,
) -> None:
    """Resend's daily quota used up: health is degraded by the email check, status and /metrics show the quota."""
    await owed_emails(pool, 1)
    resend.quota_left = 0
    env = daemon_env(
        redis_url=redis_url,
        database_url=database_url,
        prefix=prefix,
        scraper_url=scraper.url,
        resend_url=resend.url,
        health_port=None,
        SEATWATCH_EMAIL_QUOTA_PER_DAY=100,
        SEATWATCH_EMAIL_QUOTA_PER_MONTH=3000,
        **quiet_cron(),
    )
    proc = daemons.start(env)
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        proc.assert_running()
        with contextlib.suppress(httpx.HTTPError):  # the listener may not be up yet
            code, body = await asyncio.to_thread(proc.health)
            email = body["checks"]["email"]
            if email["status"] == "degraded" and email["quota"]["paused_until"]:
                break
        assert asyncio.get_running_loop().time() < deadline, proc.logs()
        await asyncio.sleep(0.2)
    assert code == 503
    assert body["checks"]["outbox"]["status"] == "healthy"
    assert "daily_quota_exceeded" in email["quota"]["paused_by"]
    assert email["quota"]["per_day"] == 100
    assert email["quota"]["left_today"] == 100
    assert len([r for r in resend.requests if r.path == "/emails/batch"]) == 1

    metrics = (await asyncio.to_thread(httpx.get, proc.health_url.rsplit("/api", 1)[0] + "/metrics")).text
    assert 'seatwatch_email_quota{figure="paused"} 1.0' in metrics
    assert 'seatwatch_email_quota{figure="per_day"} 100.0' in metrics

    shown = await asyncio.to_thread(run_cli, "status", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    quota = orjson.loads(shown.stdout)["outbox"]["quota"]
    assert (quota["per_day"], quota["per_month"], quota["sent_today"], quota["left_today"]) == (100, 3000, 0, 100)
    assert quota["paused_until"] is not None
    text = await asyncio.to_thread(run_cli, "status", env=env)
    assert "sent today 0/100, this month 0/3000  PAUSED until" in text.stdout


async def test_refused_again_after_the_reset_looks_again_hourly(pool: asyncpg.Pool, resend: ResendStub) -> None:
    """Still refused just after the UTC reset (Resend counts its own day): the next look is an hour on, not a day."""
    await owed_emails(pool, 1)
    resend.quota_left = 0
    clock = Clock()
    async with httpx.AsyncClient() as http:
        outbox = sender(pool, http, resend, clock)
        assert await outbox.send_one()
        assert outbox.quota_pause is not None
        assert outbox.quota_pause.until == datetime(2026, 12, 5, tzinfo=UTC)
        clock.advance((outbox.quota_pause.until - clock.utc).total_seconds() + 1)
        await pool.execute("UPDATE seatwatch_outbox_batches SET next_attempt_at = now()")
        assert await outbox.send_one()  # refused again
        assert outbox.quota_pause.until == datetime(2026, 12, 5, 1, 0, 1, tzinfo=UTC)
        assert not await outbox.send_one()
    assert len(resend.requests) == 2
