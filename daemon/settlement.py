"""Settlement: the consumer's finished jobs and breaker outcomes, sent to Redis in ``queue_cycle`` calls.

A job's outcome waits here until the next cycle call carries it: the reader's next batch, or the settler's
call when the reader waits on the stream or an outcome is due (at the latest a third of the visibility
timeout after its delivery, long before another consumer could take the job over as unacknowledged).

A cycle call is shielded and retried under its cycle id, which the script answers from a reply cache if an
earlier try did run (its answer lost): so neither a cancellation nor a lost reply drops an outcome or
applies one twice. A cycle given up on stays "unconfirmed" and is sent again, under its id, before anything
else; jobs it turns out to have admitted (never started) are handed back then, without spending an attempt.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from daemon import faults
from daemon.backoff import Backoff
from daemon.jobs import Done, Job
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


class Settlement:
    """The buffered outcomes of one consumer and the one path that sends them (``cycle``).

    ``on_result`` sees every confirmed reply once (the consumer's view of the breaker and the queue, and the
    entries the script dead-lettered because they were not jobs);
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
        self.linger_s = linger_s
        self.clock = clock
        self.on_result = on_result
        self.on_outage = on_outage
        self._done: list[Done] = []
        self._outcomes: list[tuple[str, str]] = []
        self._lock = anyio.Lock()
        self._finished = anyio.Event()  # set when an outcome is added, for the settler
        self._settle_by = float("inf")  # clock time by which the buffered outcomes must be settled
        self._last_cycle_id: str | None = None
        self.unconfirmed: _Unsent | None = None  # a cycle given up on, that may or may not have run

    @property
    def buffered(self) -> bool:
        """Whether finished jobs or breaker outcomes wait to be sent."""
        return bool(self._done or self._outcomes)

    @property
    def pending(self) -> bool:
        """Whether anything waits: buffered outcomes, or a cycle not yet confirmed."""
        return self.buffered or self.unconfirmed is not None

    @property
    def unsettled_jobs(self) -> int:
        """How many finished jobs wait to be sent."""
        return len(self._done)

    def add(self, done: Done, *, read_at: float | None = None, outcome: tuple[str, str] | None = None) -> None:
        """Buffer a settled delivery (and its breaker outcome); due within ``max_unsettled_s`` of ``read_at``."""
        self._done.append(done)
        if read_at is not None:
            self._settle_by = min(self._settle_by, read_at + self.max_unsettled_s)
        if outcome is not None:
            self._outcomes.append(outcome)
        self._finished.set()

    async def cycle(
        self,
        read: Sequence[Job],
        *,
        fetch: int = 0,
        keep_trying: Callable[[], bool],
        on_retry: Callable[[float], None] | None = None,
    ) -> CycleResult | None:
        """Settle everything buffered and admit ``read`` (or up to ``fetch`` entries the script takes):
        one queue_cycle call, retried while ``keep_trying()``. None when it gave up."""
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
        """Jobs a confirmed-late cycle admitted were never started: requeue them, free their trial slots."""
        admitted = (cycle.read or result.fetched)[: result.admitted]
        for i, job in enumerate(admitted):
            self._done.append(Done(job, "requeue", attempts=job.attempts))
            trial = result.trials[i] if i < len(result.trials) else ""
            if trial:
                self._outcomes.append(("n", trial))
        if admitted:
            logger.info("%d jobs admitted by a cycle whose reply was lost go back to the queue", len(admitted))

    async def run(self, reader_waiting: Callable[[], bool]) -> None:
        """The settler: send outcomes the reader will not settle soon.

        The reader settles everything with its next cycle, which comes once enough slots are free. Outcomes
        would sit unsent when it waits on the stream (or the breaker) instead, or when the jobs still
        running are slow: then the settler sends them, by their due time at the latest.
        """
        while True:
            if not self.pending:
                self._finished = anyio.Event()
                await self._finished.wait()
                continue
            await anyio.sleep(self.linger_s)
            due = reader_waiting() or self.clock() >= self._settle_by
            if due and self.pending:
                await self.cycle([], keep_trying=lambda: True)  # the reader's calls settle these too

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
