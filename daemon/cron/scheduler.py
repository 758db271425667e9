"""The scheduler: cron slots in the configured zone, parity stagger, per-slot markers, misfire grace.

Every slot runs at most once across all daemons sharing the Redis (the lock script refuses a slot whose
marker says ``done``) and at least once if any daemon is up within the misfire grace of it: at start, the
most recent slot at most ``grace`` old and not yet done runs once; older slots are skipped and logged. A
tick takes the cron lock, reads the sections of its group from Postgres, enqueues them (fenced by the
lock's token), and releases the lock.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import orjson

from daemon.backoff import Backoff
from daemon.cron.slots import group_for, latest_slot, next_slot, slot_id
from daemon.errors import LockBusy, SlotDone
from daemon.jobs import usable_section
from daemon.primitives.clients import REDIS_ERRORS
from daemon.store import db

if TYPE_CHECKING:
    from collections.abc import Callable
    from zoneinfo import ZoneInfo

    from daemon.primitives.lock import CronLock, Grant
    from daemon.primitives.queue import Queue
    from daemon.store.pool import Pool
    from daemon.telemetry import Metrics, Progress

logger = logging.getLogger(__name__)

LOCK_RETRY_S = 15.0


# -- one tick ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TickResult:
    """What one tick did: sections read, enqueued, already queued; fenced if the lock changed hands."""

    slot: str | None
    group: str
    sections: int
    enqueued: int
    already_queued: int
    fenced: bool
    fence: int
    duration_ms: int
    finished_at: float

    def as_dict(self) -> dict[str, Any]:
        """Its fields for health, status and the lock's last-tick record."""
        return {
            "slot": self.slot,
            "group": self.group,
            "sections": self.sections,
            "enqueued": self.enqueued,
            "already_queued": self.already_queued,
            "fence": self.fence,
            "duration_ms": self.duration_ms,
            "finished_at": datetime.fromtimestamp(self.finished_at, UTC).isoformat(timespec="seconds"),
        }


async def enqueue_under(grant: Grant, pool: Pool, queue: Queue, group: str, slot: str | None) -> TickResult:
    """Read the group's sections and enqueue them, fenced by ``grant``. The caller holds the lock."""
    started = time.perf_counter()
    sections = await db.sections_to_check(pool, group)
    unusable = [s for s in sections if not usable_section(*s)]
    if unusable:
        # A blank or non-ASCII class number can neither be scraped nor travel as a job: say so once a tick
        # instead of dead-lettering it every time.
        sections = [s for s in sections if usable_section(*s)]
        logger.warning(
            "tick %s: %d watched sections have unusable term or class numbers and are skipped, e.g. %r",
            slot or "manual",
            len(unusable),
            unusable[:3],
        )
    result = await queue.enqueue(sections, fence=grant.fence) if sections else None
    return TickResult(
        slot=slot,
        group=group,
        sections=len(sections),
        enqueued=result.added if result else 0,
        already_queued=result.skipped if result else 0,
        fenced=bool(result and result.fenced),
        fence=grant.fence,
        duration_ms=int((time.perf_counter() - started) * 1000),
        finished_at=time.time(),
    )


class Scheduler:
    """The cron loop: each slot runs once across every daemon, under the cron lock, within the misfire grace."""

    def __init__(
        self,
        *,
        cron: str,
        tz: ZoneInfo,
        stagger: str,
        grace_s: float,
        lock: CronLock,
        queue: Queue,
        pool: Pool,
        metrics: Metrics,
        progress: Progress | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.cron = cron
        self.tz = tz
        self.stagger = stagger
        self.grace_s = grace_s
        self.lock = lock
        self.queue = queue
        self.pool = pool
        self.metrics = metrics
        self.progress = progress
        self.now = now
        self.last_tick: TickResult | None = None
        self.last_by_group: dict[str, TickResult] = {}  # for the falling-behind report (SPEC §11)
        self.holding: Grant | None = None  # while this daemon ticks
        self.last_busy: LockBusy | None = None  # the last time another holder had the lock
        self.waiting_for: datetime | None = None  # the slot we sleep towards or are running
        self.missed: datetime | None = None  # a slot given up or skipped, until a later one runs

    @property
    def next_tick(self) -> datetime | None:
        """The slot it waits for (or runs), if any."""
        return self.waiting_for

    def overdue(self, allowance_s: float = 120.0) -> bool:
        """A slot passed without a tick: it is late beyond the allowance, or was given up or skipped."""
        late = self.waiting_for is not None and self.now() > self.waiting_for.timestamp() + allowance_s
        return late or self.missed is not None

    async def run(self, stopping: anyio.Event) -> None:
        """Tick each cron slot until ``stopping``; first the latest slot if it is within the grace."""
        handled = latest_slot(self.cron, self.tz, self.now())
        if self.now() - handled.timestamp() <= self.grace_s:
            self.waiting_for = handled
            await self.run_slot(handled, stopping)
        else:
            logger.info("no cron slot within the misfire grace (last was %s)", slot_id(handled))
        while not stopping.is_set():
            slot = next_slot(self.cron, self.tz, handled)
            self.waiting_for = slot
            late_s = self.now() - slot.timestamp()
            if late_s > self.grace_s:
                logger.warning("cron slot %s skipped: %.0fs late, beyond the misfire grace", slot_id(slot), late_s)
                self.metrics.ticks.labels("skipped").inc()
                self.missed = slot
                handled = slot
                continue
            wait_s = slot.timestamp() - self.now()
            if wait_s > 0:
                if self.progress is not None:
                    self.progress.expect("scheduler", wait_s + self.grace_s + 120)
                with anyio.move_on_after(wait_s):
                    await stopping.wait()
                if stopping.is_set():
                    break
                # The sleep is on the monotonic clock: a wall clock stepped back can wake us before the slot;
                # loop to recompute rather than tick early.
                if self.now() < slot.timestamp():
                    continue
            await self.run_slot(slot, stopping)
            handled = slot
        if self.progress is not None:
            self.progress.done("scheduler")

    async def run_slot(self, slot: datetime, stopping: anyio.Event) -> None:
        """Run ``slot`` once across all daemons, retrying a busy lock or an outage within the grace."""
        sid, group = slot_id(slot), group_for(slot, self.stagger)
        deadline = slot.timestamp() + self.grace_s
        # One owner token for every attempt at this slot: if an acquire ran but its reply was lost, the
        # retry finds the lock already ours instead of waiting out its TTL as "busy".
        owner = self.lock.new_owner()
        backoff = Backoff(1.0, 30.0)
        while not stopping.is_set():
            if self.progress is not None:
                self.progress.expect("scheduler", LOCK_RETRY_S + 120)
            try:
                grant = await self.lock.acquire(slot=sid, owner=owner)
            except SlotDone:
                logger.debug("cron slot %s already ran", sid)
                self._handled()
                return
            except LockBusy as busy:
                self.last_busy = busy
                wait_s = LOCK_RETRY_S
                logger.info("cron slot %s: lock held by %s; trying again in %.0fs", sid, busy.holder, wait_s)
            except REDIS_ERRORS as exc:
                wait_s = backoff.failed()
                logger.warning("cron slot %s: Redis unavailable (%s)", sid, exc)
            else:
                if await self._tick(grant, sid, group):
                    self._handled()
                    return
                wait_s = backoff.failed()
            if self.now() + wait_s > deadline:
                logger.error("cron slot %s (%s) not run: could not tick within the misfire grace", sid, group)
                self.metrics.ticks.labels("missed").inc()
                self.missed = slot
                self.waiting_for = None
                return
            with anyio.move_on_after(wait_s):
                await stopping.wait()

    def _handled(self) -> None:
        self.waiting_for = None
        self.missed = None

    async def _tick(self, grant: Grant, sid: str, group: str) -> bool:
        """Enqueue under ``grant``; the lock is released whatever happens (shielded: even on cancellation)."""
        self.holding = grant
        result: TickResult | None = None
        try:
            result = await enqueue_under(grant, self.pool, self.queue, group, sid)
        except Exception:
            logger.exception("cron slot %s: tick failed; the slot stays open for a retry", sid)
            self.metrics.ticks.labels("failed").inc()
        finally:
            self.holding = None
            with anyio.move_on_after(10, shield=True):
                try:
                    if result is None:
                        await self.lock.release(grant, slot=sid, slot_outcome="abort")
                    else:
                        tick = orjson.dumps(result.as_dict()).decode()
                        await self.lock.release(grant, slot=sid, slot_outcome="done", tick=tick)
                except REDIS_ERRORS as exc:
                    # The lock expires by itself; a slot left 'running' may be retried after that.
                    logger.warning("cron slot %s: could not release the lock (%s); it expires by itself", sid, exc)
        if result is None:
            return False
        self.last_tick = result
        if not result.fenced:
            self.last_by_group[result.group] = result
        self.metrics.ticks.labels("fenced" if result.fenced else "ok").inc()
        self.metrics.sections_enqueued.inc(result.enqueued)
        if result.fenced:
            logger.error(
                "cron slot %s: the lock changed hands mid-tick (fence %d); enqueueing stopped after %d sections",
                sid,
                result.fence,
                result.enqueued,
            )
        else:
            logger.info(
                "tick %s (%s): %d sections, %d enqueued, %d still queued from earlier, %d ms",
                sid,
                group,
                result.sections,
                result.enqueued,
                result.already_queued,
                result.duration_ms,
            )
        if result.already_queued:
            logger.warning(
                "tick %s: %d sections from earlier ticks are still queued: the queue is not keeping up",
                sid,
                result.already_queued,
            )
        return True
