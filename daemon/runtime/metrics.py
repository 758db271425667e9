"""The Prometheus exposition for ``GET /metrics``, on a registry of seatwatch's own.

Counters move as things happen; gauges are refreshed from what the daemon last saw, just before each
exposition, so a scrape never costs a Redis command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector

if TYPE_CHECKING:
    from collections.abc import Mapping

    from daemon.primitives.breaker import BreakerState
    from daemon.primitives.queue import QueueStats

BREAKER_STATES = ("CLOSED", "HALF_OPEN", "OPEN")


class Metrics:
    """The Prometheus registry: counters the loops increment, gauges refreshed from the daemon's state."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        self.sections = Counter("seatwatch_sections_checked", "Section checks by result", ["result"], registry=r)
        self.scrape_seconds = Histogram(
            "seatwatch_scrape_duration_seconds",
            "Duration of one scrape request",
            buckets=(0.25, 0.5, 1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120),
            registry=r,
        )
        self.scraper_drift = Counter(
            "seatwatch_scraper_drift",
            "Odd describing fields in scraper answers (recorded anyway), by field and kind",
            ["field", "kind"],
            registry=r,
        )
        self.notifications = Counter(
            "seatwatch_notifications_queued",
            "Emails owed (outbox rows written) by type",
            ["type"],
            registry=r,
        )
        self.emails = Counter(
            "seatwatch_emails", "Emails by type and outcome (sent, failed, suppressed)", ["type", "outcome"], registry=r
        )
        self.suppressed = Counter(
            "seatwatch_emails_suppressed",
            "Emails kept back by the send-time re-check (SPEC §7.4), by reason",
            ["reason"],
            registry=r,
        )
        self.jobs = Counter("seatwatch_jobs", "Queue jobs by outcome", ["outcome"], registry=r)
        self.ticks = Counter("seatwatch_ticks", "Scheduler ticks by result", ["result"], registry=r)
        self.sections_enqueued = Counter("seatwatch_sections_enqueued", "Sections enqueued by ticks", registry=r)
        self.queue_jobs = Gauge("seatwatch_queue_jobs", "Jobs in the queue by state", ["state"], registry=r)
        self.dead_letters = Gauge("seatwatch_queue_dead_letters", "Jobs in the dead-letter stream", registry=r)
        self.outbox_rows = Gauge(
            "seatwatch_outbox_rows",
            "Outbox rows by status (pending, failed; suppressed: kept back in the last 30 days)",
            ["status"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "seatwatch_breaker_state",
            "1 for the breaker's current state, 0 for the others",
            ["state"],
            registry=r,
        )
        self.redis_commands = Gauge(
            "seatwatch_redis_commands",
            "Redis commands sent by this process since start, by purpose",
            ["purpose"],
            registry=r,
        )
        self.schedule = Gauge(
            "seatwatch_schedule",
            "Checking schedule (SPEC §11): coverage, behind, interval_p50_s, interval_p95_s, "
            "scrapes_last_hour, concurrency_limit",
            ["figure"],
            registry=r,
        )
        self.schedule_binding = Gauge(
            "seatwatch_schedule_binding", "1 for the budget that limits checking now", ["budget"], registry=r
        )
        self.email_quota = Gauge(
            "seatwatch_email_quota",
            "Resend's quotas (0: none) and the emails sent against them (UTC day and month); paused: 1 while "
            "sending waits for a quota to reset",
            ["figure"],
            registry=r,
        )
        self._jobs_seen: dict[str, int] = {}
        self.snapshot_age = Gauge(
            "seatwatch_snapshot_age_seconds", "Age of the figures behind the gauges", ["source"], registry=r
        )

    def refresh(
        self,
        *,
        queue: QueueStats | None,
        breaker: BreakerState | None,
        outbox: Mapping[str, int] | None,
        redis_commands: Mapping[str, int],
        ages: Mapping[str, float | None],
        jobs: Mapping[str, int] | None = None,
        schedule: Mapping[str, Any] | None = None,
        email: Mapping[str, Any] | None = None,
    ) -> None:
        """Set the gauges from what the daemon last saw (``runtime.report`` calls this for /metrics)."""
        if email is not None:
            for figure in ("per_day", "per_month", "sent_today", "sent_this_month"):
                value = email.get(figure)
                self.email_quota.labels(figure).set(value if isinstance(value, int) else 0)
            self.email_quota.labels("paused").set(1 if email.get("paused_until") else 0)
        if schedule is not None:
            self._refresh_schedule(schedule)
        if queue is not None:
            for state, value in (
                ("waiting", queue.waiting),
                ("pending", queue.pending),
                ("delayed", queue.delayed),
            ):
                self.queue_jobs.labels(state).set(value)
            self.dead_letters.set(queue.dead_letters)
        if breaker is not None:
            for state in BREAKER_STATES:
                self.breaker_state.labels(state).set(1 if breaker.state == state else 0)
        if outbox is not None:
            for status in ("pending", "failed", "suppressed"):
                self.outbox_rows.labels(status).set(outbox.get(status, 0))
        for purpose, count in redis_commands.items():
            self.redis_commands.labels(purpose).set(count)
        for outcome, count in (jobs or {}).items():
            # The consumer keeps running totals; the counter moves by what happened since the last look.
            delta = count - self._jobs_seen.get(outcome, 0)
            if delta > 0:
                self.jobs.labels(outcome).inc(delta)
            self._jobs_seen[outcome] = count
        for source, age in ages.items():
            if age is not None:
                self.snapshot_age.labels(source).set(age)

    def _refresh_schedule(self, check: Mapping[str, Any]) -> None:
        for figure in ("coverage", "behind", "interval_p50_s", "interval_p95_s", "scrapes_last_hour"):
            value = check.get(figure)
            if isinstance(value, (int, float)):
                self.schedule.labels(figure).set(value)
        concurrency = check.get("concurrency")
        if isinstance(concurrency, dict) and isinstance(concurrency.get("limit"), int):
            self.schedule.labels("concurrency_limit").set(concurrency["limit"])
        for budget in ("scrapes_per_hour", "redis_budget_per_day", "scraper_capacity", "min_interval"):
            self.schedule_binding.labels(budget).set(1 if check.get("binding") == budget else 0)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
