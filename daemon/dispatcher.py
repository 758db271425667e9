"""Adaptive checking (SPEC §11): due times in Redis shared by every daemon, paced by one script call per batch.

Three loops:

* the planner reads Postgres (``seatwatch_adaptive_sections()``), plans an interval and a priority per
  watched section within the budgets (``planner.py``) and writes them with ``adaptive_sync`` (one call
  per 2,000 sections, and only when the plan changed or every ten minutes for the figures);
* the taker calls ``adaptive_take`` once per batch: the script records the breaker outcomes of earlier
  checks, puts back failed or skipped ones, reserves evenly spaced scrape slots from the shared pace, asks
  the breaker, and leases the most valuable due sections into the slots (their due times move forward:
  no acknowledgement is needed);
* one task per leased section waits for its slot and a free scraper slot (``gate.py``), then runs the same
  pipeline as the queue consumers. A check that cannot start within ``late_s`` of its slot is skipped and
  put back, which is what keeps two checks of one section at least the minimum interval apart.

Budgets: the pace's spacing is the smaller of the scrape budget and what the Redis day pays for (the
daemons' idle floor set aside, at the commands per check this daemon measures); how many slots are taken
at once follows the scraper's measured capacity. Every figure for health, metrics and status is kept in
memory (``report()``): a probe costs no Redis command.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import anyio
import orjson

from daemon import planner
from daemon.consumer import Ticket
from daemon.errors import DeferJob, PermanentJobError, RetryableJobError
from daemon.jobs import Job, usable_section
from daemon.limiter import AdaptiveLimit, FixedLimit, capacity_per_s
from daemon.primitives.clients import REDIS_ERRORS
from daemon.store import db
from daemon.store.pool import CONNECTION_ERRORS

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import asyncpg
    from anyio.abc import TaskGroup

    from daemon.config import Settings
    from daemon.keys import Keys
    from daemon.limiter import Limit
    from daemon.pipeline import Pipeline
    from daemon.primitives.breaker import BreakerConfig
    from daemon.primitives.clients import RedisClients
    from daemon.primitives.scripts import Scripts
    from daemon.runtime.systemd import Progress
    from daemon.upstream.gate import Gate

logger = logging.getLogger(__name__)

PURPOSE: Final = "adaptive"  # Redis commands of the take script
PLAN_PURPOSE: Final = "adaptive_plan"  # and of the planner's writes
SYNC_CHUNK: Final = 2000
IDLE_FLOOR_PER_DAY: Final = 500.0  # SPEC §5: a waiting daemon's whole spend
FIGURES_EVERY_S: Final = 600.0
WARN_EVERY_S: Final = 3600.0
IDLE_WAIT_S: Final = 900.0  # the longest the taker sleeps with nothing due (like the queue's idle block)
DEFAULT_COMMANDS_PER_CHECK: Final = 0.25
# The pace runs 3 % under the budget, so jitter in when checks actually start (an event loop that is late,
# two daemons' replies arriving at different moments) never pushes any one minute over it.
PACE_MARGIN: Final = 0.97


class AdaptiveKeys:
    """The adaptive schedule's keys, under the deployment's prefix."""

    def __init__(self, keys: Keys) -> None:
        p = f"{keys.prefix}:adaptive"
        self.due, self.interval, self.prio, self.last = f"{p}:due", f"{p}:interval", f"{p}:prio", f"{p}:last"
        self.gen, self.pace, self.scrapes = f"{p}:gen", f"{p}:pace", f"{p}:scrapes"
        self.report, self.daemons = f"{p}:report", f"{p}:daemons"
        self.breaker, self.breaker_trials = keys.breaker, keys.breaker_trials


def make_limit(settings: Settings) -> Limit:
    if settings.concurrency_auto:
        return AdaptiveLimit(low=1, high=settings.concurrency_max, initial=min(4, settings.concurrency_max))
    return FixedLimit(settings.concurrency)


@dataclass(frozen=True)
class Lease:
    member: str
    term: str
    class_nbr: str
    slot_ms: int
    prev_ms: int
    trial: str
    start_at: float  # monotonic
    rtt_s: float = 0.0  # of the take call that leased it: how late start_at may be against Redis time


@dataclass
class Figures:
    """What the schedule looks like, for health, metrics, status and the hourly warning."""

    watched: int = 0
    covered: int = 0
    hot: int = 0
    scrapes_last_hour: int = 0
    daemons: int = 1
    plan: planner.Plan | None = None
    synced_at: float | None = None
    checks: int = 0
    skipped: int = 0
    commands_per_check: float = DEFAULT_COMMANDS_PER_CHECK
    intervals_s: deque[float] = field(default_factory=lambda: deque(maxlen=2000))


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Dispatcher:
    def __init__(
        self,
        *,
        settings: Settings,
        clients: RedisClients,
        keys: Keys,
        scripts: Scripts,
        breaker: BreakerConfig,
        pool: asyncpg.Pool,
        pipeline: Pipeline,
        gate: Gate,
        progress: Progress | None = None,
        plan_every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.redis = clients.client(PURPOSE)
        self.plan_redis = clients.client(PLAN_PURPOSE)
        self.usage = clients.usage
        self.keys = AdaptiveKeys(keys)
        self.scripts = scripts
        self.breaker = breaker
        self.pool = pool
        self.pipeline = pipeline
        self.gate = gate
        self.progress = progress
        self.clock = clock
        self.min_s = float(settings.min_check_interval_s)
        self.max_s = float(settings.max_check_interval_s)
        self.plan_every_s = plan_every_s or min(60.0, max(1.0, self.min_s / 2))
        # An unchanged plan is written again this often, for fresh coverage figures (scaled with compressed time).
        self.figures_every_s = min(FIGURES_EVERY_S, max(self.plan_every_s, self.max_s / 6))
        # A check may start this late after its slot; due times carry the same margin (see the module doc).
        self.late_s = min(1.0, 0.05 * self.min_s)
        # Due times carry twice that: one for the lateness allowed, one for what the local check cannot see
        # (the take reply's way back, the request's way out to the scraper).
        self.margin_s = 2 * self.late_s
        self._take_rtt_s = 0.0
        self.figures = Figures()
        self.rate_per_s = PACE_MARGIN * settings.scrapes_per_hour / 3600.0
        self._outcomes: list[tuple[str, str]] = []
        self._retry: list[tuple[str, int]] = []
        self._release: list[tuple[str, int]] = []
        self._waiting = 0  # leased, not started yet
        self._poke = anyio.Event()
        self._synced_digest = b""
        self._gen = 0
        self._last_warn = -math.inf
        self._usage_mark = (0, 0)  # (adaptive commands, checks) at the last plan
        self.breaker_state: Any = None
        self._stopping = anyio.Event()
        self._planned = anyio.Event()

    # -- loops -------------------------------------------------------------------------------------------

    async def run(self, stopping: anyio.Event) -> None:
        self._stopping = stopping
        async with anyio.create_task_group() as checks, anyio.create_task_group() as loops:
            loops.start_soon(self._planner, stopping)
            loops.start_soon(self._taker, checks, stopping)
            await stopping.wait()
            loops.cancel_scope.cancel()
        # Checks finished (or were cancelled by the grace): send their outcomes once.
        if self._outcomes or self._retry or self._release:
            with anyio.move_on_after(5, shield=True):
                try:
                    await self._take(0)
                except REDIS_ERRORS as exc:
                    logger.warning("adaptive: could not record the last outcomes (%s)", exc.__class__.__name__)
        if self.progress is not None:
            self.progress.done("planner")
            self.progress.done("taker")

    async def _planner(self, stopping: anyio.Event) -> None:
        delay = 1.0
        while not stopping.is_set():
            self._expect("planner", self.plan_every_s)
            try:
                await self.plan_once()
                delay = 1.0
                wait_s = self.plan_every_s
            except (*REDIS_ERRORS, *CONNECTION_ERRORS) as exc:
                logger.warning("adaptive planner: %s; retrying in %.0fs", exc.__class__.__name__, delay)
                wait_s, delay = delay, min(60.0, delay * 2)
            with anyio.move_on_after(wait_s):
                await stopping.wait()

    async def plan_once(self) -> planner.Plan:
        """Read Postgres, plan within the budgets, write the plan when it changed; return it."""
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
        plan_max_s = max(self.min_s, self.max_s * 0.98 - self.margin_s)
        plan = planner.plan(sections, self.budgets(), min_s=self.min_s, max_s=plan_max_s)
        plan = dataclasses.replace(plan, needed_per_s=len(sections) / self.max_s)  # against the promise itself
        self.rate_per_s = PACE_MARGIN * min(self.settings.scrapes_per_hour / 3600.0, self.budgets().redis_per_s)
        payload = [
            [
                s.id,
                int(plan.intervals_s[s.id] * 1000),
                plan.priorities[s.id],
                checked[s.id],
                zlib.crc32(s.id.encode()) % max(1, int(min(plan.intervals_s[s.id], self.max_s) * 1000)),
            ]
            for s in sections
        ]
        digest = orjson.dumps(sorted((p[0], p[1], p[2]) for p in payload))
        stale = self.figures.synced_at is None or time.monotonic() - self.figures.synced_at >= self.figures_every_s
        changed = digest != self._synced_digest
        synced = False
        if changed or stale:
            if payload or self._synced_digest not in (b"", b"[]"):
                await self._sync(payload, plan)
                synced = True
            self._synced_digest = digest
            self.figures.synced_at = time.monotonic()
        self.figures.plan = plan
        self.figures.hot = plan.hot
        if payload:
            self._planned.set()
        elif self._planned.is_set():
            self._planned = anyio.Event()  # nothing watched any more: the taker goes quiet
        if not payload:
            self.figures.watched = self.figures.covered = 0
        if changed and synced:
            self._poke.set()  # new sections or intervals: the taker looks again now
        self._warn_if_behind()
        return plan

    async def _sync(self, payload: list[list[Any]], plan: planner.Plan) -> None:
        self._gen += 1
        gen = f"{self.settings.consumer}:{time.time_ns()}"
        chunks = [payload[i : i + SYNC_CHUNK] for i in range(0, len(payload), SYNC_CHUNK)] or [[]]
        k = self.keys
        keys = [k.due, k.interval, k.prio, k.last, k.gen, k.scrapes, k.report, k.daemons]
        reply: dict[str, Any] = {}
        for i, chunk in enumerate(chunks):
            final = i == len(chunks) - 1
            args = {
                "gen": gen,
                "final": final,
                "max_ms": int(self.max_s * 1000),
                "late_ms": int(self.margin_s * 1000),
                "consumer": self.settings.consumer,
                "daemon_ttl_ms": int(3 * self.figures_every_s * 1000),
                "sections": chunk,
                "report": self._report_for_status(plan) if final else {},
            }
            reply = await self.scripts.call_json("adaptive_sync", keys, [orjson.dumps(args).decode()], self.plan_redis)
        logger.debug("adaptive sync: %d sections in %d calls", len(payload), len(chunks))
        self.figures.watched = int(reply.get("watched", 0))
        self.figures.covered = int(reply.get("covered", 0))
        self.figures.scrapes_last_hour = int(reply.get("scrapes_last_hour", 0))
        self.figures.daemons = max(1, int(reply.get("daemons", 1)))

    def budgets(self) -> planner.Budgets:
        floor = IDLE_FLOOR_PER_DAY * self.figures.daemons + 86400 / self.figures_every_s
        return planner.Budgets(
            scrapes_per_s=self.settings.scrapes_per_hour / 3600.0,
            redis_per_s=planner.redis_checks_per_s(
                self.settings.redis_budget_per_day, floor, self.figures.commands_per_check
            ),
            capacity_per_s=capacity_per_s(self.gate.limit),
        )

    def _measure_cost(self) -> None:
        """This daemon's adaptive commands per check since the last plan, smoothed."""
        commands = self.usage.total[PURPOSE] + self.usage.total[PLAN_PURPOSE]
        checks = self.figures.checks
        d_commands, d_checks = commands - self._usage_mark[0], checks - self._usage_mark[1]
        if d_checks >= 20:
            measured = d_commands / d_checks
            self.figures.commands_per_check = 0.7 * self.figures.commands_per_check + 0.3 * measured
            self._usage_mark = (commands, checks)

    # -- taking and checking -----------------------------------------------------------------------------

    def _horizon_s(self) -> float:
        spacing = 1.0 / max(self.rate_per_s, 1e-6)
        # About eight slots per call for each daemon sharing the pace (a quarter command per check and less),
        # at least half a second of work.
        return min(30.0, max(8 * spacing * self.figures.daemons, 0.5))

    def _want(self, horizon_s: float) -> int:
        """Slots worth taking for the next horizon: what the scraper can start in it, minus what waits."""
        limit = self.gate.limit
        capacity = capacity_per_s(limit)
        starts = limit.limit + 1 if capacity is None else math.ceil(capacity * horizon_s)
        return max(0, starts - self._waiting)

    async def _taker(self, checks: TaskGroup, stopping: anyio.Event) -> None:
        delay = 0.5
        while not stopping.is_set():
            if not self._planned.is_set():
                # Nothing to take before the first plan, nor while nothing is watched: no command at all.
                self._expect("taker", IDLE_WAIT_S)
                with anyio.move_on_after(IDLE_WAIT_S):
                    await self._planned.wait()
                continue
            horizon_s = self._horizon_s()
            self._expect("taker", horizon_s)
            self._poke = anyio.Event()
            want = self._want(horizon_s)
            try:
                reply = await self._take(want, horizon_s) if want > 0 else None
            except REDIS_ERRORS as exc:
                logger.warning("adaptive: take failed (%s); retrying in %.1fs", exc.__class__.__name__, delay)
                with anyio.move_on_after(delay):
                    await stopping.wait()
                delay = min(30.0, delay * 2)
                continue
            delay = 0.5
            wait_s = horizon_s * 0.5
            if reply is not None:
                now = self.clock()
                leases = self._leases(reply, now)
                for lease in leases:
                    self._waiting += 1
                    checks.start_soon(self._check, lease)
                retry_s = int(reply["retry_after_ms"]) / 1000
                next_due = int(reply["next_due_ms"])
                if leases:
                    last_start = max(lease.start_at for lease in leases) - now
                    wait_s = max(0.01, last_start - horizon_s * 0.25)
                elif retry_s > 0:
                    wait_s = retry_s
                elif next_due < 0:
                    wait_s = IDLE_WAIT_S  # nothing watched: the planner pokes when that changes
                else:
                    # Nothing taken: wait until a section is due and the shared pace has a slot for it (another
                    # daemon may have reserved the next ones), not sooner: two daemons must not race in a loop.
                    # The planner pokes when sections join or intervals change, so nothing is missed by sleeping.
                    ready_ms = max(next_due, int(reply.get("tat_ms", 0)))
                    ready_in_s = (ready_ms - int(reply["now_ms"])) / 1000
                    wait_s = min(max(horizon_s * 0.1, ready_in_s - horizon_s * 0.5), IDLE_WAIT_S)
            self._expect("taker", wait_s)
            with anyio.move_on_after(wait_s):
                await self._poke.wait()

    def _expect(self, loop: str, wait_s: float) -> None:
        if self.progress is not None:
            self.progress.expect(loop, wait_s + 120)

    async def _take(self, want: int, horizon_s: float = 0.0) -> dict[str, Any]:
        outcomes, retry, release = self._outcomes, self._retry, self._release
        self._outcomes, self._retry, self._release = [], [], []
        k = self.keys
        args = {
            "cfg": self.breaker.lua(),
            "outcomes": [list(o) for o in outcomes],
            "retry": [list(r) for r in retry],
            "release": [list(r) for r in release],
            "want": want,
            "horizon_ms": int(horizon_s * 1000),
            "spacing_ms": max(1, round(1000 / max(self.rate_per_s, 1e-6))),
            "late_ms": int(self.margin_s * 1000),
            "max_ms": int(self.max_s * 1000),
        }
        # An uncertain failure drops these outcomes rather than risk applying them twice: a breaker count
        # lost is harmless, a trial slot frees itself by its TTL, and a failed check comes due again anyway.
        sent = self.clock()
        reply: dict[str, Any] = await self.scripts.call_json(
            "adaptive_take",
            [k.due, k.interval, k.prio, k.last, k.pace, k.scrapes, k.breaker, k.breaker_trials],
            [orjson.dumps(args).decode()],
            self.redis,
        )
        self._take_rtt_s = self.clock() - sent
        self.breaker_state = reply.get("breaker")
        taken = reply.get("taken")
        logger.debug(
            "adaptive take: want %d, took %d, %d outcomes, %d back",
            want,
            len(taken) if isinstance(taken, list) else 0,
            len(outcomes),
            len(retry) + len(release),
        )
        return reply

    def _leases(self, reply: dict[str, Any], now: float) -> list[Lease]:
        now_ms = int(reply["now_ms"])
        leases = []
        taken = reply.get("taken")
        for member, slot_ms, prev_ms, trial in taken if isinstance(taken, list) else []:
            term, _, class_nbr = str(member).partition("-")
            start_at = now + max(0, int(slot_ms) - now_ms) / 1000
            leases.append(
                Lease(str(member), term, class_nbr, int(slot_ms), int(prev_ms), str(trial), start_at, self._take_rtt_s)
            )
        return leases

    async def _check(self, lease: Lease) -> None:
        try:
            with anyio.move_on_after(max(0.0, lease.start_at - self.clock())):
                await self._stopping.wait()
            if self._stopping.is_set():
                raise anyio.get_cancelled_exc_class()  # not started: handed back below
            await self.gate.acquire()
        except BaseException as exc:
            self._waiting -= 1
            self._release.append((lease.member, lease.prev_ms))
            if lease.trial:
                self._outcomes.append(("n", lease.trial))
            if isinstance(exc, anyio.get_cancelled_exc_class()) and self._stopping.is_set():
                return
            raise
        self._waiting -= 1
        try:
            if self.clock() > lease.start_at + self.late_s - lease.rtt_s:
                # Started late, it could land within the minimum interval of the next check: put it back.
                self.figures.skipped += 1
                self._release.append((lease.member, lease.prev_ms))
                if lease.trial:
                    self._outcomes.append(("n", lease.trial))
                return
            await self._run(lease)
        finally:
            self.gate.release()

    async def _run(self, lease: Lease) -> None:
        job = Job("", lease.member, lease.term, lease.class_nbr, 0, lease.slot_ms)
        ticket = Ticket(job, trial=lease.trial)
        self.figures.checks += 1
        if lease.prev_ms > 0:
            self.figures.intervals_s.append((lease.slot_ms - lease.prev_ms) / 1000)
        retry_ms = int((self.min_s + self.margin_s) * 1000)
        try:
            await self.pipeline(ticket)
        except DeferJob as exc:
            self._retry.append((lease.member, max(retry_ms, int(exc.delay_s * 1000))))
            logger.info("section %s deferred %.0fs: %s", lease.member, exc.delay_s, exc)
        except RetryableJobError as exc:
            self._retry.append((lease.member, retry_ms))
            logger.warning("section %s check failed, again in %.0fs: %s", lease.member, retry_ms / 1000, exc)
        except PermanentJobError as exc:
            logger.error("section %s: %s; checked again at its next due time", lease.member, exc)
        except Exception:
            logger.exception("section %s: check failed unexpectedly", lease.member)
            self._retry.append((lease.member, retry_ms))
        finally:
            if ticket.trial or ticket.breaker != "n":
                self._outcomes.append((ticket.breaker, ticket.trial))

    # -- reporting ---------------------------------------------------------------------------------------

    def check(self) -> dict[str, Any]:
        """The health endpoint's ``schedule`` check (SPEC §11), from memory."""
        f, plan = self.figures, self.figures.plan
        behind = max(0, f.watched - f.covered)
        degraded = behind > 0 or bool(plan and plan.behind)
        intervals = list(f.intervals_s)
        limit = self.gate.limit
        binding = plan.binding if plan else None
        return {
            "status": "degraded" if degraded else "healthy",
            "mode": "adaptive",
            "watched": f.watched,
            "hot": f.hot,
            "coverage": round(f.covered / f.watched, 4) if f.watched else 1.0,
            "behind": behind,
            "interval_p50_s": _round(_quantile(intervals, 0.5)),
            "interval_p95_s": _round(_quantile(intervals, 0.95)),
            "hot_interval_s": _round(plan.hot_interval_s) if plan else None,
            "binding": binding,
            "lift": planner.LIFT.get(binding or "") if degraded else None,
            "allowed_checks_per_hour": round(plan.allowed_per_s * 3600, 1) if plan else None,
            "needed_checks_per_hour": round(plan.needed_per_s * 3600, 1) if plan else None,
            "scrapes_last_hour": f.scrapes_last_hour,
            "checks_here": f.checks,
            "skipped_late": f.skipped,
            "redis_commands_per_check": round(f.commands_per_check, 3),
            "projected_redis_day": round(
                IDLE_FLOOR_PER_DAY * f.daemons + (plan.spend_per_s if plan else 0) * 86400 * f.commands_per_check
            ),
            "concurrency": {
                "mode": "auto" if isinstance(limit, AdaptiveLimit) else "fixed",
                "limit": limit.limit,
                "latency_floor_s": _round(limit.floor_s),
                "latency_s": _round(limit.smoothed_s),
                "in_flight": self.gate.in_flight,
            },
            "age_s": round(time.monotonic() - f.synced_at, 1) if f.synced_at else None,
        }

    def _report_for_status(self, plan: planner.Plan) -> dict[str, Any]:
        return {
            "binding": plan.binding,
            "allowed_checks_per_hour": round(plan.allowed_per_s * 3600, 1),
            "needed_checks_per_hour": round(plan.needed_per_s * 3600, 1),
            "hot": plan.hot,
            "hot_interval_s": _round(plan.hot_interval_s),
            "interval_p50_s": _round(_quantile(list(self.figures.intervals_s), 0.5)),
            "interval_p95_s": _round(_quantile(list(self.figures.intervals_s), 0.95)),
            "capacity_per_hour": _round((self.budgets().capacity_per_s or 0) * 3600) or None,
            "redis_commands_per_check": round(self.figures.commands_per_check, 3),
            "by": self.settings.consumer,
        }

    def _warn_if_behind(self) -> None:
        c = self.check()
        if c["status"] != "degraded" or time.monotonic() - self._last_warn < WARN_EVERY_S:
            return
        self._last_warn = time.monotonic()
        logger.warning(
            "adaptive checking is behind: %d of %d watched sections not checked within %ds; "
            "binding budget %s (allows %s checks/h, %s needed); to catch up: %s",
            c["behind"],
            c["watched"],
            int(self.max_s),
            c["binding"],
            c["allowed_checks_per_hour"],
            c["needed_checks_per_hour"],
            c["lift"],
        )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
