"""Settlement: the consumer's finished entries and breaker outcomes, sent to Redis in ``queue_cycle`` calls.

A stream entry carries a batch of sections. Its sections' outcomes wait here until the last of them is done;
then the entry is ready and goes with the next cycle call: the reader's next batch, or the settler's call
when the reader waits on the stream or the entry has waited ``max_unsettled_s``. Breaker outcomes go with
any call, and a failure or a half-open trial's outcome makes a call due at once, so the breaker opens
(or closes) as promptly as it did with one call per section; a run of successes waits for its batch.
While an entry is worked on, a heartbeat (one XCLAIM for every entry held) keeps another daemon from
taking it over as unacknowledged, so a batch may take longer than the visibility timeout.

A cycle call is shielded and retried under its cycle id, which the script answers from a reply cache if an
earlier try did run (its answer lost): so neither a cancellation nor a lost reply drops an outcome or
applies one twice. A cycle given up on stays "unconfirmed" and is sent again, under its id, before anything
else; sections it turns out to have admitted (never started) are handed back then, without spending an
attempt.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from daemon import faults
from daemon.backoff import Backoff
from daemon.jobs import Done, Job, Malformed
from daemon.primitives.clients import REDIS_ERRORS

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from daemon.primitives.queue import CycleResult, Queue

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Unsent:
    """One queue_cycle call, kept whole so a retry sends exactly the same thing under the same id."""

    id: str
    outcomes: list[tuple[str, str]]
    done: list[Done]
    read: list[Job]
    fetch: int


@dataclass
class _Entry:
    """A stream entry being worked on: how many of its sections there are, and those done so far."""

    expected: int
    claimed_at: float  # when it was read or last heartbeat
    done: list[Done] = field(default_factory=list)


class Settlement:
    """The buffered outcomes of one consumer and the one path that sends them (``cycle``).

    ``on_result`` sees every confirmed reply once (the consumer's view of the breaker, and the entries the
    script dead-lettered because they were not jobs);
    ``on_outage`` sees each failed call's error and ``None`` on success (the consumer's Redis outage).
    """

    def __init__(
        self,
        queue: Queue,
        *,
        max_unsettled_s: float,
        linger_s: float,
        clock: Callable[[], float],
        on_result: Callable[[CycleResult], None],
        on_outage: Callable[[BaseException | None], None],
    ) -> None:
        self.queue = queue
        self.max_unsettled_s = max_unsettled_s
        self.heartbeat_s = queue.visibility_timeout_s / 3
        self.linger_s = linger_s
        self.clock = clock
        self.on_result = on_result
        self.on_outage = on_outage
        self._open: dict[str, _Entry] = {}
        self._done: list[Done] = []  # sections of ready entries
        self._outcomes: list[tuple[str, str]] = []
        self._lock = anyio.Lock()
        self._finished = anyio.Event()  # set when something is added, for the settler
        self._settle_by = float("inf")  # clock time by which the buffered outcomes must be settled
        self._last_cycle_id: str | None = None
        self.unconfirmed: _Unsent | None = None  # a cycle given up on, that may or may not have run

    @property
    def buffered(self) -> bool:
        """Whether ready entries or breaker outcomes wait to be sent."""
        return bool(self._done or self._outcomes)

    @property
    def pending(self) -> bool:
        """Whether anything waits: buffered outcomes, or a cycle not yet confirmed."""
        return self.buffered or self.unconfirmed is not None

    @property
    def unsettled_jobs(self) -> int:
        """How many finished sections wait to be sent (of ready entries and of entries still worked on)."""
        return len(self._done) + sum(len(e.done) for e in self._open.values())

    @property
    def held(self) -> int:
        """How many entries this consumer holds unsettled (being worked on)."""
        return len(self._open)

    def expect(self, entry_id: str, sections: int) -> None:
        """An entry was read: it is ready to settle once ``sections`` outcomes were added for it."""
        entry = self._open.get(entry_id)
        if entry is None:
            self._open[entry_id] = _Entry(sections, self.clock())
        else:
            entry.expected += sections

    def add(self, done: Done, *, outcome: tuple[str, str] | None = None) -> None:
        """Buffer a settled section (and its breaker outcome). Its entry is ready once every section is in;
        a failure or a trial's outcome is due at once."""
        entry = self._open.get(done.job.entry_id)
        if entry is None:
            self._ready([done])
        else:
            entry.done.append(done)
            if len(entry.done) >= entry.expected:
                del self._open[done.job.entry_id]
                self._ready(entry.done)
        if outcome is not None:
            self._outcomes.append(outcome)
            if outcome[0] == "f" or outcome[1]:
                self._settle_by = self.clock()
        self._finished.set()

    def _ready(self, done: list[Done]) -> None:
        self._done.extend(done)
        self._settle_by = min(self._settle_by, self.clock() + self.max_unsettled_s)

    async def cycle(
        self,
        read: Sequence[Job],
        *,
        fetch: int = 0,
        keep_trying: Callable[[], bool],
        on_retry: Callable[[float], None] | None = None,
    ) -> CycleResult | None:
        """Settle everything buffered and admit ``read`` (or the sections of up to ``fetch`` entries the
        script takes): one queue_cycle call, retried while ``keep_trying()``. None when it gave up."""
        async with self._lock:
            if self.unconfirmed is not None:
                earlier = self.unconfirmed
                result = await self._send(earlier, keep_trying, on_retry)
                if result is None:
                    return None
                self.unconfirmed = None
                self._hand_back(earlier, result)
            done, outcomes = self._done, self._outcomes
            self._done, self._outcomes = [], []
            self._settle_by = float("inf")
            pending = _Unsent(secrets.token_hex(8), outcomes, done, list(read), fetch)
            return await self._send(pending, keep_trying, on_retry)

    async def _send(
        self, cycle: _Unsent, keep_trying: Callable[[], bool], on_retry: Callable[[float], None] | None
    ) -> CycleResult | None:
        """Send ``cycle`` until it is confirmed or ``keep_trying()`` says stop (then it stays unconfirmed)."""
        confirmed = False
        try:
            backoff = Backoff(0.5, 10.0)
            if any(d.action == "ack" for d in cycle.done):
                faults.point("before_ack")
            while True:
                try:
                    with anyio.CancelScope(shield=True), anyio.fail_after(30):
                        result = await self.queue.cycle(
                            cycle.outcomes,
                            cycle.done,
                            cycle.read,
                            fetch=cycle.fetch,
                            cycle_id=cycle.id,
                            forget=self._last_cycle_id,
                        )
                except (*REDIS_ERRORS, TimeoutError) as exc:
                    self.on_outage(exc)
                    if not keep_trying():
                        return None
                    wait_s = backoff.failed()
                    if on_retry is not None:
                        on_retry(wait_s)
                    await anyio.sleep(wait_s)
                    continue
                confirmed = True
                self._last_cycle_id = cycle.id
                self.on_outage(None)
                self.on_result(result)
                return result
        finally:
            if not confirmed:
                self.unconfirmed = cycle
                self._settle_by = self.clock()

    def _hand_back(self, cycle: _Unsent, result: CycleResult) -> None:
        """Sections a confirmed-late cycle read were never started: their entries go back whole (the admitted
        ones requeued without spending an attempt, the rest too, the bad ones dead-lettered), their trial
        slots freed."""
        read = cycle.read or result.fetched
        for i, job in enumerate(read):
            self._done.append(Done(job, "requeue", attempts=job.attempts))
            trial = result.trials[i] if i < len(result.trials) and i < result.admitted else ""
            if trial:
                self._outcomes.append(("n", trial))
        for bad in result.bad:
            self._done.append(Done(bad, "poison", error=bad.reason))
        if read:
            logger.info("%d sections read by a cycle whose reply was lost go back to the queue", len(read))

    def bad_sections(self, bad: Sequence[Malformed]) -> None:
        """Sections of a batch that are not jobs: settled with their entry, as dead letters."""
        for section in bad:
            logger.error("entry %s: a section is dead-lettered: %s", section.entry_id, section.reason)
            self.add(Done(section, "poison", error=section.reason))

    def heartbeat_due(self) -> list[str]:
        """Entries held long enough that their idle time needs resetting (a third of the visibility timeout)."""
        now = self.clock()
        return [eid for eid, e in self._open.items() if now - e.claimed_at >= self.heartbeat_s]

    async def heartbeat(self) -> None:
        """Reset the idle time of the entries held longest; one command for all of them."""
        due = self.heartbeat_due()
        if not due:
            return
        try:
            await self.queue.heartbeat(due)
        except REDIS_ERRORS as exc:
            self.on_outage(exc)
            return
        now = self.clock()
        for eid in due:
            if eid in self._open:
                self._open[eid].claimed_at = now

    def _next_heartbeat_in(self) -> float:
        if not self._open:
            return float("inf")
        oldest = min(e.claimed_at for e in self._open.values())
        return max(0.0, oldest + self.heartbeat_s - self.clock())

    async def run(self, reader_waiting: Callable[[], bool]) -> None:
        """The settler: send outcomes the reader will not settle soon, and keep held entries alive.

        The reader settles everything with its next cycle, which comes once its batch is nearly worked
        through. Outcomes would sit unsent when it waits on the stream (or the breaker) instead, or when a
        failure must reach the breaker now: then the settler sends them.
        """
        while True:
            if self.heartbeat_due():
                await self.heartbeat()
            if not self.pending:
                self._finished = anyio.Event()
                with anyio.move_on_after(self._next_heartbeat_in()):
                    await self._finished.wait()
                continue
            await anyio.sleep(self.linger_s)
            due = (reader_waiting() and self.buffered) or self.clock() >= self._settle_by
            if due and self.pending:
                await self.cycle([], keep_trying=lambda: True)  # the reader's calls settle these too
            elif not due:
                self._finished = anyio.Event()
                # Look again within a second: the reader may start waiting on the stream meanwhile.
                wait_s = min(self._settle_by - self.clock(), self._next_heartbeat_in(), 1.0)
                with anyio.move_on_after(max(0.0, wait_s)):
                    await self._finished.wait()

    async def flush(self) -> None:
        """At exit: settle what is left, once without retrying (twice if a lost reply handed jobs back)."""
        for _ in range(2):
            if not self.pending:
                return
            if await self.cycle([], keep_trying=lambda: False) is None:
                logger.warning(
                    "could not settle %d finished jobs before exit; they are redelivered after restart",
                    len(self._done),
                )
                return
