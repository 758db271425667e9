"""One section end to end: scrape (under the breaker's admission), then ONE Postgres transaction.

The transaction, holding the section's lock: record the observation and read the state it replaces;
detect edges; reset seat claims on a fill; claim notifications atomically; write one fully rendered
outbox row per claim this transaction made. Then the queue acknowledges the job. A crash before commit
changes nothing (the job is redelivered); after commit the emails are owed and the outbox sends them.

Round trips: BEGIN, observe, COMMIT when nothing happened; plus claim and the outbox insert on an edge.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from daemon import faults
from daemon.detect import Changes, Drift, Observation, detect
from daemon.errors import (
    DeferJob,
    PermanentJobError,
    RetryableJobError,
    ScrapeError,
    ScrapeRateLimited,
    ScrapeRejected,
    SectionNotFound,
    StoreUnavailable,
    error_name,
)
from daemon.settings.logs import mask_email
from daemon.store import db

if TYPE_CHECKING:
    from collections.abc import Callable

    from daemon.jobs import Job
    from daemon.primitives.breaker import OutcomeKind
    from daemon.store.pool import Connection, Pool
    from daemon.telemetry import Metrics
    from daemon.upstream.render import Renderer
    from daemon.upstream.scraper import Scraper

logger = logging.getLogger(__name__)

DB_OUTAGE_DEFER_S = 30.0
DRIFT_LOG_INTERVAL_S = 3600.0


@dataclass
class Ticket:
    """What the check gets (from the consumer or the adaptive taker): the job, and where to say how the
    breaker-guarded call went."""

    job: Job
    trial: str = ""
    breaker: OutcomeKind = "n"
    read_at: float = 0.0  # when the reader got it (its idle time in Redis counts from about then)

    def success(self) -> None:
        """The breaker-guarded call succeeded."""
        self.breaker = "s"

    def failure(self) -> None:
        """The breaker-guarded call failed (the upstream's fault)."""
        self.breaker = "f"


@dataclass(frozen=True)
class SectionResult:
    """What one section's check did: the changes seen and the emails queued."""

    changes: Changes
    emails: int
    previous_source: str | None
    claimed: list[db.Claim] = field(default_factory=list)


class Pipeline:
    """The queue's handler for section jobs."""

    def __init__(
        self,
        pool: Pool,
        scraper: Scraper,
        renderer: Renderer,
        metrics: Metrics,
        *,
        on_emails: Callable[[], None] = lambda: None,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.pool = pool
        self.scraper = scraper
        self.renderer = renderer
        self.metrics = metrics
        self.on_emails = on_emails
        self.clock_ms = clock_ms
        self.drift = DriftReport(metrics)

    async def __call__(self, ticket: Ticket) -> None:
        job = ticket.job
        started = time.perf_counter()
        try:
            observation = await self.scraper.scrape(job.term, job.class_nbr)
        except SectionNotFound as exc:
            ticket.success()
            self.metrics.sections.labels("not_found").inc()
            logger.warning("section %s not found by the scraper: %s", job.id, exc)
            return
        except ScrapeRejected as exc:
            ticket.success()
            self.metrics.sections.labels("rejected").inc()
            raise PermanentJobError(str(exc)) from exc
        except ScrapeRateLimited as exc:
            self.metrics.sections.labels("rate_limited").inc()
            raise DeferJob(str(exc), exc.retry_after_s) from exc
        except ScrapeError as exc:
            ticket.failure()
            self.metrics.sections.labels("scrape_failed").inc()
            raise RetryableJobError(str(exc)) from exc
        finally:
            self.metrics.scrape_seconds.observe(time.perf_counter() - started)
        ticket.success()
        faults.point("after_scrape")
        self.drift.report(job.id, observation)

        try:
            result = await self.record_retrying(job.id, job.term, job.class_nbr, observation)
        except StoreUnavailable as exc:
            self.metrics.sections.labels("db_unavailable").inc()
            raise DeferJob(f"Postgres unavailable: {error_name(exc)}", DB_OUTAGE_DEFER_S) from exc

        changes = result.changes
        outcome = "first" if changes.first_observation else ("changed" if changes.touches_claims else "unchanged")
        self.metrics.sections.labels(outcome).inc()
        for claim in result.claimed:
            self.metrics.notifications.labels(claim.notification_type).inc()
            logger.info(
                "section %s: %s owed to watch %s (%s)",
                job.id,
                claim.notification_type,
                claim.watch_id,
                mask_email(claim.email),
            )
        if changes.touches_claims or changes.first_observation:
            logger.info(
                "section %s checked (attempt %d): open=%d %s, %d emails queued",
                job.id,
                job.attempt,
                observation.open_seats,
                _describe(changes, result.previous_source),
                result.emails,
            )
        else:
            logger.debug("section %s checked: open=%d, no change", job.id, observation.open_seats)
        if result.emails:
            self.on_emails()

    async def record_retrying(self, job_id: str, term: str, class_nbr: str, observation: Observation) -> SectionResult:
        """``record``, once more on a fresh connection if the first one was lost (a pooler or network blip).

        Safe whatever the lost attempt did: rolled back, it is simply redone; committed (its COMMIT's reply
        lost), the retry observes the same state again, finds no edge and claims nothing, and the emails the
        first attempt committed are owed already, so the outbox is woken for them. A second loss defers the job.
        """
        try:
            return await self.record(term, class_nbr, observation)
        except StoreUnavailable as exc:
            logger.warning(
                "section %s: Postgres connection lost (%s); once more on a fresh connection",
                job_id,
                error_name(exc),
            )
        result = await self.record(term, class_nbr, observation)
        self.on_emails()
        return result

    async def record(self, term: str, class_nbr: str, observation: Observation) -> SectionResult:
        """The one transaction of a section check."""
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                result = await self._record(conn, term, class_nbr, observation)
                faults.point("before_commit")
            faults.point("after_commit")
        return result

    async def _record(self, conn: Connection, term: str, class_nbr: str, observation: Observation) -> SectionResult:
        previous = await db.observe(conn, term, class_nbr, observation.row())
        faults.point("after_observe")
        changes = detect(previous, observation)
        if not changes.touches_claims:
            return SectionResult(changes, 0, previous.source if previous else None)
        claims = await db.claim(
            conn, term, class_nbr, reset_seat=changes.seats_filled, types=changes.notification_types
        )
        faults.point("after_claim")
        now_ms = self.clock_ms()
        courses: dict[str, tuple[str, str]] = {}
        if claims and (observation.subject is None or observation.catalog_nbr is None):
            # The scraper's course code is unusable: each email names the course as its watch does.
            courses = await db.watch_courses(conn, [claim.watch_id for claim in claims])
        rows = []
        for claim in claims:
            described = observation
            if claim.watch_id in courses:
                subject, catalog_nbr = courses[claim.watch_id]
                described = replace(
                    observation,
                    subject=observation.subject or subject,
                    catalog_nbr=observation.catalog_nbr or catalog_nbr,
                )
            rendered = self.renderer.render(
                claim.notification_type,
                term,
                class_nbr,
                described,
                to=claim.email,
                user_id=claim.user_id,
                now_ms=now_ms,
            )
            rows.append(
                db.OutboxRow(
                    claim.watch_id,
                    claim.user_id,
                    claim.notification_type,
                    term,
                    class_nbr,
                    rendered.payload,
                    rendered.token,
                )
            )
        await db.insert_outbox(conn, rows)
        faults.point("after_outbox_insert")
        return SectionResult(changes, len(rows), previous.source if previous else None, claims)


class DriftReport:
    """Odd describing fields of scraper answers: counted by field and kind in ``/metrics`` and logged as
    one warning per field and kind per hour, naming an example section. They never fail a check."""

    def __init__(
        self, metrics: Metrics, *, interval_s: float = DRIFT_LOG_INTERVAL_S, now: Callable[[], float] = time.monotonic
    ) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self.now = now
        self._warned_at: dict[Drift, float] = {}

    def report(self, section_id: str, observation: Observation) -> None:
        """Count the observation's odd describing fields; log each kind at most once an interval."""
        for drift in observation.drift:
            field_name, kind = drift
            self.metrics.scraper_drift.labels(field_name, kind).inc()
            now = self.now()
            last = self._warned_at.get(drift)
            if last is None or now - last >= self.interval_s:
                self._warned_at[drift] = now
                logger.warning(
                    "scraper drift: %s is %s (e.g. section %s); the seat decision went ahead "
                    "(this warning repeats at most hourly per field and kind)",
                    field_name,
                    kind.replace("_", " "),
                    section_id,
                )


def _describe(changes: Changes, source: str | None) -> str:
    if changes.first_observation:
        return "(first observation)"
    parts = []
    if changes.seat_opened:
        parts.append("seats opened")
    if changes.seats_filled:
        parts.append("seats filled (claims reset)")
    if changes.instructor_assigned:
        parts.append("instructor assigned")
    text = ", ".join(parts) or "no edge"
    return f"{text}; previous state from {source}" if source == "class_states" else text
