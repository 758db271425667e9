"""Adaptive checking (SPEC §11): due times in Redis shared by every daemon, paced by one script call per batch.

Two loops and a task per check:

* the replanner (``replanner.py``) reads Postgres, plans an interval and a priority per watched section
  within the budgets and writes them with ``adaptive_sync``;
* the taker calls ``adaptive_take`` once per batch: the script records the breaker outcomes of earlier
  checks, puts back failed or skipped ones, reserves evenly spaced scrape slots from the shared pace, asks
  the breaker, and leases the most valuable due sections into the slots (their due times move forward:
  no acknowledgement is needed);
* one task per leased section waits for its slot and a free scraper slot (``gate.py``), then runs the same
  pipeline as the queue consumers. A check that cannot start within ``late_s`` of its slot is skipped and
  put back, which is what keeps two checks of one section at least the minimum interval apart.

How many slots are taken at once follows the scraper's measured capacity; the pace's spacing is the
replanner's rate. Every figure for health, metrics and status is kept in memory (``adaptive.Figures``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import anyio
import orjson

from daemon.adaptive import PURPOSE, AdaptiveKeys, Figures, Timing
from daemon.backoff import Backoff, Outage
from daemon.consumer import Ticket
from daemon.errors import DeferJob, PermanentJobError, RetryableJobError, error_name
from daemon.jobs import Job
from daemon.limiter import AdaptiveLimit, FixedLimit, capacity_per_s
from daemon.primitives.clients import REDIS_ERRORS
from daemon.replanner import Replanner

if TYPE_CHECKING:
    from collections.abc import Callable

    import asyncpg
    from anyio.abc import TaskGroup

    from daemon import planner
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

IDLE_WAIT_S: Final = 900.0  # the longest the taker sleeps with nothing due (like the queue's idle block)


def make_limit(settings: Settings) -> Limit:
    """The scraper's concurrency limit: measured (``SEATWATCH_CONCURRENCY=auto``) or fixed."""
    if settings.concurrency_auto:
        return AdaptiveLimit(low=1, high=settings.concurrency_max, initial=min(4, settings.concurrency_max))
    return FixedLimit(settings.concurrency)


@dataclass(frozen=True)
class Lease:
    """A due section leased into a scrape slot by one take call."""

    member: str
    term: str
    class_nbr: str
    slot_ms: int
    prev_ms: int
    trial: str
    start_at: float  # monotonic
    rtt_s: float = 0.0  # of the take call that leased it: how late start_at may be against Redis time


class Dispatcher:
    """Adaptive checking's runtime: the replanner, the taker, and the checks it leases."""

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
        self.usage = clients.usage
        self.keys = AdaptiveKeys(keys)
        self.scripts = scripts
        self.breaker = breaker
        self.pipeline = pipeline
        self.gate = gate
        self.progress = progress
        self.clock = clock
        self.timing = Timing.from_settings(settings, plan_every_s)
        self.figures = Figures()
        self.replanner = Replanner(
            settings=settings,
            clients=clients,
            keys=self.keys,
            scripts=scripts,
            pool=pool,
            gate=gate,
            timing=self.timing,
            figures=self.figures,
            on_change=self._poke_taker,
            progress=progress,
        )
        self._take_rtt_s = 0.0
        # Filled by the checks, sent (and emptied) by the next take call.
        self._outcomes: list[tuple[str, str]] = []
        self._retry: list[tuple[str, int]] = []
        self._release: list[tuple[str, int]] = []
        self._waiting = 0  # leased, not started yet
        self._poke = anyio.Event()
        self.breaker_state: Any = None
        self._stopping = anyio.Event()

    async def run(self, stopping: anyio.Event) -> None:
        """Plan, take and check until ``stopping``; then hand back what was leased and not checked."""
        self._stopping = stopping
        async with anyio.create_task_group() as checks, anyio.create_task_group() as loops:
            loops.start_soon(self.replanner.run, stopping)
            loops.start_soon(self._taker, checks, stopping)
            await stopping.wait()
            loops.cancel_scope.cancel()
        # Checks finished (or were cancelled by the grace): send their outcomes once.
        if self._outcomes or self._retry or self._release:
            with anyio.move_on_after(5, shield=True):
                try:
                    await self._take(0)
                except REDIS_ERRORS as exc:
                    logger.warning("adaptive: could not record the last outcomes (%s)", error_name(exc))
        if self.progress is not None:
            self.progress.done("planner")
            self.progress.done("taker")

    async def plan_once(self) -> planner.Plan:
        """One planning pass (the replanner's), for tests and benches that drive the schedule by hand."""
        return await self.replanner.plan_once()

    def check(self) -> dict[str, Any]:
        """The health endpoint's ``schedule`` check (SPEC §11), from memory."""
        return self.figures.check(self.gate)

    def _poke_taker(self) -> None:
        self._poke.set()

    def _horizon_s(self) -> float:
        spacing = 1.0 / max(self.replanner.rate_per_s, 1e-6)
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
        backoff = Backoff(0.5, 30.0, outage=Outage("adaptive taker: Redis", logger))
        while not stopping.is_set():
            if not self.replanner.planned.is_set():
                # Nothing to take before the first plan, nor while nothing is watched: no command at all.
                self._expect("taker", IDLE_WAIT_S)
                with anyio.move_on_after(IDLE_WAIT_S):
                    await self.replanner.planned.wait()
                continue
            horizon_s = self._horizon_s()
            self._expect("taker", horizon_s)
            self._poke = anyio.Event()
            want = self._want(horizon_s)
            try:
                reply = await self._take(want, horizon_s) if want > 0 else None
            except REDIS_ERRORS as exc:
                await backoff.wait(error_name(exc), stopping)
                continue
            backoff.succeeded()
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
            "spacing_ms": max(1, round(1000 / max(self.replanner.rate_per_s, 1e-6))),
            "late_ms": int(self.timing.margin_s * 1000),
            "max_ms": int(self.timing.max_s * 1000),
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
            if self.clock() > lease.start_at + self.timing.late_s - lease.rtt_s:
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
        retry_ms = int((self.timing.min_s + self.timing.margin_s) * 1000)
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
