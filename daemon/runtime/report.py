"""One view of the daemon's state: what health, ``seatwatch status``, ``/metrics`` and systemd's STATUS= show.

Each part of the state has one view function here (``breaker_view``, ``lock_view``, ``queue_view``), and every
reader builds from them, so health and status cannot disagree. Times are ISO 8601 in UTC with milliseconds
(``iso``), everywhere; durations are numbers with their unit in the key (``time_held_ms``, ``age_s``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

from daemon.version import version

if TYPE_CHECKING:
    from collections.abc import Mapping

    import anyio

    from daemon.adaptive.taker import Taker
    from daemon.checks.consumer import Consumer
    from daemon.checks.outbox import OutboxSender
    from daemon.cron.scheduler import Scheduler
    from daemon.primitives.breaker import BreakerState
    from daemon.primitives.queue import QueueStats
    from daemon.runtime.monitor import Monitor
    from daemon.runtime.schedule import CronWatch
    from daemon.runtime.wiring import Parts
    from daemon.settings.config import Settings

STATUS_CODES: Final = {"healthy": 200, "degraded": 503, "unhealthy": 500}


class Running(Protocol):
    """What these functions read of the running daemon (``runtime.supervisor.Daemon`` is one); read-only, so
    the report imports no supervisor."""

    @property
    def settings(self) -> Settings: ...
    @property
    def monitor(self) -> Monitor: ...
    @property
    def parts(self) -> Parts: ...
    @property
    def consumer(self) -> Consumer | None: ...
    @property
    def scheduler(self) -> Scheduler | None: ...
    @property
    def outbox(self) -> OutboxSender | None: ...
    @property
    def taker(self) -> Taker | None: ...
    @property
    def cron_watch(self) -> CronWatch | None: ...
    @property
    def started_at(self) -> float: ...
    @property
    def starting(self) -> str: ...
    @property
    def stopping(self) -> anyio.Event: ...
    @property
    def ready(self) -> bool: ...


def iso(epoch_s: float | None) -> str | None:
    """``2026-01-15T16:53:20.000Z`` (UTC, milliseconds), or None."""
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_ms(epoch_ms: int | None) -> str | None:
    """``iso`` of a time in epoch milliseconds (how Redis scripts give times); None for None or 0."""
    return iso(epoch_ms / 1000) if epoch_ms else None


# -- the views -------------------------------------------------------------------------------------------


def breaker_view(breaker: BreakerState | None) -> dict[str, Any]:
    """The breaker as health and status show it (CLOSED with zero counts when nothing was seen yet)."""
    if breaker is None:
        return {
            "state": "CLOSED",
            "failure_count": 0,
            "success_count": 0,
            "last_failure": None,
            "last_state_change": None,
            "half_open_in_flight": 0,
            "retry_after_s": 0.0,
        }
    return {
        "state": breaker.state,
        "failure_count": breaker.failures,
        "success_count": breaker.successes,
        "last_failure": iso_ms(breaker.last_failure_ms),
        "last_state_change": iso_ms(breaker.last_change_ms),
        "half_open_in_flight": breaker.in_flight,
        "retry_after_s": breaker.retry_after_s,
    }


def lock_view(
    holder: str | None,
    acquired_at_ms: int | None,
    expires_at_ms: int | None,
    now_ms: int,
    *,
    time_held_ms: int | None = None,
) -> dict[str, Any]:
    """The cron lock: held by ``holder`` since ``acquired_at_ms`` until ``expires_at_ms``, or free (holder None).

    ``time_held_ms`` when Redis measured it (by its own clock), else ``now_ms - acquired_at_ms``.
    """
    if holder is None or acquired_at_ms is None:
        return {
            "locked": False,
            "lock_holder": None,
            "lock_acquired_at": None,
            "time_held_ms": None,
            "expires_at": None,
        }
    return {
        "locked": True,
        "lock_holder": holder,
        "lock_acquired_at": iso_ms(acquired_at_ms),
        "time_held_ms": now_ms - acquired_at_ms if time_held_ms is None else time_held_ms,
        "expires_at": iso_ms(expires_at_ms),
    }


def queue_view(stats: QueueStats | None) -> dict[str, Any]:
    """The queue's four counts (None each when not seen yet)."""
    if stats is None:
        return {"waiting": None, "pending": None, "delayed": None, "dead_letters": None}
    return stats.as_dict()


# -- health ----------------------------------------------------------------------------------------------


@dataclass
class Probe:
    """The last liveness probe of one dependency."""

    ok: bool = False
    latency_ms: float | None = None
    error: str | None = None
    at: float | None = None  # monotonic

    def check(self, now: float) -> dict[str, Any]:
        """The health check of this dependency, with the probe's age ("unknown" before it was ever tried: at
        start the daemon waits for Redis, then for Postgres)."""
        if self.at is None:
            return {"status": "unknown", "connected": None, "age_s": None, "note": "not tried yet"}
        body: dict[str, Any] = {"status": "healthy" if self.ok else "unhealthy", "connected": self.ok}
        if self.latency_ms is not None and self.ok:
            body["latency_ms"] = round(self.latency_ms, 2)
        if self.error and not self.ok:
            body["error"] = self.error
        body["age_s"] = None if self.at is None else round(now - self.at, 1)
        return body


@dataclass
class HealthReport:
    """A health answer: the overall status and the JSON body."""

    status: str
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def code(self) -> int:
        """The HTTP status: 200 healthy, 503 degraded, 500 unhealthy."""
        return STATUS_CODES[self.status]


def overall(checks: dict[str, dict[str, Any]]) -> str:
    """The worst status among ``checks``."""
    statuses = {c.get("status") for c in checks.values()}
    if "unhealthy" in statuses:
        return "unhealthy"
    if "degraded" in statuses:
        return "degraded"
    return "healthy"


def health(daemon: Running) -> HealthReport:
    """The daemon's health, from what it last saw (no Redis command)."""
    now = time.monotonic()
    settings, monitor = daemon.settings, daemon.monitor
    state = daemon.consumer.state if daemon.consumer else None
    checks: dict[str, dict[str, Any]] = {
        "database": monitor.db_probe.check(now),
        "redis": monitor.redis_probe.check(now),
    }
    breaker = state.breaker if state else None
    checks["circuit_breaker"] = {
        "status": "healthy" if breaker is None or breaker.state == "CLOSED" else "degraded",
        **breaker_view(breaker),
        "age_s": round(now - state.breaker_at, 1) if state and state.breaker_at else None,
    }
    checks["cron_lock"] = {"status": "healthy", **_lock_seen(daemon)}
    checks["queue"] = {
        "status": "healthy",
        **queue_view(state.stats if state else None),
        "running_here": state.running if state else 0,
        "age_s": round(now - state.stats_at, 1) if state and state.stats_at else None,
    }
    sched = daemon.scheduler
    last = sched.last_tick if sched else None
    checks["scheduler"] = {
        "status": "degraded" if sched and sched.overdue() else "healthy",
        "schedule": settings.cron,
        "timezone": settings.timezone,
        "stagger": settings.stagger,
        "last_tick": last.as_dict() if last else None,
        "next_tick": sched.next_tick.isoformat() if sched and sched.next_tick else None,
    }
    counts = monitor.outbox_counts or {}
    outbox = daemon.outbox
    failing = bool(outbox and outbox.failing) or counts.get("failed_24h", 0) > 0
    checks["outbox"] = {
        "status": "degraded" if failing else "healthy",
        "pending": counts.get("pending"),
        "failed": counts.get("failed"),
        "failed_24h": counts.get("failed_24h"),
        "last_error": outbox.last_error if outbox else None,
    }
    configured = settings.email_transport == "file" or bool(settings.resend_api_key)
    pause = outbox.quota_pause if outbox else None
    transport_error = outbox.transport_error if outbox else None
    checks["email"] = {
        "status": "unhealthy" if not configured else ("degraded" if pause or transport_error else "healthy"),
        "configured": configured,
        "transport": settings.email_transport,
        "error": transport_error,
        "quota": health_email_quota(daemon),
    }
    checks["schedule"] = schedule_check(daemon)
    checks["configuration"] = {
        "status": "healthy",
        "consumer": settings.consumer,
        "concurrency": "auto" if settings.concurrency_auto else settings.concurrency,
        "stagger": settings.stagger,
        "schedule": settings.schedule,
    }
    # Until READY=1 the daemon does no work, whatever each store says (it may be applying migrations).
    status = overall(checks) if daemon.ready else "unhealthy"
    body = {
        "timestamp": iso(time.time()),
        "status": status,
        "version": version(),
        "checks": checks,
        "uptime_s": round(time.time() - daemon.started_at),
    }
    if not daemon.ready:
        body["starting"] = daemon.starting
    return HealthReport(status, body)


def email_quota_view(
    per_day: int,
    per_month: int,
    counts: Mapping[str, Any] | None,
    *,
    paused_until: float | None = None,
    paused_by: str | None = None,
) -> dict[str, Any]:
    """Resend's quotas (0: none) against the emails sent today and this month (UTC), and a pause if one holds."""
    counts = counts or {}
    today, month = counts.get("sent_today"), counts.get("sent_this_month")
    return {
        "per_day": per_day or None,
        "per_month": per_month or None,
        "sent_today": today,
        "sent_this_month": month,
        "left_today": max(0, per_day - today) if per_day and isinstance(today, int) else None,
        "left_this_month": max(0, per_month - month) if per_month and isinstance(month, int) else None,
        "paused_until": iso(paused_until),
        "paused_by": paused_by,
    }


def schedule_check(daemon: Running) -> dict[str, Any]:
    """SPEC §11's ``schedule`` check: adaptive figures, or cron's falling-behind report (from memory)."""
    if daemon.taker is not None:
        return daemon.taker.check()
    if daemon.cron_watch is not None:
        return daemon.cron_watch.check()
    return {"status": "healthy", "mode": daemon.settings.schedule}


def _lock_seen(daemon: Running) -> dict[str, Any]:
    """The lock as this daemon last saw it: held by its own tick, or by another holder that refused it."""
    sched = daemon.scheduler
    held = sched.holding if sched else None
    seen = sched.last_busy if sched else None
    now_ms = int(time.time() * 1000)
    if held is not None:
        return lock_view(daemon.settings.consumer, held.acquired_at_ms, held.expires_at_ms, now_ms)
    if seen is not None and seen.expires_at_ms > now_ms:
        return lock_view(seen.holder, seen.acquired_at_ms, seen.expires_at_ms, now_ms)
    return lock_view(None, None, None, now_ms)


# -- systemd STATUS= and /metrics ---------------------------------------------------------------------------


def status_line(daemon: Running) -> str:
    """The one-line summary systemd shows (``STATUS=``)."""
    state = daemon.consumer.state if daemon.consumer else None
    stats = state.stats if state else None
    breaker = breaker_view(state.breaker if state else None)
    last = daemon.scheduler.last_tick if daemon.scheduler else None
    redis_ok, db_ok = daemon.monitor.redis_probe.ok, daemon.monitor.db_probe.ok
    parts = [
        "draining" if daemon.stopping.is_set() else "running",
        f"breaker {breaker['state']}",
        f"jobs running {state.running if state else 0}",
    ]
    if stats:
        parts.append(f"waiting {stats.waiting} delayed {stats.delayed} dead {stats.dead_letters}")
    if last:
        parts.append(f"last tick {last.slot or 'manual'} +{last.enqueued}")
    if not (redis_ok and db_ok):
        parts.append("redis " + ("up" if redis_ok else "DOWN") + ", postgres " + ("up" if db_ok else "DOWN"))
    return "; ".join(parts)


def health_email_quota(daemon: Running) -> dict[str, Any]:
    """``email_quota_view`` as this daemon sees it (its sender's pause, the monitor's counts)."""
    settings, outbox = daemon.settings, daemon.outbox
    resend = settings.email_transport == "resend"
    pause = outbox.quota_pause if outbox else None
    return email_quota_view(
        settings.email_quota_per_day if resend else 0,
        settings.email_quota_per_month if resend else 0,
        daemon.monitor.outbox_counts,
        paused_until=pause.until.timestamp() if pause else None,
        paused_by=pause.reason if pause else None,
    )


def metrics_exposition(daemon: Running) -> bytes:
    """``/metrics``: the Prometheus text, refreshed from the same state health reads."""
    state = daemon.consumer.state if daemon.consumer else None
    now = time.monotonic()
    monitor, parts = daemon.monitor, daemon.parts
    parts.metrics.refresh(
        queue=state.stats if state else None,
        breaker=state.breaker if state else None,
        outbox=monitor.outbox_counts,
        redis_commands=dict(parts.clients.usage.total),
        schedule=schedule_check(daemon),
        email=health_email_quota(daemon),
        jobs={
            "completed": state.completed,
            "retried": state.retried,
            "deferred": state.deferred,
            "dead_lettered": state.dead_lettered,
        }
        if state
        else None,
        ages={
            "queue": now - state.stats_at if state and state.stats_at else None,
            "breaker": now - state.breaker_at if state and state.breaker_at else None,
            "database": now - monitor.db_probe.at if monitor.db_probe.at else None,
        },
    )
    return parts.metrics.exposition()
