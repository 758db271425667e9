"""The queue's runtime: one reader feeding a bounded pool of workers from batch entries, a settler and a maintainer.

It is built to be frugal, because production Redis bills every command, those a script runs included:

* Idle, the only traffic is one blocking ``XREADGROUP`` every ``idle_block_s`` and one maintenance call
  every ``idle_maintenance_s``: no polling loop, and nothing that grows with the concurrency.
* Busy, one stream entry carries a batch of sections. One ``queue_cycle`` call takes the next entry and
  admits its sections through the breaker (one admission per batch); the workers draw from that batch, and
  once it is nearly worked through the next call settles the finished entries (acknowledge, retries as one
  delayed member, dead letters), records their breaker outcomes in order and takes the next entry. A
  failure reaches the breaker at once (the settler's call); successes wait for their batch. If the breaker
  opens meanwhile, the batch's sections not yet started are deferred without spending an attempt.

Correctness does not lean on the batching: an entry is acknowledged only after every section's handler
returned (its work committed) or was handed back; an entry held for long is kept with a heartbeat; an
unacknowledged entry is requeued by the maintenance of any daemon once it has been idle for the visibility
timeout, and a restarted daemon requeues its own unacknowledged entries at once.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from daemon.backoff import Backoff, Outage, retry_delay_s
from daemon.checks.pipeline import Ticket
from daemon.checks.settlement import Settlement
from daemon.errors import DeferJob, PermanentJobError, RetryableJobError
from daemon.jobs import Done, Job, Malformed
from daemon.primitives.clients import REDIS_ERRORS

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from anyio.abc import TaskGroup

    from daemon.primitives.breaker import BreakerState
    from daemon.primitives.queue import CycleResult, Queue, QueueStats
    from daemon.telemetry import Progress

logger = logging.getLogger(__name__)


class Handler(Protocol):
    """Does one job. Returning acknowledges it; ``errors.JobError`` subclasses say what else to do."""

    async def __call__(self, ticket: Ticket) -> None: ...


@dataclass
class ConsumerState:
    """What the consumer last saw, for health, status and metrics (no Redis command per probe)."""

    stats: QueueStats | None = None
    stats_at: float | None = None
    breaker: BreakerState | None = None
    breaker_at: float | None = None
    running: int = 0
    completed: int = 0
    retried: int = 0
    deferred: int = 0
    dead_lettered: int = 0
    redis_ok: bool = True


class Consumer:
    """One blocking reader, a bounded pool, a settler and a maintainer, until ``stopping`` is set.

    On ``stopping``: no more reads; running jobs finish (the caller bounds that with the shutdown grace
    by cancelling); jobs cancelled mid-way are returned to the stream without spending an attempt; every
    outcome is settled before ``run`` returns.
    """

    def __init__(
        self,
        queue: Queue,
        handler: Handler,
        *,
        concurrency: int = 4,
        retry_base_s: float = 30.0,
        idle_block_s: float = 900.0,
        idle_maintenance_s: float = 3600.0,
        settle_linger_s: float = 0.2,
        progress: Progress | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue = queue
        self.handler = handler
        self.concurrency = concurrency
        self.refill_at = max(1, concurrency // 2)
        self.retry_base_s = retry_base_s
        self.idle_block_s = idle_block_s
        self.idle_maintenance_s = idle_maintenance_s
        self.busy_maintenance_s = max(1.0, queue.visibility_timeout_s / 2)
        self.settle_linger_s = settle_linger_s
        # A finished entry waits at most this long for the reader's next call to carry its settlement (the
        # heartbeat, not this, keeps it from being taken over meanwhile).
        self.max_unsettled_s = queue.visibility_timeout_s / 3
        self.clock = clock
        self.progress = progress
        self.state = ConsumerState()
        self._redis = Outage("queue: Redis", logger)  # one "unavailable"/"back" per outage, whichever loop sees it

        self.settlement = Settlement(
            queue,
            max_unsettled_s=self.max_unsettled_s,
            linger_s=settle_linger_s,
            clock=clock,
            on_result=self._observe_cycle,
            on_outage=self._redis_seen,
        )

        self._running = 0
        self._backlog: collections.deque[Ticket] = collections.deque()  # admitted sections not yet started
        self._jobs: TaskGroup | None = None
        self._feeding = False
        self._stopping: anyio.Event | None = None
        self._capacity = anyio.Event()  # set when a job finishes
        self._poke_maintainer = anyio.Event()
        self._maintain_at = 0.0  # clock time of the next maintenance
        self._first_maintenance_s = self.busy_maintenance_s
        self._paused_until = 0.0  # breaker said wait
        self._reader_waiting_on_stream = False
        self._active_since_maintenance = False

    # -- lifecycle -------------------------------------------------------------------------------------

    async def run(self, stopping: anyio.Event) -> None:
        """Consume until ``stopping``: resume this consumer's unacknowledged entries, then read, run, settle."""
        await self._with_redis_retry(self.queue.ensure_group, stopping)
        resumed = await self._with_redis_retry(lambda: self.queue.maintain(resume=True), stopping)
        if resumed is not None:
            self._observe_stats(resumed)
            if not (resumed.pending or resumed.waiting or resumed.delayed):
                # That maintenance found the queue empty: the next is an idle period away (work arriving
                # brings it forward).
                self._first_maintenance_s = self.idle_maintenance_s
            if resumed.requeued or resumed.dead:
                logger.info(
                    "resumed %d unacknowledged jobs of consumer %s (%d dead-lettered)",
                    resumed.requeued,
                    self.queue.consumer,
                    resumed.dead,
                )
        try:
            async with anyio.create_task_group() as jobs:
                self._jobs, self._stopping = jobs, stopping
                async with anyio.create_task_group() as loops:
                    loops.start_soon(self._reader, jobs, stopping)
                    loops.start_soon(self.settlement.run, lambda: self._reader_waiting_on_stream)
                    loops.start_soon(self._maintainer)
                    await stopping.wait()
                    loops.cancel_scope.cancel()
                # Admitted but never started: handed back without spending an attempt.
                while self._backlog:
                    ticket = self._backlog.popleft()
                    self._running += 1
                    self._settled(ticket, Done(ticket.job, "requeue", attempts=ticket.job.attempts))
                if self.progress is not None:
                    self.progress.done("reader")
                    self.progress.done("maintainer")
                if self._running:
                    logger.info("draining: waiting for %d running jobs", self._running)
        finally:
            with anyio.move_on_after(15, shield=True):
                await self.settlement.flush()

    async def _with_redis_retry(self, call: Callable[[], Any], stopping: anyio.Event) -> Any:
        backoff = Backoff(1.0, 30.0)
        while not stopping.is_set():
            try:
                result = await call()
            except REDIS_ERRORS as exc:
                self._redis_down(exc)
                await backoff.wait(stopping=stopping)
            else:
                self._redis_up()
                return result
        return None

    def _redis_down(self, exc: BaseException) -> None:
        self._redis.down(exc)
        self.state.redis_ok = False

    def _redis_up(self) -> None:
        self._redis.up()
        self.state.redis_ok = True

    def _redis_seen(self, exc: BaseException | None) -> None:
        if exc is None:
            self._redis_up()
        else:
            self._redis_down(exc)

    def _expect(self, loop: str, within_s: float) -> None:
        if self.progress is not None:
            self.progress.expect(loop, within_s)

    # -- reader ------------------------------------------------------------------------------------------

    async def _reader(self, jobs: TaskGroup, stopping: anyio.Event) -> None:
        """Feed the pool: one script call per batch entry while the stream has work, a blocking read when not.

        While busy (the last call found an entry, or finished entries wait to be settled), one queue_cycle
        call settles, takes the next entry and admits its sections. Only when the stream runs dry does the
        reader block on XREADGROUP (minutes at a time), and the entry that wakes it is admitted with the
        next call: so an idle consumer costs one command per block period.
        """
        backoff = Backoff(1.0, 30.0)
        busy = True

        def keep_trying() -> bool:
            return not stopping.is_set()

        def renew(wait_s: float) -> None:
            self._expect("reader", wait_s + 60)

        while True:
            await self._wait_for_capacity()
            pause_s = self._paused_until - self.clock()
            if pause_s > 0:
                self._reader_waiting_on_stream = True
                renew(pause_s)
                await anyio.sleep(pause_s)
                self._reader_waiting_on_stream = False
            if busy or self.settlement.buffered:
                renew(30)
                fetch = 0 if stopping.is_set() else 1
                result = await self.settlement.cycle([], fetch=fetch, keep_trying=keep_trying, on_retry=renew)
                if result is None:
                    continue
                taken = len(result.fetched) + len(result.bad) + len(result.poisoned)
                busy = fetch > 0 and taken > 0
                if taken:
                    self._active_since_maintenance = True
                    self._admit(result.fetched, result.bad, result, stopping)
                    continue
            self._reader_waiting_on_stream = True
            renew(self.idle_block_s)
            try:
                with anyio.fail_after(self.idle_block_s + 30):
                    entries = await self.queue.read(1, self.idle_block_s)
            except (*REDIS_ERRORS, TimeoutError) as exc:
                self._reader_waiting_on_stream = False
                self._redis_down(exc)
                wait_s = backoff.failed()
                renew(wait_s)
                await anyio.sleep(wait_s)
                continue
            self._reader_waiting_on_stream = False
            self._redis_up()
            backoff.reset()
            if not entries:
                continue
            # An entry came: more may be waiting, to be taken with the settle call.
            busy = True
            self._active_since_maintenance = True
            good = [e for e in entries if isinstance(e, Job)]
            bad = [e for e in entries if isinstance(e, Malformed)]
            if not good:
                # Nothing to admit: the entry (all of it not jobs) is settled with the next call.
                self._admit([], bad, None, stopping)
                continue
            result = await self.settlement.cycle(good, keep_trying=keep_trying, on_retry=renew)
            if result is not None:
                self._admit(good, bad, result, stopping)

    def _admit(
        self, batch: Sequence[Job], bad: Sequence[Malformed], result: CycleResult | None, stopping: anyio.Event
    ) -> None:
        """Register the entries read, queue the admitted head of ``batch`` for the workers, defer the rest
        (the breaker said no: no attempt spent). No await: once Redis admitted these sections they are
        started or handed back before anything can cancel us."""
        now = self.clock()
        # Work is flowing: look for entries a dead daemon left within half the visibility timeout, not an
        # idle period (each maintenance costs a few commands; idle, one an hour is enough).
        self._maintain_soon(self.busy_maintenance_s)
        for entry_id, n in collections.Counter([j.entry_id for j in batch] + [m.entry_id for m in bad]).items():
            self.settlement.expect(entry_id, n)
        self.state.dead_lettered += len(bad)
        self.settlement.bad_sections(bad)
        admitted = result.admitted if result is not None else 0
        for i, job in enumerate(batch[:admitted]):
            assert result is not None
            ticket = Ticket(job, trial=result.trials[i] if i < len(result.trials) else "", read_at=now)
            if stopping.is_set():
                # Admitted as the stop came: hand it straight back, no attempt spent.
                self._running += 1
                self._settled(ticket, Done(job, "requeue", attempts=job.attempts))
            else:
                self._backlog.append(ticket)
        if result is not None and admitted < len(batch):
            deferred = batch[admitted:]
            delay_s = max(0.1, result.retry_after_s)
            for job in deferred:
                self.settlement.add(Done(job, "defer", delay_s=delay_s, attempts=job.attempts))
            self.state.deferred += len(deferred)
            self._paused_until = self.clock() + delay_s
            logger.info(
                "breaker %s: %d jobs deferred for %.0fs without spending an attempt",
                result.breaker.state,
                len(deferred),
                result.retry_after_s,
            )
        self._feed()

    def _feed(self) -> None:
        """Start queued sections while slots are free. A section admitted while the breaker was CLOSED that
        it has since left (this daemon's failures, or another's, seen in a reply) is deferred instead."""
        jobs = self._jobs
        if jobs is None or self._feeding:
            return
        self._feeding = True
        try:
            self._feed_into(jobs)
        finally:
            self._feeding = False

    def _feed_into(self, jobs: TaskGroup) -> None:
        while self._backlog and self._running < self.concurrency:
            ticket = self._backlog.popleft()
            self._running += 1
            self.state.running = self._running
            breaker = self.state.breaker
            if breaker is not None and breaker.state != "CLOSED" and not ticket.trial:
                delay_s = max(0.1, breaker.retry_after_s)
                self.state.deferred += 1
                self._paused_until = max(self._paused_until, self.clock() + delay_s)
                self._settled(ticket, Done(ticket.job, "defer", delay_s=delay_s, attempts=ticket.job.attempts))
                continue
            jobs.start_soon(self._run, ticket)

    async def _wait_for_capacity(self) -> None:
        # Read when the batch in hand is started and about half the slots are free (or all of them are).
        while True:
            free = self.concurrency - self._running
            if not self._backlog and (free >= self.refill_at or self._running == 0):
                return
            self._capacity = anyio.Event()
            await self._capacity.wait()

    def _observe_cycle(self, result: CycleResult) -> None:
        for entry_id, reason in result.poisoned:
            logger.error("entry %s dead-lettered: %s", entry_id, reason)
        self.state.dead_lettered += len(result.poisoned)
        self.state.breaker = result.breaker
        self.state.breaker_at = self.clock()
        if result.next_due_in_s is not None:
            self._maintain_soon(result.next_due_in_s)

    # -- jobs ----------------------------------------------------------------------------------------------

    async def _run(self, ticket: Ticket) -> None:
        job = ticket.job
        done: Done
        try:
            await self.handler(ticket)
            done = Done(job, "ack")
            self.state.completed += 1
        except DeferJob as exc:
            done = Done(job, "defer", delay_s=exc.delay_s, error=str(exc), attempts=job.attempts)
            self.state.deferred += 1
            logger.info("job %s deferred %.0fs (attempt not spent): %s", job.id, exc.delay_s, exc)
        except PermanentJobError as exc:
            done = Done(job, "dead", error=str(exc), attempts=job.attempt)
            self.state.dead_lettered += 1
            logger.error("job %s dead-lettered: %s", job.id, exc)
        except anyio.get_cancelled_exc_class():
            # Shutdown ran out of grace: give the job back without spending an attempt.
            self._settled(ticket, Done(job, "requeue", attempts=job.attempts))
            raise
        except Exception as exc:
            done = self._failed(job, exc)
        self._settled(ticket, done)

    def _failed(self, job: Job, exc: Exception) -> Done:
        reason = str(exc) or exc.__class__.__name__
        if not isinstance(exc, RetryableJobError):
            logger.exception("job %s failed unexpectedly (attempt %d)", job.id, job.attempt)
            reason = f"{exc.__class__.__name__}: {reason}"
        if job.attempt >= self.queue.max_attempts:
            self.state.dead_lettered += 1
            logger.error("job %s dead-lettered after %d attempts: %s", job.id, job.attempt, reason)
            return Done(job, "dead", error=reason, attempts=job.attempt)
        delay_s = getattr(exc, "delay_s", None)
        if delay_s is None:
            delay_s = retry_delay_s(job.attempt, self.retry_base_s)
        self.state.retried += 1
        logger.warning("job %s attempt %d failed, retry in %.0fs: %s", job.id, job.attempt, delay_s, reason)
        return Done(job, "retry", delay_s=delay_s, error=reason, attempts=job.attempt)

    def _settled(self, ticket: Ticket, done: Done) -> None:
        outcome = (ticket.breaker, ticket.trial) if ticket.trial or ticket.breaker != "n" else None
        self._running -= 1
        self.state.running = self._running
        self._capacity.set()
        self.settlement.add(done, outcome=outcome)
        if self._stopping is None or not self._stopping.is_set():
            self._feed()

    # -- maintenance -----------------------------------------------------------------------------------------

    def _maintain_soon(self, in_s: float) -> None:
        at = self.clock() + in_s
        if at < self._maintain_at:
            self._maintain_at = at
            self._poke_maintainer.set()

    def _observe_stats(self, stats: QueueStats) -> None:
        self.state.stats = stats
        self.state.stats_at = self.clock()

    async def _maintainer(self) -> None:
        """Promote due retries and requeue stale entries, as rarely as the queue's state allows."""
        backoff = Backoff(1.0, 30.0)
        self._maintain_at = self.clock() + self._first_maintenance_s
        while True:
            self._poke_maintainer = anyio.Event()
            wait_s = self._maintain_at - self.clock()
            self._expect("maintainer", max(0.0, wait_s) + 60)
            if wait_s > 0:
                with anyio.move_on_after(wait_s):
                    await self._poke_maintainer.wait()
                continue
            try:
                stats = await self.queue.maintain()
            except REDIS_ERRORS as exc:
                self._redis_down(exc)
                self._maintain_at = self.clock() + backoff.failed()
                continue
            backoff.reset()
            self._redis_up()
            self._observe_stats(stats)
            if stats.requeued or stats.dead:
                logger.warning(
                    "requeued %d jobs nobody acknowledged within %.0fs (%d dead-lettered)",
                    stats.requeued,
                    self.queue.visibility_timeout_s,
                    stats.dead,
                )
            busy = stats.pending or stats.waiting or self._running or self._active_since_maintenance
            self._active_since_maintenance = False
            next_in = self.busy_maintenance_s if busy else self.idle_maintenance_s
            for candidate in (stats.next_due_in_s, stats.next_reclaim_in_s):
                if candidate is not None:
                    # A little after the moment, so the entry is due (or idle long enough) by Redis time.
                    next_in = min(next_in, candidate + 0.05)
            self._maintain_at = self.clock() + max(0.05, next_in)
