"""Adaptive checking (SPEC §11): leases from the plan in Postgres, scrape slots from one Redis call per batch.

Two loops and a task per check:

* the replanner (``replanner.py``) reads Postgres, plans an interval and a priority per watched section
  within the budgets and writes them, with the due times, to ``seatwatch_adaptive_plan``: no Redis at all;
* the taker, once per batch (about a hundred checks, or a minimum interval's worth): leases the most
  valuable due sections in Postgres (``FOR UPDATE SKIP LOCKED``, one statement, no session state), then
  makes one ``adaptive_take`` call that records the breaker outcomes of the checks since the last call, asks
  the breaker to admit the batch and reserves one evenly spaced slot per section from the shared pace, then
  settles the leases in Postgres: each section is due again one interval after its slot, so a crash leaves
  it due again later, and no acknowledgement is needed (a re-check of a committed section claims nothing);
* one task per slotted section waits for its slot and a free scraper slot (``gate.py``), then runs the same
  pipeline as the queue consumers. A check that cannot start within ``late_s`` of its slot is handed back,
  which is what keeps two checks of one section at least the minimum interval apart.

The slots are held here until used, so a check costs Redis nothing of its own: the take call (about seven
billed commands with what it runs) is shared by the whole batch, and a daemon with nothing due makes none.
Outcomes wait for the next call, unless failures pile up towards the breaker's threshold or a half-open
trial ends: then they are recorded at once, so the breaker still opens and closes promptly, and a batch
already in hand is handed back when it learns the breaker is open. Every figure for health, metrics and
status is kept in memory (``figures.Figures``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import anyio
import orjson

from daemon.adaptive.figures import CHECKS_PER_CALL, PURPOSE, AdaptiveKeys, Figures, RedisClock, Timing
from daemon.adaptive.limit import AdaptiveLimit, FixedLimit, capacity_per_s
from daemon.adaptive.replanner import Replanner
from daemon.backoff import Backoff, Outage
from daemon.checks.pipeline import Ticket
from daemon.errors import DeferJob, PermanentJobError, RetryableJobError, StoreUnavailable, error_name
from daemon.jobs import Job
from daemon.primitives.clients import REDIS_ERRORS
from daemon.store import adaptive_queries as q

if TYPE_CHECKING:
    from collections.abc import Callable

    from anyio.abc import TaskGroup

    from daemon.adaptive import plan as planner
    from daemon.adaptive.gate import Gate
    from daemon.adaptive.limit import Limit
    from daemon.checks.pipeline import Pipeline
    from daemon.keys import Keys
    from daemon.primitives.breaker import BreakerConfig
    from daemon.primitives.clients import RedisClients
    from daemon.primitives.scripts import Scripts
    from daemon.settings.config import Settings
    from daemon.store.pool import Pool
    from daemon.telemetry import Progress

logger = logging.getLogger(__name__)

IDLE_WAIT_S: Final = 900.0  # the longest the taker sleeps with nothing due (like the queue's idle block)
# A lease being slotted is nobody else's for this long (a crash in between: due again then). A take call slower
# than this finds its sections no longer held at settling, and leaves them unchecked.
HOLD_MS: Final = 10_000


def make_limit(settings: Settings) -> Limit:
    """The scraper's concurrency limit: measured (``SEATWATCH_CONCURRENCY=auto``) or fixed."""
    if settings.concurrency_auto:
        return AdaptiveLimit(low=1, high=settings.concurrency_max, initial=min(4, settings.concurrency_max))
    return FixedLimit(settings.concurrency)


@dataclass(frozen=True)
class Lease:
    """A due section leased into a scrape slot by one take call."""

    term: str
    class_nbr: str
    slot_ms: int
    prev_ms: int | None  # its last slot before this one
    trial: str
    start_at: float  # monotonic
    rtt_s: float = 0.0  # of the take call that leased it: how late start_at may be against Redis time

    @property
    def member(self) -> str:
        """``{term}-{class_nbr}``."""
        return f"{self.term}-{self.class_nbr}"


class Taker:
    """Adaptive checking's runtime: the replanner, the taker, and the checks it leases."""

    def __init__(
        self,
        *,
        settings: Settings,
        clients: RedisClients,
        keys: Keys,
        scripts: Scripts,
        breaker: BreakerConfig,
        pool: Pool,
        pipeline: Pipeline,
        gate: Gate,
        progress: Progress | None = None,
        plan_every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.redis = clients.client(PURPOSE)
        self.startup = clients.client("startup")
        self.usage = clients.usage
        self.keys = AdaptiveKeys(keys)
        self.scripts = scripts
        self.breaker = breaker
        self.pool = pool
        self.pipeline = pipeline
        self.gate = gate
        self.progress = progress
        self.clock = clock
        self.timing = Timing.from_settings(settings, plan_every_s)
        self.figures = Figures()
        self.redis_clock = RedisClock()
        self.replanner = Replanner(
            settings=settings,
            usage=clients.usage,
            pool=pool,
            gate=gate,
            timing=self.timing,
            figures=self.figures,
            clock=self.redis_clock,
            on_change=self._poke_taker,
            progress=progress,
        )
        self._take_rtt_s = 0.0
        # Filled by the checks: outcomes go with the next take call, sections handed back with the next lease.
        self._outcomes: list[tuple[str, str]] = []
        self._again: list[q.Again] = []
        self._waiting = 0  # slotted, not started yet
        self._last_start = -math.inf  # monotonic start of the last slot held
        self._pace_free_at = -math.inf  # monotonic: the shared pace's next free slot, as last seen
        self._denied_until = -math.inf  # monotonic: the breaker is open until then, as last seen
        self._breaker_failures = 0  # as last seen
        self._breaker_state = "CLOSED"
        self._retired = False
        self._poke = anyio.Event()
        self._stopping = anyio.Event()

    # -- the loops ---------------------------------------------------------------------------------------------

    async def run(self, stopping: anyio.Event) -> None:
        """Plan, take and check until ``stopping``; then hand back what was leased and not checked."""
        self._stopping = stopping
        async with anyio.create_task_group() as checks, anyio.create_task_group() as loops:
            loops.start_soon(self.replanner.run, stopping)
            loops.start_soon(self._taker, checks, stopping)
            await stopping.wait()
            loops.cancel_scope.cancel()
        # Checks finished (or were cancelled by the grace): send their outcomes and hand-backs once.
        with anyio.move_on_after(5, shield=True):
            try:
                await self._flush_again()
                if self._outcomes:
                    await self._take([])
            except REDIS_ERRORS as exc:  # StoreUnavailable is one of them
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

    async def _taker(self, checks: TaskGroup, stopping: anyio.Event) -> None:
        backoff = Backoff(0.5, 30.0, outage=Outage("adaptive taker: Redis or Postgres", logger))
        while not stopping.is_set():
            self._poke = anyio.Event()
            try:
                if not self._retired:
                    await self._retire_old_layout()
                await self._flush_again()
                if self.replanner.planned.is_set():
                    wait_s = await self._round(checks)
                else:
                    # Nothing to take before the first plan, nor while nothing is watched: no command at all
                    # (outcomes still waiting are recorded first).
                    if self._outcomes:
                        await self._take([])
                    wait_s = IDLE_WAIT_S
            except REDIS_ERRORS as exc:  # StoreUnavailable is one of them
                await backoff.wait(error_name(exc), stopping)
                continue
            backoff.succeeded()
            self._expect("taker", wait_s)
            with anyio.move_on_after(wait_s):
                if self.replanner.planned.is_set():
                    await self._poke.wait()
                else:
                    await self.replanner.planned.wait()

    async def _round(self, checks: TaskGroup) -> float:
        """Take the next batch when the slots held are running out; return how long to wait after."""
        horizon_s = self._horizon_s()
        lead_s = max(0.2, 4 * self._take_rtt_s, 0.05 * horizon_s)
        await self._record_if_urgent()
        now = self.clock()
        if self._denied_until > now:
            return self._denied_until - now
        if self._last_start - now > lead_s:
            return self._last_start - now - lead_s
        if self._pace_free_at - horizon_s > now:
            # The shared pace has no slot within the horizon (other daemons hold the next ones): leasing now
            # would only hand the sections back.
            return self._pace_free_at - horizon_s - now
        want = self._want(horizon_s)
        if want <= 0:
            return max(0.05, horizon_s * 0.1)
        redis_now = self.redis_clock.now_ms()
        held_until = redis_now + HOLD_MS
        leased = await q.lease(
            self.pool, now_ms=redis_now, until_ms=redis_now + int(horizon_s * 1000), n=want, held_until_ms=held_until
        )
        if not leased:
            due_ms = await q.next_due_ms(self.pool, now_ms=redis_now)
            if due_ms is None:
                return IDLE_WAIT_S  # nothing planned: the planner pokes when that changes
            # Wake when the next section is due within the horizon; the planner pokes when sections join or
            # intervals change, so nothing is missed by sleeping.
            ready_in_s = (due_ms - redis_now) / 1000 - horizon_s
            return min(max(0.05, ready_in_s), IDLE_WAIT_S)
        try:
            reply = await self._take(leased, horizon_s)
        except BaseException:
            # Released at once if Postgres lets us; else they come due again when the hold ends.
            with anyio.move_on_after(5, shield=True), contextlib.suppress(StoreUnavailable):
                await q.settle(self.pool, leased, [-1] * len(leased), late_ms=self._late_ms, held_until_ms=held_until)
            raise
        slots = [int(s) for s in reply["slots"]]
        trials = [str(t) for t in reply["trials"]]
        try:
            settled = await q.settle(self.pool, leased, slots, late_ms=self._late_ms, held_until_ms=held_until)
        except StoreUnavailable:
            # The due times did not move: checking now could come within the minimum interval of a check
            # after the hold. The slots go unused; the trials free their places at once.
            self._outcomes.extend(("n", t) for t in trials if t)
            raise
        now = self.clock()
        now_ms = int(reply["now_ms"])
        for x, slot_ms, trial in zip(leased, slots, trials, strict=True):
            if slot_ms < 0:
                continue
            if (x.term, x.class_nbr) not in settled:
                # The hold ran out before the slot was settled: another daemon may have this section now.
                if trial:
                    self._outcomes.append(("n", trial))
                continue
            start_at = now + max(0, slot_ms - now_ms) / 1000
            self._last_start = max(self._last_start, start_at)
            self._waiting += 1
            checks.start_soon(
                self._check, Lease(x.term, x.class_nbr, slot_ms, x.last_ms, trial, start_at, self._take_rtt_s)
            )
        logger.debug("adaptive take: leased %d, slotted %d", len(leased), sum(1 for s in slots if s >= 0))
        if self._last_start > now:
            return max(0.01, self._last_start - now - lead_s)
        return max(0.05, horizon_s * 0.1)

    def _expect(self, loop: str, wait_s: float) -> None:
        if self.progress is not None:
            self.progress.expect(loop, wait_s + 120)

    # -- sizing ------------------------------------------------------------------------------------------------

    def _rate_here_per_s(self) -> float:
        """Checks per second this daemon can expect: its share of the pace, or of what the plan spends."""
        plan = self.figures.plan
        rate = self.replanner.rate_per_s
        if plan is not None and plan.spend_per_s > 0:
            rate = min(rate, plan.spend_per_s)
        return max(rate, 1e-6) / max(1, self.figures.daemons)

    def _horizon_s(self) -> float:
        """How far ahead one take call reserves: ``CHECKS_PER_CALL`` at this daemon's rate, within the cap."""
        return min(self.timing.horizon_cap_s, max(0.5, CHECKS_PER_CALL / self._rate_here_per_s()))

    def _want(self, horizon_s: float) -> int:
        """Sections worth leasing for the next horizon: what the pace and the scraper can start in it."""
        limit = self.gate.limit
        capacity = capacity_per_s(limit)
        starts = limit.limit + 1 if capacity is None else math.ceil(capacity * horizon_s)
        paced = math.ceil(self.replanner.rate_per_s * horizon_s) + 1
        return max(0, min(starts, paced) - self._waiting)

    def _spacing_ms(self) -> int:
        """Between two slots: the shared pace's spacing, or this daemon's scraper capacity's when that is wider
        (slots closer than the scraper can start them would only queue at the gate and start late)."""
        rate = self.replanner.rate_per_s
        capacity = capacity_per_s(self.gate.limit)
        if capacity is not None:
            rate = min(rate, capacity)
        return max(1, round(1000 / max(rate, 1e-6)))

    @property
    def _late_ms(self) -> int:
        return int(self.timing.margin_s * 1000)

    # -- the Redis call ----------------------------------------------------------------------------------------

    async def _retire_old_layout(self) -> None:
        """Drop the Redis plan of earlier versions (one call at start); the replanner rebuilds it in Postgres."""
        held = await self.scripts.call("adaptive_sync", self.keys.old_layout, [], self.startup)
        if held:
            logger.warning(
                "adaptive: dropped the Redis plan of an earlier version (%s sections); the plan is rebuilt from "
                "Postgres",
                held,
            )
        self._retired = True

    def _urgent(self) -> bool:
        """Outcomes that may change the breaker's state: record them now, not with the next batch."""
        if any(trial for _, trial in self._outcomes) or self._breaker_state != "CLOSED":
            return bool(self._outcomes)
        trailing = 0
        for kind, _ in reversed(self._outcomes):
            if kind == "s":
                break
            trailing += kind == "f"
        return trailing > 0 and trailing + self._breaker_failures >= max(1, self.breaker.failures // 2)

    async def _record_if_urgent(self) -> None:
        """Successes wait for the next batch's call; failures nearing the threshold and trial ends do not."""
        if self._urgent():
            await self._take([])

    async def _take(self, leased: list[q.Leased], horizon_s: float = 0.0) -> dict[str, Any]:
        outcomes, self._outcomes = self._outcomes, []
        k = self.keys
        args = {
            "cfg": self.breaker.lua(),
            "outcomes": [list(o) for o in outcomes],
            "dues": [x.due_ms for x in leased],
            "horizon_ms": int(horizon_s * 1000),
            "spacing_ms": self._spacing_ms(),
        }
        # An uncertain failure drops these outcomes rather than risk applying them twice: a breaker count
        # lost is harmless, a trial slot frees itself by its TTL, and a failed check comes due again anyway.
        sent = self.clock()
        reply: dict[str, Any] = await self.scripts.call_json(
            "adaptive_take", [k.pace, k.breaker, k.breaker_trials], [orjson.dumps(args).decode()], self.redis
        )
        now = self.clock()
        self._take_rtt_s = now - sent
        self.figures.takes += 1
        now_ms = int(reply["now_ms"])
        self.redis_clock.seen(now_ms, self._take_rtt_s)
        if leased:
            self._pace_free_at = now + (int(reply["tat_ms"]) - now_ms) / 1000
        b = reply.get("breaker") or {}
        self._breaker_state = str(b.get("state", "CLOSED"))
        self._breaker_failures = int(b.get("failures", 0))
        retry_s = max(int(reply.get("retry_after_ms", 0)), int(b.get("retry_after_ms", 0))) / 1000
        # Open, or half-open with every trial place taken: no lease before it may admit again.
        self._denied_until = now + retry_s if self._breaker_state != "CLOSED" and retry_s > 0 else -math.inf
        logger.debug("adaptive take: %d outcomes, breaker %s", len(outcomes), self._breaker_state)
        return reply

    async def _flush_again(self) -> None:
        if not self._again:
            return
        again, self._again = self._again, []
        try:
            await q.again(self.pool, again)
        except BaseException:
            self._again[:0] = again
            raise

    # -- one check ---------------------------------------------------------------------------------------------

    def _hand_back(self, lease: Lease, due_ms: int) -> None:
        """Not checked after all: due again by ``due_ms``, its last check the one before this slot."""
        self._again.append(q.Again(lease.term, lease.class_nbr, due_ms, restore=True, last_ms=lease.prev_ms))
        if lease.trial:
            self._outcomes.append(("n", lease.trial))

    async def _check(self, lease: Lease) -> None:
        try:
            with anyio.move_on_after(max(0.0, lease.start_at - self.clock())):
                await self._stopping.wait()
            if self._stopping.is_set():
                raise anyio.get_cancelled_exc_class()  # not started: handed back below
            if self._denied_until > self.clock() and not lease.trial:
                # The breaker opened since this slot was admitted: wait, without a check, until it may admit.
                self._waiting -= 1
                wait_ms = int((self._denied_until - self.clock()) * 1000)
                self._hand_back(lease, self.redis_clock.now_ms() + wait_ms)
                return
            await self.gate.acquire()
        except BaseException as exc:
            self._waiting -= 1
            self._hand_back(lease, self.redis_clock.now_ms())
            if isinstance(exc, anyio.get_cancelled_exc_class()) and self._stopping.is_set():
                return
            raise
        self._waiting -= 1
        try:
            if self.clock() > lease.start_at + self.timing.late_s - lease.rtt_s:
                # Started late, it could land within the minimum interval of the next check: put it back.
                self.figures.skipped += 1
                self._hand_back(lease, self.redis_clock.now_ms())
                self._poke.set()
                return
            await self._run(lease)
        finally:
            self.gate.release()

    async def _run(self, lease: Lease) -> None:
        job = Job("", lease.member, lease.term, lease.class_nbr, 0, lease.slot_ms)
        ticket = Ticket(job, trial=lease.trial)
        self.figures.checks += 1
        if lease.prev_ms is not None and lease.prev_ms > 0:
            self.figures.intervals_s.append((lease.slot_ms - lease.prev_ms) / 1000)
        retry_ms = int((self.timing.min_s + self.timing.margin_s) * 1000)
        again_ms: int | None = None
        try:
            await self.pipeline(ticket)
        except DeferJob as exc:
            again_ms = max(retry_ms, int(exc.delay_s * 1000))
            logger.info("section %s deferred %.0fs: %s", lease.member, exc.delay_s, exc)
        except RetryableJobError as exc:
            again_ms = retry_ms
            logger.warning("section %s check failed, again in %.0fs: %s", lease.member, retry_ms / 1000, exc)
        except PermanentJobError as exc:
            logger.error("section %s: %s; checked again at its next due time", lease.member, exc)
        except Exception:
            logger.exception("section %s: check failed unexpectedly", lease.member)
            again_ms = retry_ms
        finally:
            if ticket.trial or ticket.breaker != "n":
                self._outcomes.append((ticket.breaker, ticket.trial))
                if self._urgent():
                    self._poke.set()
        if again_ms is not None:
            self._again.append(q.Again(lease.term, lease.class_nbr, self.redis_clock.now_ms() + again_ms))
