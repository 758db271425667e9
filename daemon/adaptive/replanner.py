"""Adaptive checking's planning loop (SPEC §11): Postgres in, the plan out to Postgres.

Every ``plan_every_s`` the replanner reads the watched sections (``seatwatch_adaptive_sections()``), plans an
interval and a priority for each within the budgets (``plan.py``) and writes them with
``seatwatch_adaptive_sync`` when the plan changed, or every ``figures_every_s`` for fresh coverage figures.
No Redis command at all: Postgres bills no query, and the plan is per-section state. The sync's reply
carries the figures (watched, covered, scrapes in the last hour, daemons sharing the schedule); they live in
``Figures``, in memory, so a health probe costs nothing either.

The budgets: the scrape budget, what the Redis day pays for (the daemons' idle floor set aside, at the
all-in commands per check this daemon measures), and the scraper's measured capacity.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from typing import TYPE_CHECKING, Any

import anyio
import orjson

from daemon.adaptive import plan as planner
from daemon.adaptive.figures import IDLE_FLOOR_PER_DAY, PACE_MARGIN, PURPOSE, WARN_EVERY_S, quantile, round2
from daemon.adaptive.limit import capacity_per_s
from daemon.backoff import Backoff, Outage
from daemon.errors import StoreUnavailable, error_name
from daemon.jobs import usable_section
from daemon.store import adaptive_queries as q
from daemon.store import db

if TYPE_CHECKING:
    from collections.abc import Callable

    from daemon.adaptive.figures import Figures, RedisClock, Timing
    from daemon.adaptive.gate import Gate
    from daemon.primitives.clients import Usage
    from daemon.settings.config import Settings
    from daemon.store.pool import Pool
    from daemon.telemetry import Progress

logger = logging.getLogger(__name__)


class Replanner:
    """Plans the adaptive schedule and keeps its figures; tells the taker when there is something to take.

    ``planned`` is set while any section is watched (the taker sleeps without a command otherwise);
    ``on_change`` is called when sections join or intervals change, so the taker looks again at once.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        usage: Usage,
        pool: Pool,
        gate: Gate,
        timing: Timing,
        figures: Figures,
        clock: RedisClock,
        on_change: Callable[[], None],
        progress: Progress | None = None,
    ) -> None:
        self.settings = settings
        self.usage = usage
        self.pool = pool
        self.gate = gate
        self.timing = timing
        self.figures = figures
        self.clock = clock
        self.on_change = on_change
        self.progress = progress
        # The shared pace's rate (checks per second, every daemon together), for the taker.
        self.rate_per_s = PACE_MARGIN * settings.scrapes_per_hour / 3600.0
        self.planned = anyio.Event()
        self._synced_digest = b""
        self._last_warn = -math.inf
        self._usage_mark = (0, 0)  # (adaptive commands, checks) at the last measurement

    async def run(self, stopping: anyio.Event) -> None:
        """Plan every ``plan_every_s`` until ``stopping``; an outage of Postgres is waited out."""
        backoff = Backoff(1.0, 60.0, outage=Outage("adaptive planner: Postgres", logger))
        while not stopping.is_set():
            if self.progress is not None:
                self.progress.expect("planner", self.timing.plan_every_s + 120)
            try:
                await self.plan_once()
            except StoreUnavailable as exc:
                await backoff.wait(error_name(exc), stopping)
                continue
            backoff.succeeded()
            with anyio.move_on_after(self.timing.plan_every_s):
                await stopping.wait()

    async def plan_once(self) -> planner.Plan:
        """Read Postgres, plan within the budgets, write the plan when it changed; return it."""
        t = self.timing
        rows = await db.adaptive_sections(self.pool)
        now = time.time()
        sections: list[planner.Section] = []
        checked: dict[str, int] = {}
        for r in rows:
            if not usable_section(r["term"], r["class_nbr"]):
                continue
            sid = f"{r['term']}-{r['class_nbr']}"
            moved = r["last_changed_at"]
            sections.append(planner.Section(sid, int(r["waiting"]), now - moved.timestamp() if moved else None))
            last = r["last_checked_at"]
            checked[sid] = int(last.timestamp() * 1000) if last else 0
        self._measure_cost()
        # Intervals stop a little short of the maximum: a due time carries the margin, and the pace may slot a
        # due section a moment later, yet the maximum is the promise.
        plan_max_s = max(t.min_s, t.max_s * 0.98 - t.margin_s)
        plan = planner.plan(sections, self.budgets(), min_s=t.min_s, max_s=plan_max_s)
        plan = dataclasses.replace(plan, needed_per_s=len(sections) / t.max_s)  # against the promise itself
        self.rate_per_s = PACE_MARGIN * min(self.settings.scrapes_per_hour / 3600.0, self.budgets().redis_per_s)
        payload = []
        for s in sections:
            term, _, class_nbr = s.id.partition("-")
            interval_ms = int(plan.intervals_s[s.id] * 1000)
            jitter_ms = zlib.crc32(s.id.encode()) % max(1, int(min(plan.intervals_s[s.id], t.max_s) * 1000))
            payload.append(q.Planned(term, class_nbr, interval_ms, plan.priorities[s.id], checked[s.id], jitter_ms))
        digest = orjson.dumps(sorted((p.term, p.class_nbr, p.interval_ms, p.priority) for p in payload))
        stale = self.figures.synced_at is None or time.monotonic() - self.figures.synced_at >= t.figures_every_s
        changed = digest != self._synced_digest
        if changed or stale:
            await self._sync(payload, plan)
            self._synced_digest = digest
            self.figures.synced_at = time.monotonic()
        self.figures.plan = plan
        self.figures.hot = plan.hot
        if payload:
            self.planned.set()
        elif self.planned.is_set():
            self.planned = anyio.Event()  # nothing watched any more: the taker goes quiet
        if changed:
            self.on_change()  # new sections or intervals: the taker looks again now
        self._warn_if_behind()
        return plan

    async def _sync(self, payload: list[q.Planned], plan: planner.Plan) -> None:
        t = self.timing
        figures = await q.sync(
            self.pool,
            payload,
            now_ms=self.clock.now_ms(),
            late_ms=int(t.margin_s * 1000),
            max_ms=int(t.max_s * 1000),
            consumer=self.settings.consumer,
            daemon_ttl_ms=self.daemon_ttl_ms,
            report=self._report_for_status(plan),
        )
        logger.debug("adaptive sync: %d sections, %d left the plan", len(payload), figures.get("removed", 0))
        self.figures.watched = int(figures.get("watched", 0))
        self.figures.covered = int(figures.get("covered", 0))
        self.figures.scrapes_last_hour = int(figures.get("scrapes_last_hour", 0))
        self.figures.daemons = max(1, int(figures.get("daemons", 1)))

    @property
    def daemon_ttl_ms(self) -> int:
        """A daemon that has not planned for this long no longer shares the schedule."""
        return int(3 * self.timing.figures_every_s * 1000)

    def budgets(self) -> planner.Budgets:
        """Checks per second each budget allows, every daemon together, as measured now."""
        return planner.Budgets(
            scrapes_per_s=self.settings.scrapes_per_hour / 3600.0,
            redis_per_s=planner.redis_checks_per_s(
                self.settings.redis_budget_per_day,
                IDLE_FLOOR_PER_DAY * self.figures.daemons,
                self.figures.commands_per_check,
            ),
            capacity_per_s=capacity_per_s(self.gate.limit),
        )

    def _measure_cost(self) -> None:
        """This daemon's adaptive commands per check (all-in, as billed) since the last measurement, smoothed."""
        commands = self.usage.total[PURPOSE]
        checks = self.figures.checks
        d_commands, d_checks = commands - self._usage_mark[0], checks - self._usage_mark[1]
        if d_checks >= 100 or (d_checks >= 20 and d_commands >= 20):
            measured = d_commands / d_checks
            self.figures.commands_per_check = 0.7 * self.figures.commands_per_check + 0.3 * measured
            self._usage_mark = (commands, checks)

    def _report_for_status(self, plan: planner.Plan) -> dict[str, Any]:
        """What ``seatwatch status`` reads back from Postgres (the daemons' last word on the schedule)."""
        intervals = list(self.figures.intervals_s)
        return {
            "binding": plan.binding,
            "allowed_checks_per_hour": round(plan.allowed_per_s * 3600, 1),
            "needed_checks_per_hour": round(plan.needed_per_s * 3600, 1),
            "hot": plan.hot,
            "hot_interval_s": round2(plan.hot_interval_s),
            "interval_p50_s": round2(quantile(intervals, 0.5)),
            "interval_p95_s": round2(quantile(intervals, 0.95)),
            "capacity_per_hour": round2((self.budgets().capacity_per_s or 0) * 3600) or None,
            "redis_commands_per_check": round(self.figures.commands_per_check, 3),
            "max_ms": int(self.timing.max_s * 1000),
            "late_ms": int(self.timing.margin_s * 1000),
            "daemon_ttl_ms": self.daemon_ttl_ms,
            "by": self.settings.consumer,
        }

    def _warn_if_behind(self) -> None:
        c = self.figures.check(self.gate)
        if c["status"] != "degraded" or time.monotonic() - self._last_warn < WARN_EVERY_S:
            return
        self._last_warn = time.monotonic()
        logger.warning(
            "adaptive checking is behind: %d of %d watched sections not checked within %ds; "
            "binding budget %s (allows %s checks/h, %s needed); to catch up: %s",
            c["behind"],
            c["watched"],
            int(self.timing.max_s),
            c["binding"],
            c["allowed_checks_per_hour"],
            c["needed_checks_per_hour"],
            c["lift"],
        )
