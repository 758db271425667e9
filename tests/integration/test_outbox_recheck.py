"""The send-time re-check (SPEC §7.4) on real Postgres, the real pipeline and sender, and a loopback Resend."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import httpx
import pytest

from daemon.checks.outbox import OutboxSender
from daemon.checks.pipeline import Pipeline, Ticket
from daemon.jobs import Job
from daemon.runtime.metrics import Metrics
from daemon.store import db
from daemon.upstream.render import Renderer
from daemon.upstream.resend import ResendTransport
from daemon.upstream.scraper import Scraper
from tests.support.procs import SIGNING_KEY
from tests.support.seed import add_user, add_watch, clear
from tests.support.stubs import RESEND_KEY, SCRAPER_TOKEN, Reply

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import asyncpg

    from tests.support.stubs import ResendStub, ScraperStub

TERM: Final = "2261"
REFUSED: Final = Reply(429, {"name": "rate_limit_exceeded", "message": "Too many requests"}, {"Retry-After": "1"})


class Clock:
    """The sender's monotonic clock, moved by the test (a 429 pauses every batch until then)."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class World:
    def __init__(self, pool: asyncpg.Pool, http: httpx.AsyncClient, scraper: ScraperStub, resend: ResendStub):
        self.pool = pool
        self.scraper = scraper
        self.resend = resend
        self.metrics = Metrics()
        self.clock = Clock()
        self.pipeline = Pipeline(
            pool,
            Scraper(http, scraper.url, SCRAPER_TOKEN, timeout_s=2),
            Renderer("https://pickmyclass.test", "n@pickmyclass.test", SIGNING_KEY),
            self.metrics,
        )
        self.sender = OutboxSender(
            pool,
            ResendTransport(http, resend.url, RESEND_KEY, timeout_s=2),
            self.metrics,
            requests_per_s=1000,
            clock=self.clock,
        )

    async def check(self, class_nbr: str, seats: int) -> None:
        self.scraper.set(TERM, class_nbr, seats=seats)
        await self.pipeline(Ticket(Job("1-0", f"{TERM}-{class_nbr}", TERM, class_nbr, 0, 0)))

    async def send_due(self) -> bool:
        """Everything due now: the pause over, every waiting batch due."""
        self.clock.now_s += 3600
        await self.pool.execute("UPDATE seatwatch_outbox_batches SET next_attempt_at = now() WHERE status = 'pending'")
        return await self.sender.send_one()

    async def suppressed(self) -> list[tuple[str, str]]:
        rows = await self.pool.fetch("SELECT class_nbr, reason FROM seatwatch_outbox_suppressed ORDER BY 1, 2")
        return [(r["class_nbr"], r["reason"]) for r in rows]

    def posts(self) -> list[str]:
        return [r.headers["Idempotency-Key"] for r in self.resend.requests if r.path == "/emails/batch"]


@pytest.fixture
async def world(pool: asyncpg.Pool, scraper: ScraperStub, resend: ResendStub) -> AsyncIterator[World]:
    await clear(pool)
    await pool.execute("TRUNCATE seatwatch_outbox_suppressed")
    async with httpx.AsyncClient() as http:
        yield World(pool, http, scraper, resend)


async def test_emails_no_longer_owed_are_kept_back_while_resend_refuses(world: World) -> None:
    """Resend answers 429 a while: unsubscribed, deleted-watch and refilled emails are kept back; the rest go once."""
    stay = await add_user(world.pool, "stay@example.edu")
    unsub = await add_user(world.pool, "unsub@example.edu", notifications_enabled=True)
    gone = await add_user(world.pool, "gone@example.edu")
    refill = await add_user(world.pool, "refill@example.edu")
    for user in (stay, unsub):
        await add_watch(world.pool, user, TERM, "12480")
    gone_watch = await add_watch(world.pool, gone, TERM, "12480")
    await add_watch(world.pool, refill, TERM, "12482")
    for class_nbr in ("12480", "12482"):
        await world.check(class_nbr, 0)
        await world.check(class_nbr, 3)
    world.resend.script(*[REFUSED] * 4)
    assert await world.sender.send_one()  # one batch of four, refused
    assert world.resend.deliveries == []

    await world.pool.execute(
        "UPDATE user_profiles SET notifications_enabled = false, unsubscribed_at = now() WHERE user_id = $1", unsub
    )
    await world.pool.execute("DELETE FROM class_watches WHERE id = $1", gone_watch)
    await world.check("12482", 0)  # refilled: that email is no longer owed
    while await world.send_due():
        pass
    assert await world.suppressed() == [
        ("12480", "unsubscribed"),
        ("12480", "watch deleted"),
        ("12482", "section full since"),
    ]
    assert world.resend.delivered_to() == ["stay@example.edu"]
    keys = world.posts()
    assert len(keys) == 5  # four refused (the first batch, then the re-formed one three times), one accepted
    assert len(set(keys)) == 2
    assert world.metrics.suppressed.labels("unsubscribed")._value.get() == 1
    assert world.metrics.emails.labels("seat_available", "suppressed")._value.get() == 3
    counts = await db.outbox_counts(world.pool)
    assert (counts["pending"], counts["suppressed"]) == (0, 3)

    await world.check("12482", 1)  # the next opening emails again
    while await world.send_due():
        pass
    assert world.resend.delivered_to() == ["refill@example.edu", "stay@example.edu"]


async def test_a_batch_that_may_have_reached_resend_is_resent_unchanged(world: World) -> None:
    """After a 5xx (maybe delivered) the same batch goes again under its key, byte for byte, unsubscribed or not."""
    user = await add_user(world.pool, "maybe@example.edu", notifications_enabled=True)
    await add_watch(world.pool, await add_user(world.pool, "other@example.edu"), TERM, "12484")
    await add_watch(world.pool, user, TERM, "12484")
    await world.check("12484", 0)
    await world.check("12484", 2)
    world.resend.script(Reply(500, {"name": "internal_server_error", "message": "x"}, {"X-Stub-Deliver": "1"}))
    await world.sender.send_one()
    await world.pool.execute("UPDATE user_profiles SET notifications_enabled = false WHERE user_id = $1", user)
    await world.send_due()
    posts = [r for r in world.resend.requests if r.path == "/emails/batch"]
    assert len(posts) == 2
    assert posts[0].body == posts[1].body
    assert posts[0].headers["Idempotency-Key"] == posts[1].headers["Idempotency-Key"]
    assert await world.suppressed() == []
    assert world.resend.delivered_to() == ["maybe@example.edu", "other@example.edu"]


async def test_an_attempt_without_a_recorded_outcome_counts_as_maybe_delivered(world: World) -> None:
    """A batch whose sender died mid-request (lease lapsed, no outcome) is resent unchanged, not re-checked."""
    user = await add_user(world.pool, "inflight@example.edu", notifications_enabled=True)
    await add_watch(world.pool, user, TERM, "12486")
    await world.check("12486", 0)
    await world.check("12486", 2)
    formed = await world.sender._form_batch()  # formed and leased: its request may have gone out
    assert formed is not None
    await world.pool.execute("UPDATE seatwatch_outbox_batches SET leased_until = NULL")
    await world.pool.execute("UPDATE user_profiles SET notifications_enabled = false WHERE user_id = $1", user)
    await world.send_due()
    assert world.posts() == [formed.key]
    assert world.resend.delivered_to() == ["inflight@example.edu"]
    assert await world.suppressed() == []


async def test_no_connection_is_a_refusal_and_the_batch_is_rechecked(world: World) -> None:
    """Resend unreachable (connection refused): nothing was sent, so the unsubscribed recipient's email is kept back."""
    user = await add_user(world.pool, "down@example.edu", notifications_enabled=True)
    await add_watch(world.pool, user, TERM, "12488")
    await world.check("12488", 0)
    await world.check("12488", 2)
    real = world.sender.transport
    async with httpx.AsyncClient() as nowhere:
        world.sender.transport = ResendTransport(nowhere, "http://127.0.0.1:9", RESEND_KEY, timeout_s=2)
        try:
            await world.sender.send_one()
        finally:
            world.sender.transport = real
    await world.pool.execute("UPDATE user_profiles SET notifications_enabled = false WHERE user_id = $1", user)
    await world.send_due()
    assert world.posts() == []
    assert await world.suppressed() == [("12488", "notifications off")]
