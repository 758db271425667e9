"""The section pipeline against real Postgres, a loopback scraper and a loopback Resend."""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import pytest

from daemon.checks.outbox import OutboxSender
from daemon.checks.pipeline import Pipeline, Ticket
from daemon.errors import DeferJob, PermanentJobError, RetryableJobError
from daemon.jobs import Job
from daemon.runtime.metrics import Metrics
from daemon.store.pool import create_pool
from daemon.upstream.render import Renderer, unsubscribe_token
from daemon.upstream.resend import ResendTransport
from daemon.upstream.scraper import Scraper
from tests.support.procs import SIGNING_KEY
from tests.support.seed import add_legacy_state, add_user, add_watch, clear, web_app_writes
from tests.support.stubs import RESEND_KEY, SCRAPER_TOKEN, Reply, ResendStub, ScraperStub, section_data

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import asyncpg

TERM = "2261"
SITE = "https://pickmyclass.test"


class World:
    """A pipeline and an outbox sender wired to the stubs, plus helpers to drive one section."""

    def __init__(self, pool: asyncpg.Pool, http: httpx.AsyncClient, scraper: ScraperStub, resend: ResendStub):
        self.pool = pool
        self.scraper = scraper
        self.resend = resend
        self.metrics = Metrics()
        self.pipeline = Pipeline(
            pool,
            Scraper(http, scraper.url + "/", SCRAPER_TOKEN, timeout_s=2),
            Renderer(SITE, "notifications@pickmyclass.test", SIGNING_KEY),
            self.metrics,
        )
        self.sender = OutboxSender(
            pool, ResendTransport(http, resend.url, RESEND_KEY, timeout_s=2), self.metrics, requests_per_s=1000
        )

    async def check(self, class_nbr: str, term: str = TERM, **data: Any) -> Ticket:
        """Scrape ``class_nbr`` once with the stub answering ``data``; return the ticket."""
        if data:
            self.scraper.set(term, class_nbr, **data)
        ticket = Ticket(Job("1-0", f"{term}-{class_nbr}", term, class_nbr, 0, 0))
        await self.pipeline(ticket)
        return ticket

    async def send(self) -> None:
        await self.sender.drain()

    async def outbox(self) -> list[asyncpg.Record]:
        return list(await self.pool.fetch("SELECT * FROM seatwatch_outbox ORDER BY id"))


@pytest.fixture(params=["direct", "pgbouncer"])
async def pool(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """Every pipeline test runs on a direct connection and through PgBouncer in transaction mode."""
    url = database_url if request.param == "direct" else request.getfixturevalue("pgbouncer").url_for(database_url)
    created = await create_pool(url, min_size=1, max_size=8)
    try:
        yield created
    finally:
        await created.close()


@pytest.fixture
async def world(pool: asyncpg.Pool, scraper: ScraperStub, resend: ResendStub) -> AsyncIterator[World]:
    await clear(pool)
    async with httpx.AsyncClient() as http:
        yield World(pool, http, scraper, resend)


async def test_seat_opening_emails_every_eligible_watcher_once(world: World) -> None:
    """A 0 -> 3 opening queues and delivers one email per watcher; a second identical check sends nothing."""
    emails = [f"student{i}@example.edu" for i in range(3)]
    for email in emails:
        await add_watch(world.pool, await add_user(world.pool, email), TERM, "12430")
    await world.check("12430", seats=0)
    assert await world.outbox() == []
    await world.check("12430", seats=3)
    await world.send()
    assert world.resend.delivered_to() == sorted(emails)
    subjects = {d.message["subject"] for d in world.resend.deliveries}
    assert subjects == {"🎉 Seat Available: CSE 240 (12430)"}
    assert all(len(d.message["to"]) == 1 for d in world.resend.deliveries)

    await world.check("12430", seats=3)
    await world.check("12430", seats=4)
    await world.send()
    assert len(world.resend.deliveries) == 3


async def test_fill_then_reopen_emails_again(world: World) -> None:
    """Seats going to 0 reset the claims, so the next opening notifies the same watcher again."""
    await add_watch(world.pool, await add_user(world.pool, "ada@example.edu"), TERM, "12432")
    for seats in (0, 2, 0, 5):
        await world.check("12432", seats=seats)
        await world.send()
    assert world.resend.delivered_to() == ["ada@example.edu", "ada@example.edu"]


async def test_ineligible_users_and_other_terms_get_nothing(world: World) -> None:
    """Disabled, bounced, unsubscribed and spam-complained users, and watches of another term, get nothing."""
    ok = await add_user(world.pool, "ok@example.edu")
    await add_watch(world.pool, ok, TERM, "12434")
    for email, flags in [
        ("disabled@example.edu", {"is_disabled": True}),
        ("bounced@example.edu", {"email_bounced": True}),
        ("unsub@example.edu", {"notifications_enabled": False}),
        ("spam@example.edu", {"spam_complained": True}),
    ]:
        await add_watch(world.pool, await add_user(world.pool, email, **flags), TERM, "12434")
    await add_watch(world.pool, await add_user(world.pool, "otherterm@example.edu"), "2264", "12434")
    await world.check("12434", seats=0)
    await world.check("12434", seats=1)
    await world.send()
    assert world.resend.delivered_to() == ["ok@example.edu"]


async def test_same_class_number_in_two_terms_notifies_each_terms_watchers(world: World) -> None:
    """One class number watched in two terms with different seats keeps separate state per term."""
    spring = await add_user(world.pool, "spring@example.edu")
    fall = await add_user(world.pool, "fall@example.edu")
    await add_watch(world.pool, spring, "2261", "12436")
    await add_watch(world.pool, fall, "2267", "12436")
    # Interleaved checks: spring is open all along after its first opening; fall stays full, then opens.
    steps = [("2261", 0), ("2267", 0), ("2261", 4), ("2267", 0), ("2261", 4), ("2267", 2), ("2261", 4), ("2267", 2)]
    for term, seats in steps:
        await world.check("12436", term, seats=seats)
    await world.send()
    assert world.resend.delivered_to() == ["fall@example.edu", "spring@example.edu"]
    mirror = await world.pool.fetchrow("SELECT term, seats_available FROM class_states WHERE class_nbr = '12436'")
    assert mirror is not None
    assert (mirror["term"], mirror["seats_available"]) == ("2267", 2)


async def test_first_check_after_cutover_notifies_a_real_opening(world: World) -> None:
    """With only a legacy class_states row of the same term (full), the first check that finds seats notifies."""
    await add_watch(world.pool, await add_user(world.pool, "cutover@example.edu"), TERM, "12438")
    await add_legacy_state(world.pool, TERM, "12438", seats=0)
    await world.check("12438", seats=2)
    await world.send()
    assert world.resend.delivered_to() == ["cutover@example.edu"]


async def test_legacy_row_of_another_term_is_not_a_previous_state(world: World) -> None:
    """A legacy row from another term does not count: the first check is a first observation."""
    await add_watch(world.pool, await add_user(world.pool, "x@example.edu"), TERM, "12440")
    await add_legacy_state(world.pool, "2257", "12440", seats=0)
    await world.check("12440", seats=2)
    assert await world.outbox() == []


async def test_fill_seen_only_by_the_web_app_rearms_and_the_reopening_emails_once(world: World) -> None:
    """seatwatch sees 3 (emails), the web app writes 0, the next scrape sees 2: the watchers are emailed again, once."""
    emails = ["a@example.edu", "b@example.edu"]
    for email in emails:
        await add_watch(world.pool, await add_user(world.pool, email), TERM, "12460")
    await world.check("12460", seats=0)
    await world.check("12460", seats=3)
    await world.send()
    assert world.resend.delivered_to() == emails
    await web_app_writes(world.pool, TERM, "12460", seats=0)
    await world.check("12460", seats=2)
    await world.check("12460", seats=2)
    await world.send()
    assert world.resend.delivered_to() == sorted(emails * 2)
    assert world.metrics.notifications.labels("seat_available")._value.get() == 4


async def test_opening_seen_only_by_the_web_app_is_still_owed(world: World) -> None:
    """seatwatch saw 0, the web app wrote 2, the next scrape sees 2: watchers without a held claim are emailed."""
    await add_watch(world.pool, await add_user(world.pool, "waiting@example.edu"), TERM, "12462")
    await world.check("12462", seats=0)
    await web_app_writes(world.pool, TERM, "12462", seats=2)
    await world.check("12462", seats=2)
    await world.send()
    assert world.resend.delivered_to() == ["waiting@example.edu"]
    # A watcher added later than the opening holds no claim: still waiting, emailed at the web app's next write.
    await add_watch(world.pool, await add_user(world.pool, "late@example.edu"), TERM, "12462")
    await world.check("12462", seats=2)
    await world.send()
    assert world.resend.delivered_to() == ["waiting@example.edu"]


async def test_opening_the_web_app_saw_that_is_gone_rearms_and_emails_nobody(world: World) -> None:
    """3 (emailed) -> web app 0 -> 0 re-arms, 0 -> web app 2 -> 0 emails nobody, and the next opening emails again."""
    await add_watch(world.pool, await add_user(world.pool, "g@example.edu"), TERM, "12464")
    await world.check("12464", seats=0)
    await world.check("12464", seats=3)
    await world.send()
    await web_app_writes(world.pool, TERM, "12464", seats=0)
    await world.check("12464", seats=0)
    await web_app_writes(world.pool, TERM, "12464", seats=2)
    await world.check("12464", seats=0)
    await world.send()
    assert world.resend.delivered_to() == ["g@example.edu"]
    await world.check("12464", seats=1)
    await world.send()
    assert world.resend.delivered_to() == ["g@example.edu", "g@example.edu"]


async def test_web_app_snapshot_of_another_term_is_ignored(world: World) -> None:
    """A web-app row of the same class number in another term is not an observation of this term's section."""
    await add_watch(world.pool, await add_user(world.pool, "t@example.edu"), TERM, "12466")
    await world.check("12466", seats=0)
    await world.check("12466", seats=3)
    await web_app_writes(world.pool, "2267", "12466", seats=0)
    await world.check("12466", seats=2)
    await world.send()
    assert world.resend.delivered_to() == ["t@example.edu"]


async def test_seatwatchs_own_mirror_write_is_not_a_web_app_observation(world: World) -> None:
    """Without a web-app write, 3 -> 2 stays no edge however often it is checked (the mirror is seatwatch's own)."""
    await add_watch(world.pool, await add_user(world.pool, "m2@example.edu"), TERM, "12468")
    for seats in (0, 3, 2, 2, 5):
        await world.check("12468", seats=seats)
    await world.send()
    assert world.resend.delivered_to() == ["m2@example.edu"]


async def test_instructor_assigned_seen_only_by_the_web_app_is_still_owed(world: World) -> None:
    """Staff, then the web app writes a name, then the scrape shows it: the instructor email goes out once."""
    await add_watch(world.pool, await add_user(world.pool, "i@example.edu"), TERM, "12470")
    await world.check("12470", seats=0, instructor="Staff")
    await web_app_writes(world.pool, TERM, "12470", seats=0, instructor="Ada Lovelace")
    await world.check("12470", seats=0, instructor="Ada Lovelace")
    await world.check("12470", seats=0, instructor="Ada Lovelace")
    await world.send()
    assert [d.message["subject"] for d in world.resend.deliveries] == ["👨‍🏫 Instructor Assigned: CSE 240 (12470)"]


async def test_instructor_assignment_notifies_once(world: World) -> None:
    """Staff -> a name emails the watcher; a name -> another name does not."""
    await add_watch(world.pool, await add_user(world.pool, "prof@example.edu"), TERM, "12442")
    await world.check("12442", seats=0, instructor="Staff")
    await world.check("12442", seats=0, instructor="Ada Lovelace")
    await world.check("12442", seats=0, instructor="Grace Hopper")
    await world.send()
    assert [d.message["subject"] for d in world.resend.deliveries] == ["👨‍🏫 Instructor Assigned: CSE 240 (12442)"]
    assert "0 of 30 seats available" in world.resend.deliveries[0].message["text"]


async def test_missing_seat_count_is_a_failure_not_a_change(world: World) -> None:
    """A body without seats_available fails the job (breaker failure) and leaves the state as it was."""
    await add_watch(world.pool, await add_user(world.pool, "m@example.edu"), TERM, "12444")
    await world.check("12444", seats=3)
    before = await world.pool.fetchrow("SELECT * FROM seatwatch_section_states WHERE class_nbr = '12444'")
    world.scraper.set(TERM, "12444", seats=None)
    ticket = Ticket(Job("1-0", f"{TERM}-12444", TERM, "12444", 0, 0))
    with pytest.raises(RetryableJobError, match="seats_available"):
        await world.pipeline(ticket)
    assert ticket.breaker == "f"
    after = await world.pool.fetchrow("SELECT * FROM seatwatch_section_states WHERE class_nbr = '12444'")
    assert after == before
    await world.check("12444", seats=3)
    assert await world.outbox() == []


async def test_scraper_answers_map_to_job_outcomes(world: World) -> None:
    """Not found completes the job; 400 dead-letters; 429 defers with Retry-After; 502 retries as a breaker failure."""
    ticket = await world.check("12446")  # the stub answers 500 "not found" for unknown sections
    assert ticket.breaker == "s"
    assert world.metrics.sections.labels("not_found")._value.get() == 1

    world.scraper.script(TERM, "12446", Reply(400, {"success": False, "error": "bad section"}))
    with pytest.raises(PermanentJobError):
        await world.check("12446")
    world.scraper.script(TERM, "12446", Reply(429, {"error": "Rate limit exceeded"}, {"Retry-After": "42"}))
    with pytest.raises(DeferJob) as deferred:
        await world.check("12446")
    assert deferred.value.delay_s == 42
    world.scraper.script(TERM, "12446", Reply(502, b"bad gateway"))
    ticket = Ticket(Job("1-0", f"{TERM}-12446", TERM, "12446", 0, 0))
    with pytest.raises(RetryableJobError):
        await world.pipeline(ticket)
    assert ticket.breaker == "f"


async def test_resend_500_then_success_delivers_once_with_identical_bytes(world: World) -> None:
    """A 500 is retried as the same batch: same Idempotency-Key, byte-identical body, one delivery."""
    await add_watch(world.pool, await add_user(world.pool, "r@example.edu"), TERM, "12448")
    await world.check("12448", seats=0)
    await world.check("12448", seats=1)
    world.resend.script(Reply(500, {"name": "internal_server_error", "message": "boom"}))
    await world.sender.send_one()
    await world.pool.execute("UPDATE seatwatch_outbox_batches SET next_attempt_at = now()")
    await world.sender.send_one()
    posts = [r for r in world.resend.requests if r.path == "/emails/batch"]
    assert len(posts) == 2
    assert posts[0].headers["Idempotency-Key"] == posts[1].headers["Idempotency-Key"]
    assert posts[0].body == posts[1].body
    assert world.resend.delivered_to() == ["r@example.edu"]
    row = (await world.outbox())[0]
    assert row["status"] == "sent"
    assert row["provider_id"] == world.resend.deliveries[0].id


async def test_lost_answer_after_delivery_is_not_delivered_twice(world: World) -> None:
    """Resend delivered but the 500 answer came back: the retry under the same key delivers nothing new."""
    await add_watch(world.pool, await add_user(world.pool, "lost@example.edu"), TERM, "12450")
    await world.check("12450", seats=0)
    await world.check("12450", seats=1)
    world.resend.script(Reply(500, {"name": "internal_server_error", "message": "lost"}, {"X-Stub-Deliver": "1"}))
    await world.sender.send_one()
    assert len(world.resend.deliveries) == 1
    await world.pool.execute("UPDATE seatwatch_outbox_batches SET next_attempt_at = now()")
    await world.sender.send_one()
    assert world.resend.delivered_to() == ["lost@example.edu"]
    assert (await world.outbox())[0]["status"] == "sent"


async def test_rejected_batch_is_split_and_a_bad_row_fails_alone(world: World) -> None:
    """422 on a batch of two splits it into single sends; a single 422 marks that row failed with the reason."""
    for email in ("good@example.edu", "bad@example.edu"):
        await add_watch(world.pool, await add_user(world.pool, email), TERM, "12452")
    await world.check("12452", seats=0)
    await world.check("12452", seats=1)
    first = Reply(422, {"name": "validation_error", "message": "invalid `to` field"})
    world.resend.script(first, Reply(200, None), first)  # batch rejected; row 1 sent; row 2 rejected
    # The 200 scripted reply is not used as such: the stub delivers normally when a 2xx is scripted.
    for _ in range(3):
        await world.sender.send_one()
    rows = await world.outbox()
    statuses = sorted((r["status"], r["last_error"] is not None) for r in rows)
    assert statuses == [("failed", True), ("sent", False)]
    failed = next(r for r in rows if r["status"] == "failed")
    assert "invalid `to` field" in failed["last_error"]
    assert world.metrics.emails.labels("seat_available", "failed")._value.get() == 1


async def test_rate_limited_batch_waits_for_retry_after(world: World) -> None:
    """A 429 with Retry-After: 30 schedules the same batch about 30 s later."""
    await add_watch(world.pool, await add_user(world.pool, "slow@example.edu"), TERM, "12454")
    await world.check("12454", seats=0)
    await world.check("12454", seats=1)
    world.resend.script(Reply(429, {"name": "rate_limit_exceeded", "message": "slow down"}, {"Retry-After": "30"}))
    await world.sender.send_one()
    wait_s = await world.pool.fetchval(
        "SELECT extract(epoch FROM next_attempt_at - now()) FROM seatwatch_outbox_batches"
    )
    assert 25 < float(wait_s) <= 30
    assert await world.sender.send_one() is False  # not due yet, and nothing else to send


async def test_email_contents_and_unsubscribe_token(world: World) -> None:
    """The stored email carries the token the web app verifies, its List-Unsubscribe headers and the catalog link."""
    user_id = await add_user(world.pool, "token@example.edu")
    await add_watch(world.pool, user_id, TERM, "12456")
    await world.check("12456", seats=0, non_reserved=0)
    before_ms = int(time.time() * 1000)
    await world.check("12456", seats=5, non_reserved=2, title="<script>alert('x')</script> & Co")
    row = (await world.outbox())[0]
    message = orjson.loads(row["payload"])
    token = row["unsubscribe_token"]
    expires_ms = int(base64.urlsafe_b64decode(token + "==").decode().split(":")[1])
    assert before_ms + 90 * 86400 * 1000 <= expires_ms <= int(time.time() * 1000) + 90 * 86400 * 1000
    assert token == unsubscribe_token(user_id, SIGNING_KEY, expires_ms)
    assert message["headers"]["List-Unsubscribe"] == f"<{SITE}/api/unsubscribe?token={token}>"
    assert message["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "2 open seats" in message["text"]
    assert f"{SITE}/go/asu?classNbr=12456&amp;term=2261" in message["html"]
    assert "<script>" not in message["html"]
    assert "&lt;script&gt;alert(&#039;x&#039;)&lt;/script&gt; &amp; Co" in message["html"]


async def test_round_trips_per_section(world: World, database_url: str) -> None:
    """Warm statements: no change is BEGIN, observe, COMMIT; a fill adds the claim reset; an opening the insert too."""
    await add_watch(world.pool, await add_user(world.pool, "rt@example.edu"), TERM, "12458")
    single = await create_pool(database_url, min_size=1, max_size=1)
    try:
        world.pipeline.pool = single
        await world.check("12458", seats=0)

        async def statements_for(seats: int) -> int:
            async with single.acquire() as conn:
                before = conn._protocol.queries_count  # asyncpg's count of statements sent on this connection
            await world.check("12458", seats=seats)
            async with single.acquire() as conn:
                return int(conn._protocol.queries_count - before)

        unchanged = await statements_for(0)
        await statements_for(2)  # the first edge also prepares the claim and insert statements (cached after)
        filled = await statements_for(0)
        reopened = await statements_for(3)
    finally:
        await single.close()
    assert (unchanged, filled, reopened) == (3, 4, 5)


def test_section_data_leaves_unparsed_seats_out() -> None:
    """The stub helper omits a seat count given as None, as the real scraper does."""
    assert "seats_available" not in section_data(seats=None)
