"""The ``schedule`` figures outside the adaptive loop: cron mode's falling-behind check (health, metrics) and
``seatwatch status``'s view of the schedule, with what adaptive checking could reach (SPEC §11)."""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

from daemon.adaptive import plan as planner
from daemon.adaptive.figures import DEFAULT_COMMANDS_PER_CHECK, IDLE_FLOOR_PER_DAY, WARN_EVERY_S
from daemon.store import adaptive_queries, db

if TYPE_CHECKING:
    import asyncpg

    from daemon.cron.scheduler import Scheduler
    from daemon.keys import Keys
    from daemon.primitives.clients import CountingRedis
    from daemon.settings.config import Settings

logger = logging.getLogger(__name__)


# -- cron mode's falling-behind report ---------------------------------------------------------------------


class CronWatch:
    """Cron mode's ``schedule`` check: a tick that finds its group still queued from its last tick."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._last_warn = -math.inf

    def check(self) -> dict[str, Any]:
        """The health endpoint's ``schedule`` check in cron mode; warns at most hourly while behind."""
        by_group = getattr(self.scheduler, "last_by_group", {})
        behind = sum(t.already_queued for t in by_group.values())
        sections = sum(t.sections for t in by_group.values())
        if behind and time.monotonic() - self._last_warn >= WARN_EVERY_S:
            self._last_warn = time.monotonic()
            logger.warning(
                "cron checking is behind: %d sections were still queued from their group's previous tick; "
                "binding budget scraper_capacity; to catch up: %s, or SEATWATCH_SCHEDULE=adaptive",
                behind,
                planner.LIFT[planner.CAPACITY],
            )
        return {
            "status": "degraded" if behind else "healthy",
            "mode": "cron",
            "watched": sections or None,
            "coverage": round(1 - behind / sections, 4) if sections else None,
            "behind": behind,
            "interval_p50_s": None,
            "interval_p95_s": None,
            "binding": planner.CAPACITY if behind else None,
            "lift": planner.LIFT[planner.CAPACITY] if behind else None,
        }


# -- seatwatch status ----------------------------------------------------------------------------------------


async def schedule_status(
    settings: Settings, redis: CountingRedis, keys: Keys, conn: asyncpg.Connection | None
) -> dict[str, Any]:
    """``status``'s ``schedule``: the adaptive figures as the daemons last planned them (Postgres, no Redis
    command: ``redis`` and ``keys`` are unused since the plan moved), and what adaptive checking can reach for
    the sections watched now within the configured budgets, and which budget binds."""
    del redis, keys
    report: dict[str, Any] = {}
    if settings.schedule == "adaptive" and conn is not None:
        report = await adaptive_queries.last_report(conn)
        if report:
            report.update(
                await adaptive_queries.figures(
                    conn,
                    now_ms=int(time.time() * 1000),
                    max_ms=int(report.get("max_ms") or settings.max_check_interval_s * 1000),
                    late_ms=int(report.get("late_ms") or 0),
                    daemon_ttl_ms=int(report.get("daemon_ttl_ms") or 3_600_000),
                )
            )
            report["now_ms"] = int(time.time() * 1000)
    watched = hot = None
    if conn is not None:
        watched, hot = await db.adaptive_counts(conn)
    per_check = float(report.get("redis_commands_per_check") or DEFAULT_COMMANDS_PER_CHECK)
    capacity_h = report.get("capacity_per_hour")
    floor = IDLE_FLOOR_PER_DAY * int(report.get("daemons") or 1)
    budgets = planner.Budgets(
        scrapes_per_s=settings.scrapes_per_hour / 3600,
        redis_per_s=planner.redis_checks_per_s(settings.redis_budget_per_day, floor, per_check),
        capacity_per_s=float(capacity_h) / 3600 if capacity_h else None,
    )
    out: dict[str, Any] = {"mode": settings.schedule}
    if report:
        watched_now = int(report.get("watched", 0))
        covered = int(report.get("covered", 0))
        out.update(
            {
                "watched": watched_now,
                "coverage": round(covered / watched_now, 4) if watched_now else 1.0,
                "behind": max(0, watched_now - covered),
                "interval_p50_s": report.get("interval_p50_s"),
                "interval_p95_s": report.get("interval_p95_s"),
                "binding": report.get("binding"),
                "scrapes_last_hour": report.get("scrapes_last_hour"),
                "daemons": report.get("daemons"),
                "as_of": report.get("now_ms"),
            }
        )
    if watched is not None:
        out["projection"] = planner.project(
            watched,
            budgets,
            min_s=settings.min_check_interval_s,
            max_s=settings.max_check_interval_s,
            hot=hot,
        )
    return out
