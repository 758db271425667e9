"""The outbox sender: drains ``seatwatch_outbox`` into Resend batches, exactly once per email.

A batch is formed once (at most 100 pending rows, taken ``FOR UPDATE SKIP LOCKED`` so several daemons can
share the work) and recorded on its rows with its key before its first request. Every retry resends that
same batch (the same rows, in the same order, with the same stored bytes) under that same
Idempotency-Key: a request whose answer was lost is answered again by Resend without a second delivery,
and is never re-formed into a different batch.

* 2xx: rows are marked sent with Resend's ids.
* 429, 5xx, network errors: the batch waits (Retry-After, else exponential backoff) and goes again.
* 400/422: nothing was sent. A batch of several rows is split into single-row batches with new keys, so
  one bad address cannot sink the others; a single row is marked failed with the reason.
* A batch still unsent 23 hours after it formed cannot keep its key much longer: Resend forgets keys after
  24 hours. If no attempt could have delivered it (every answer was a 429, 401/403 or 409), its rows are
  re-formed into a new batch under a new key. If some attempt might have (a timeout, a reset, a 5xx), a
  new key could deliver twice, so its rows are marked failed instead, visible in status and health.

Requests are paced to Resend's rate limit (2 per second by default); a 429 or a refused API key pauses
every batch, not just the one that got it. Sent rows are kept 30 days.

The send-time re-check (SPEC §7.4): a batch nothing of which can have reached Resend yet (its first request,
or every earlier one definitely refused: no connection, a 429, a 401/403) is re-checked before its request.
Rows no longer owed (recipient unsubscribed, bounced, complained, disabled or deleted; watch deleted; a seat
email whose section was seen full since) move to ``seatwatch_outbox_suppressed`` with their reason. A batch
just formed goes on under its key without them (its key never reached Resend); an older one is retired and
its remaining rows form a new batch under a new key. A batch that may have reached Resend (an attempt
without an answer, a 5xx, or an attempt whose outcome was never recorded) is resent unchanged under its key.

Quotas (Resend's free tier: 100 emails a day, 3,000 a month): the sender counts the sent rows of today and of
this month (UTC) in Postgres and never starts a batch the configured quota cannot take; with nothing left, or
when Resend answers 429 naming its daily or monthly quota, sending pauses until the quota resets (the next UTC
midnight, or the first of the next month) without spending a retry, and health shows it (``quota_pause``).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

import anyio

from daemon import faults
from daemon.backoff import Backoff, Outage, retry_delay_s
from daemon.errors import EmailQuotaExceeded, EmailRejected, EmailRetry, StoreUnavailable, error_name
from daemon.store import outbox_queries as queries
from daemon.upstream.resend import BATCH_LIMIT, OutgoingEmail

if TYPE_CHECKING:
    from collections.abc import Callable

    from daemon.store.pool import Connection, Pool
    from daemon.telemetry import Metrics, Progress
    from daemon.upstream.resend import Transport

logger = logging.getLogger(__name__)

LEASE_S: Final = 120.0
GIVE_UP_AFTER_S: Final = 23 * 3600
RETENTION_DAYS: Final = 30
POLL_S: Final = 10.0
PURGE_EVERY_S: Final = 3600.0


@dataclass(frozen=True)
class Batch:
    """One leased batch of outbox rows, sent as one request under one idempotency key."""

    key: str
    attempts: int
    age_s: float
    ambiguous: bool
    emails: list[OutgoingEmail]
    types: list[str]


@dataclass(frozen=True)
class QuotaPause:
    """Sending paused until a quota resets: ``period`` (daily, monthly), until when (UTC), and why."""

    period: str
    until: datetime
    reason: str


def quota_reset(period: str, now: datetime) -> datetime:
    """When a ``daily`` (next UTC midnight) or ``monthly`` (first of next month, UTC) quota resets after ``now``."""
    now = now.astimezone(UTC)
    if period == "monthly":
        year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
        return datetime(year, month, 1, tzinfo=UTC)
    return datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)


class OutboxSender:
    """Drains ``seatwatch_outbox`` into the email transport, a batch at a time, until ``stopping``."""

    def __init__(
        self,
        pool: Pool,
        transport: Transport,
        metrics: Metrics,
        *,
        owner: str = "seatwatch",
        progress: Progress | None = None,
        requests_per_s: float = 2.0,
        retry_base_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        quota_per_day: int = 0,
        quota_per_month: int = 0,
        utc_now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.pool = pool
        self.owner = owner
        self.progress = progress
        self.transport = transport
        self.metrics = metrics
        self.min_interval_s = 1.0 / requests_per_s
        self.retry_base_s = retry_base_s
        self.clock = clock
        self._last_request = -1e9
        self._not_before = -1e9  # a 429 or a refused key pauses every batch until then
        self._wake = anyio.Event()
        self.failing = False  # the last request did not go through (health: degraded)
        self.last_error: str | None = None
        self.quota_per_day = quota_per_day  # 0: none
        self.quota_per_month = quota_per_month
        self.utc_now = utc_now
        self.quota_pause: QuotaPause | None = None  # health: degraded while set
        self._quota_reset_seen: datetime | None = None  # when the last quota 429's pause ended
        # The transport's own failure (the file transport's disk: full, not writable), not Postgres's: shown by
        # health's `email` check and warned about once per outage, with the path.
        self.transport_error: str | None = None
        self._transport_outage = Outage(f"outbox: the {getattr(transport, 'name', 'email')} transport", logger)

    def wake(self) -> None:
        """New rows were committed: send them now rather than at the next poll."""
        self._wake.set()

    async def run(self, stopping: anyio.Event) -> None:
        """Send until ``stopping``; a Postgres outage only delays (logged once, then retried)."""
        next_purge = self.clock()
        backoff = Backoff(1.0, 30.0, outage=Outage("outbox: Postgres", logger))
        leases_released = False
        while not stopping.is_set():
            # Created before sending, so a wake() during a long send is not lost.
            self._wake = anyio.Event()
            if self.progress is not None:
                self.progress.expect("outbox", POLL_S + 120)
            try:
                if not leases_released:
                    await self.release_own_leases()
                    leases_released = True
                while await self.send_one():
                    if stopping.is_set():
                        break
                    if self.progress is not None:
                        self.progress.expect("outbox", 120)
                if self.clock() >= next_purge:
                    await self.purge()
                    next_purge = self.clock() + PURGE_EVERY_S
            except StoreUnavailable as exc:
                # A batch this sender had leased may have been cut off mid-way (sent, not yet marked): once
                # Postgres answers, free it for a resend under its key now rather than after its lease.
                leases_released = False
                await backoff.wait(error_name(exc), stopping)
                continue
            backoff.succeeded()
            if stopping.is_set():
                break
            paused_s = self._not_before - self.clock()
            with anyio.move_on_after(min(POLL_S, paused_s) if paused_s > 0 else POLL_S):
                await self._wake.wait()
        if self.progress is not None:
            self.progress.done("outbox")

    async def release_own_leases(self) -> int:
        """At start: batches this sender (by name) had leased died with its previous process; send them now.

        They go again as the same batch under the same key, so one already delivered is not delivered twice.
        """
        async with self.pool.acquire() as conn:
            released = await queries.release_leases(conn, self.owner)
        if released:
            logger.info("outbox: resuming %d batches this daemon was sending when it stopped", released)
        return released

    async def drain(self) -> int:
        """Send everything that is due now; the number of batches attempted (tests, `demo`)."""
        count = 0
        while await self.send_one():
            count += 1
        return count

    # -- one batch --------------------------------------------------------------------------------------

    async def send_one(self) -> bool:
        """Lease one due batch (forming one if none is waiting) and send it. False when nothing is due."""
        if self.clock() < self._not_before:
            return False
        if self.quota_pause is not None and self.utc_now() >= self.quota_pause.until:
            self.quota_pause = None  # reset; the quota is counted again below
        room = await self._quota_room()
        if room == 0:
            return False
        batch = await self._lease_due_batch(room) or await self._form_batch(room)
        if batch is None:
            return False
        if not batch.ambiguous:
            recheck = await self._recheck(batch)
            if recheck is None:
                return True  # nothing of it is left to send under this key
            batch = recheck
        faults.point("batch_formed")
        await self._pace()
        try:
            ids = await self.transport.send(batch.key, batch.emails)
        except EmailQuotaExceeded as exc:
            await self._quota_exceeded(batch, exc)
        except OSError as exc:  # the file transport's disk; a Postgres outage is StoreUnavailable, raised elsewhere
            await self._transport_failed(batch, exc)
        except EmailRetry as exc:
            if exc.pause_all and exc.retry_after_s:
                self._not_before = self.clock() + exc.retry_after_s
            await self._retry(batch, str(exc), exc.retry_after_s, ambiguous=exc.ambiguous)
        except EmailRejected as exc:
            await self._rejected(batch, str(exc))
        else:
            faults.point("reply_received")
            await self._sent(batch, ids)
        return True

    async def _pace(self) -> None:
        wait_s = self._last_request + self.min_interval_s - self.clock()
        if wait_s > 0:
            await anyio.sleep(wait_s)
        self._last_request = self.clock()

    async def _quota_room(self) -> int:
        """How many emails the next batch may hold: the batch limit, or what is left of the quotas."""
        if not self.quota_per_day and not self.quota_per_month:
            return BATCH_LIMIT
        async with self.pool.acquire() as conn:
            today, month = await queries.sent_counts(conn)
        room = BATCH_LIMIT
        for period, quota, sent in (("monthly", self.quota_per_month, month), ("daily", self.quota_per_day, today)):
            if quota and sent >= quota:
                self._pause(period, f"the {period} quota of {quota} emails is used up ({sent} sent)")
                return 0
            if quota:
                room = min(room, quota - sent)
        return room

    def _pause(self, period: str, reason: str, wait_s: float | None = None) -> float:
        """Send nothing until the ``period`` quota resets (or for ``wait_s``); the seconds paused."""
        now = self.utc_now()
        until = quota_reset(period, now)
        if wait_s is not None:
            until = now + timedelta(seconds=wait_s)
        wait_s = max(1.0, (until - now).total_seconds())
        self._not_before = self.clock() + wait_s
        if self.quota_pause is None or self.quota_pause.until != until:
            logger.warning("outbox: sending paused until %s: %s", until.isoformat(timespec="seconds"), reason)
        self.quota_pause = QuotaPause(period, until, reason)
        return wait_s

    async def _quota_exceeded(self, batch: Batch, exc: EmailQuotaExceeded) -> None:
        """Resend's quota is used up: the same batch waits for the reset, the attempt not counted.

        The reset is Resend's Retry-After when it gives one, else the UTC day's or month's end. Refused again
        just after such a reset (Resend may count its day differently), the next look is an hour later, not a
        day: at most 24 requests a day go to a quota that is still used up.
        """
        # A Retry-After under a minute is a rate limit's, not a quota's reset: asking every few seconds is what
        # this pause exists to stop.
        wait_s = exc.retry_after_s if exc.retry_after_s is not None and exc.retry_after_s >= 60 else None
        if wait_s is None and self._quota_reset_seen is not None and self.utc_now() >= self._quota_reset_seen:
            wait_s = min(3600.0, (quota_reset(exc.period, self.utc_now()) - self.utc_now()).total_seconds())
        wait_s = self._pause(exc.period, str(exc), wait_s)
        assert self.quota_pause is not None
        self._quota_reset_seen = self.quota_pause.until
        async with self.pool.acquire() as conn:
            await queries.schedule_retry(conn, batch.key, wait_s, str(exc), False, counted=False)

    async def _lease_due_batch(self, room: int = BATCH_LIMIT) -> Batch | None:
        async with self.pool.acquire() as conn, conn.transaction():
            due = await queries.lease_due_batch(conn, LEASE_S, self.owner, room)
            if due is None:
                return None
            return await self._load(conn, due.key, due.attempt, due.age_s, due.ambiguous)

    async def _form_batch(self, room: int = BATCH_LIMIT) -> Batch | None:
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await queries.unbatched_rows(conn, room)
            if not rows:
                return None
            # A row split out of a rejected batch travels alone; others fill the batch in id order.
            first_id, first_solo = rows[0]
            ids = [first_id] if first_solo else [row_id for row_id, solo in rows if not solo]
            key = f"seatwatch-{uuid.uuid4()}"
            await queries.create_batch(conn, key, ids, LEASE_S, self.owner)
            return await self._load(conn, key, 1, 0.0, False)

    async def _load(self, conn: Connection, key: str, attempts: int, age_s: float, ambiguous: bool) -> Batch:
        rows = await queries.batch_rows(conn, key)
        return Batch(
            key=key,
            attempts=attempts,
            age_s=age_s,
            ambiguous=ambiguous,
            emails=[OutgoingEmail(r.id, r.payload) for r in rows],
            types=[r.notification_type for r in rows],
        )

    async def _recheck(self, batch: Batch) -> Batch | None:
        """Drop the rows no longer owed (SPEC §7.4); the batch to send now, or None if none is left to send."""
        async with self.pool.acquire() as conn, conn.transaction():
            reasons = await queries.ineligible(conn, [e.row_id for e in batch.emails])
            if not reasons:
                return batch
            await queries.suppress(conn, reasons)
            left = len(batch.emails) - len(reasons)
            result: Batch | None = None
            if left == 0:
                await queries.close_empty_batch(conn, batch.key, "every email suppressed before it was sent")
            elif batch.attempts > 1:
                # Its key went to Resend before (and was refused): the rest go again under a new key.
                await queries.retire_batch(conn, batch.key, "emails suppressed; the rest re-formed", solo=False)
            else:
                result = await self._load(conn, batch.key, batch.attempts, batch.age_s, batch.ambiguous)
        types = dict(zip([e.row_id for e in batch.emails], batch.types, strict=True))
        for row_id, reason in reasons.items():
            self.metrics.emails.labels(types.get(row_id, "unknown"), "suppressed").inc()
            self.metrics.suppressed.labels(reason).inc()
            logger.info("outbox: email %d of batch %s suppressed before sending: %s", row_id, batch.key, reason)
        return result

    # -- outcomes ----------------------------------------------------------------------------------------

    async def _transport_failed(self, batch: Batch, exc: OSError) -> None:
        """The transport could not write (disk full, permissions): the same batch again later, warned once."""
        where = f" {exc.filename}" if exc.filename else ""
        reason = f"{exc.__class__.__name__}: {exc.strerror or exc}{where}"
        self.failing, self.last_error, self.transport_error = True, reason, reason
        self._transport_outage.down(reason)
        delay_s = retry_delay_s(batch.attempts, self.retry_base_s, cap_s=60)
        async with self.pool.acquire() as conn:
            await queries.schedule_retry(conn, batch.key, delay_s, reason, False)
        logger.debug("outbox: batch %s again in %.0fs: %s", batch.key, delay_s, reason)

    async def _sent(self, batch: Batch, ids: list[str]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await queries.mark_sent(conn, batch.key, [e.row_id for e in batch.emails], ids)
        for kind in batch.types:
            self.metrics.emails.labels(kind, "sent").inc()
        self.failing, self.last_error, self.quota_pause, self._quota_reset_seen = False, None, None, None
        self.transport_error = None
        self._transport_outage.up()
        logger.info("outbox: batch %s sent (%d emails, attempt %d)", batch.key, len(batch.emails), batch.attempts)

    async def _retry(self, batch: Batch, reason: str, retry_after_s: float | None, *, ambiguous: bool) -> None:
        self.failing, self.last_error = True, reason
        if batch.age_s >= GIVE_UP_AFTER_S:
            # batch.ambiguous counts an attempt whose outcome was never recorded too.
            if batch.ambiguous or ambiguous:
                await self._fail_rows(
                    batch,
                    f"unsent after {batch.age_s / 3600:.0f}h and maybe delivered once; "
                    f"not resent under a new key; last error: {reason}",
                )
            else:
                await self._reform(batch, f"key about to expire after {batch.age_s / 3600:.0f}h; {reason}")
            return
        delay_s = (
            retry_after_s if retry_after_s is not None else retry_delay_s(batch.attempts, self.retry_base_s, cap_s=600)
        )
        async with self.pool.acquire() as conn:
            await queries.schedule_retry(conn, batch.key, delay_s, reason, ambiguous)
        logger.warning(
            "outbox: batch %s (%d emails) attempt %d failed, same batch again in %.0fs: %s",
            batch.key,
            len(batch.emails),
            batch.attempts,
            delay_s,
            reason,
        )

    async def _reform(self, batch: Batch, reason: str, *, solo: bool = False) -> None:
        """Nothing of this batch was delivered: its rows go back to pending, to be batched under a new key."""
        async with self.pool.acquire() as conn, conn.transaction():
            await queries.retire_batch(conn, batch.key, reason, solo=solo)
        logger.warning(
            "outbox: batch %s retired (%s); its %d emails go again under a new key",
            batch.key,
            reason,
            len(batch.emails),
        )

    async def _rejected(self, batch: Batch, reason: str) -> None:
        if len(batch.emails) == 1:
            await self._fail_rows(batch, reason)
            return
        # Nothing of this batch was sent, so its rows may go again under new keys, each on its own, so that
        # one bad address cannot sink the others.
        await self._reform(batch, reason, solo=True)

    async def _fail_rows(self, batch: Batch, reason: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await queries.fail_batch_rows(conn, batch.key, reason)
        for kind in batch.types:
            self.metrics.emails.labels(kind, "failed").inc()
        logger.error("outbox: %d emails of batch %s failed: %s", len(batch.emails), batch.key, reason)

    async def purge(self) -> int:
        """Delete sent and failed rows older than the retention, and their batches."""
        async with self.pool.acquire() as conn, conn.transaction():
            deleted = await queries.purge(conn, RETENTION_DAYS)
        if deleted:
            logger.info("outbox: purged %d rows older than %d days", deleted, RETENTION_DAYS)
        return deleted
