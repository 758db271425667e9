"""The section queue on a Redis Stream: at-least-once, deduplicated, reclaimed, retried, dead-lettered.

Two layers. ``Queue`` is the Redis primitive: each method is one command (mostly one script call).
``Consumer`` is the runtime: one blocking reader feeding a bounded pool of workers, a settler, and a
maintainer. It is built to be frugal, because production Redis bills every command:

* Idle, the only traffic is one blocking ``XREADGROUP`` every ``idle_block_s`` and one maintenance call
  every ``idle_maintenance_s``: no polling loop, and nothing that grows with the concurrency.
* Busy, one read takes as many entries as there are free slots, and one ``queue_cycle`` script call then
  settles every job finished since the last call (acknowledge, retry, dead-letter), records their
  breaker outcomes in order, and asks the breaker to admit the entries just read. The reader waits until
  about half the slots are free before reading, so batches stay large: two commands per batch in all.

Correctness does not lean on the batching: an entry is acknowledged only after its handler returned (its
work committed), an unacknowledged entry is requeued by the maintenance of any daemon once it has been
idle for the visibility timeout, and a restarted daemon requeues its own unacknowledged entries at once.
"""

from __future__ import annotations

import logging
import random
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio
import orjson
import redis.exceptions

from daemon.errors import DeferJob, PermanentJobError, RetryableJobError
from daemon.primitives.breaker import BreakerConfig, BreakerState, OutcomeKind, trial_list

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from anyio.abc import TaskGroup

    from daemon.keys import Keys
    from daemon.primitives.scripts import Scripts
    from daemon.primitives.usage import CountingRedis
    from daemon.runtime.systemd import Progress

logger = logging.getLogger(__name__)

ENQUEUE_CHUNK: Final = 2000  # sections per enqueue script call (keeps each call's request small)
DEAD_LETTER_MAXLEN: Final = 10_000
MAINTENANCE_BATCH: Final = 500
REDIS_ERRORS: Final = (redis.exceptions.RedisError, OSError)


# -- jobs ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One delivery of a section check. ``attempts`` were spent before this one."""

    entry_id: str
    id: str
    term: str
    class_nbr: str
    attempts: int
    enqueued_ms: int

    @property
    def attempt(self) -> int:
        """1 for the first delivery, 2 for the first retry, ..."""
        return self.attempts + 1


@dataclass(frozen=True)
class Malformed:
    """A stream entry that is not a job: it goes to the dead-letter stream as it is."""

    entry_id: str
    fields: dict[str, str]
    reason: str


MAX_ATTEMPTS_FIELD: Final = 1000
MAX_ENQUEUED_MS: Final = 2**53  # anything larger is not a time, and would not survive Lua's doubles
_PRINTABLE: Final = re.compile(rb"[!-~]+")  # printable ASCII, no blanks: what term and class numbers are
_WHOLE: Final = re.compile(rb"[0-9]+")

# The reasons an entry is not a job. queue_lib.lua's q_not_a_job gives the same ones in the same order, so
# an entry fares the same whether the blocking reader or the settle script takes it.
NO_FIELDS: Final = "malformed entry: no term or class_nbr"
NOT_PRINTABLE: Final = "malformed entry: term or class_nbr is not printable ASCII"
ID_MISMATCH: Final = "malformed entry: id does not match term and class_nbr"
NOT_WHOLE: Final = "malformed entry: attempts or enqueued_ms is not a whole number"
OUT_OF_RANGE: Final = "malformed entry: attempts or enqueued_ms out of range"


def usable_section(term: str, class_nbr: str) -> bool:
    """Whether (term, class_nbr) can travel as a job: printable ASCII without blanks."""
    return bool(_PRINTABLE.fullmatch(term.encode())) and bool(_PRINTABLE.fullmatch(class_nbr.encode()))


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def parse_entry(entry_id: bytes | str, fields: dict[bytes, bytes] | dict[str, str]) -> Job | Malformed:
    """A job from a stream entry, or why it is not one. Never raises: whatever is in the stream is data."""
    eid = _bytes(entry_id).decode("ascii", "replace")
    raw = {_bytes(k): _bytes(v) for k, v in fields.items()}
    shown = {k.decode("utf-8", "backslashreplace"): v.decode("utf-8", "backslashreplace") for k, v in raw.items()}

    def malformed(reason: str) -> Malformed:
        return Malformed(eid, shown, reason)

    term, class_nbr = raw.get(b"term", b""), raw.get(b"class_nbr", b"")
    if not term or not class_nbr:
        return malformed(NO_FIELDS)
    if not (_PRINTABLE.fullmatch(term) and _PRINTABLE.fullmatch(class_nbr)):
        return malformed(NOT_PRINTABLE)
    if raw.get(b"id") != term + b"-" + class_nbr:
        return malformed(ID_MISMATCH)
    attempts, enqueued = raw.get(b"attempts", b"0"), raw.get(b"enqueued_ms", b"0")
    if not (_WHOLE.fullmatch(attempts) and _WHOLE.fullmatch(enqueued)):
        return malformed(NOT_WHOLE)
    if int(attempts) > MAX_ATTEMPTS_FIELD or int(enqueued) > MAX_ENQUEUED_MS:
        return malformed(OUT_OF_RANGE)
    job_id = (term + b"-" + class_nbr).decode("ascii")
    return Job(eid, job_id, term.decode("ascii"), class_nbr.decode("ascii"), int(attempts), int(enqueued))


@dataclass
class Ticket:
    """What a handler gets: the job, and where to say how the breaker-guarded call went."""

    job: Job
    trial: str = ""
    breaker: OutcomeKind = "n"
    read_at: float = 0.0  # when the reader got it (its idle time in Redis counts from about then)

    def success(self) -> None:
        self.breaker = "s"

    def failure(self) -> None:
        self.breaker = "f"


class Handler(Protocol):
    """Does one job. Returning acknowledges it; ``errors.JobError`` subclasses say what else to do."""

    async def __call__(self, ticket: Ticket) -> None: ...


@dataclass(frozen=True)
class Done:
    """A settled delivery, as the cycle script takes it."""

    job: Job | Malformed
    action: str  # ack | retry | defer | requeue | dead | poison
    delay_s: float = 0.0
    error: str = ""
    attempts: int = 0  # attempts spent after this delivery (what a retry carries forward)

    def lua(self) -> list[Any]:
        if isinstance(self.job, Malformed):
            raw = orjson.dumps(self.job.fields).decode()
            return [
                self.job.entry_id,
                self.job.fields.get("id", ""),
                "poison",
                0,
                "",
                "",
                0,
                0,
                self.error,
                raw,
            ]
        j = self.job
        return [
            j.entry_id,
            j.id,
            self.action,
            int(self.delay_s * 1000),
            j.term,
            j.class_nbr,
            self.attempts,
            j.enqueued_ms,
            self.error,
            "",
        ]


# -- the Redis primitive -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnqueueResult:
    added: int
    skipped: int
    fenced: bool = False


@dataclass(frozen=True)
class QueueStats:
    waiting: int
    pending: int
    delayed: int
    dead_letters: int
    next_due_in_s: float | None = None
    next_reclaim_in_s: float | None = None
    promoted: int = 0
    requeued: int = 0
    dead: int = 0

    @classmethod
    def from_lua(cls, reply: dict[str, Any]) -> QueueStats:
        """From a script reply: the stream holds waiting and pending entries (settled ones are deleted)."""
        pending = int(reply["pending"])
        reclaim_ms = int(reply.get("next_reclaim_ms", -1))
        return cls(
            waiting=max(0, int(reply["stream"]) - pending),
            pending=pending,
            delayed=int(reply["delayed"]),
            dead_letters=int(reply["dead_letters"]),
            next_due_in_s=_due_in(reply) if "now_ms" in reply else None,
            next_reclaim_in_s=None if reclaim_ms < 0 else reclaim_ms / 1000,
            promoted=int(reply.get("promoted", 0)),
            requeued=int(reply.get("requeued", 0)),
            dead=int(reply.get("dead", 0)),
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "waiting": self.waiting,
            "pending": self.pending,
            "delayed": self.delayed,
            "dead_letters": self.dead_letters,
        }


@dataclass(frozen=True)
class CycleResult:
    admitted: int
    trials: list[str]
    retry_after_s: float
    deferred: int
    fetched: list[Job]  # entries the script read itself (``fetch``); the first ``admitted`` may run
    poisoned: list[tuple[str, str]]  # (entry id, reason) of fetched entries that were not jobs: now dead letters
    breaker: BreakerState
    next_due_in_s: float | None  # until the earliest delayed job is due, from Redis time
    stats: QueueStats  # the queue's figures right after this cycle


def _due_in(reply: dict[str, Any], key: str = "next_due_ms") -> float | None:
    due = int(reply.get(key, -1))
    if due < 0:
        return None
    return max(0.0, (due - int(reply["now_ms"])) / 1000)


class Queue:
    """The stream, its consumer group, the delayed set and the dead-letter stream of one key prefix."""

    def __init__(
        self,
        redis: CountingRedis,
        blocking: CountingRedis,
        keys: Keys,
        scripts: Scripts,
        *,
        consumer: str,
        visibility_timeout_s: float = 300,
        max_attempts: int = 3,
        breaker: BreakerConfig | None = None,
    ) -> None:
        self.redis = redis
        self.blocking = blocking
        self.keys = keys
        self.scripts = scripts
        self.consumer = consumer
        self.visibility_timeout_s = visibility_timeout_s
        self.max_attempts = max_attempts
        self.breaker = breaker or BreakerConfig(trial_ttl_s=visibility_timeout_s)

    async def ensure_group(self) -> None:
        """Create the stream and its consumer group if missing (one command)."""
        try:
            await self.redis.xgroup_create(self.keys.stream, self.keys.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def enqueue(self, sections: Iterable[tuple[str, str]], *, fence: int | None = None) -> EnqueueResult:
        """Add (term, class_nbr) jobs unless already waiting, running or delayed; one call per 2,000.

        With ``fence``, nothing is added once the cron lock has been granted to someone else since.
        """
        added = skipped = 0
        flat: list[str] = []
        items = list(sections)
        for start in range(0, len(items), ENQUEUE_CHUNK):
            flat = [value for pair in items[start : start + ENQUEUE_CHUNK] for value in pair]
            reply = await self.scripts.call_json(
                "queue_enqueue",
                [self.keys.stream, self.keys.jobs, self.keys.delayed, self.keys.lock_meta],
                ["" if fence is None else str(fence), *flat],
                self.redis,
            )
            if reply.get("fenced"):
                return EnqueueResult(added, skipped, fenced=True)
            added += int(reply["added"])
            skipped += int(reply["skipped"])
        return EnqueueResult(added, skipped)

    async def read(self, count: int, block_s: float) -> list[Job | Malformed]:
        """Up to ``count`` new entries for this consumer, blocking up to ``block_s`` for the first."""
        try:
            reply = await self.blocking.xreadgroup(
                self.keys.group,
                self.consumer,
                {self.keys.stream: ">"},
                count=count,
                block=max(1, int(block_s * 1000)),
            )
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream was deleted under us (an operator, or eviction): recreate and read again next time.
            logger.warning("queue stream or group vanished; recreating it")
            await self.ensure_group()
            return []
        found: list[Job | Malformed] = []
        streams: Any = reply or []  # RESP2: [[stream, [(id, fields), ...]], ...]
        for _stream, entries in streams:
            for entry_id, fields in entries:
                found.append(parse_entry(entry_id, dict(fields or {})))
        return found

    async def cycle(
        self,
        outcomes: Sequence[tuple[str, str]],
        done: Sequence[Done],
        read: Sequence[Job],
        *,
        fetch: int = 0,
        cycle_id: str | None = None,
        forget: str | None = None,
    ) -> CycleResult:
        """Settle ``done``, record ``outcomes`` in order, and admit ``read``; one script call.

        With no ``read`` and ``fetch`` > 0 the script itself takes up to ``fetch`` new entries (without
        blocking) and admits those: when the stream has work, a batch costs this one command in all.

        Calls with the same ``cycle_id`` within ten minutes get the first call's reply and change nothing.
        ``forget`` names an earlier cycle whose reply is no longer needed, so the cache holds one per consumer.
        """
        cfg = {**self.breaker.lua(), "dlq_maxlen": DEAD_LETTER_MAXLEN}
        payload = {
            "cfg": cfg,
            "outcomes": [list(o) for o in outcomes],
            "done": [d.lua() for d in done],
            "read": [[j.entry_id, j.id, j.term, j.class_nbr, j.attempts, j.enqueued_ms] for j in read],
            "fetch": fetch,
        }
        reply = await self.scripts.call_json(
            "queue_cycle",
            [
                self.keys.stream,
                self.keys.jobs,
                self.keys.delayed,
                self.keys.delayed_payloads,
                self.keys.dead_letters,
                self.keys.breaker,
                self.keys.breaker_trials,
                self.keys.cycle_reply(cycle_id or secrets.token_hex(8)),
                *([self.keys.cycle_reply(forget)] if forget else []),
            ],
            [self.keys.group, orjson.dumps(payload).decode(), self.consumer],
            self.redis,
        )
        view = reply["breaker"]
        fetched, poisoned = reply.get("fetched"), reply.get("poisoned")
        return CycleResult(
            admitted=int(reply["admitted"]),
            trials=trial_list(reply["trials"]),
            retry_after_s=int(reply["retry_after_ms"]) / 1000,
            deferred=int(reply["deferred"]),
            fetched=[Job(str(e[0]), e[1], e[2], e[3], int(e[4]), int(e[5])) for e in fetched]
            if isinstance(fetched, list)
            else [],
            poisoned=[(str(p[0]), str(p[1])) for p in poisoned] if isinstance(poisoned, list) else [],
            breaker=BreakerState.from_lua(view),
            next_due_in_s=_due_in({"next_due_ms": reply["next_due_ms"], "now_ms": view["now_ms"]}),
            stats=QueueStats.from_lua(reply),
        )

    async def maintain(self, *, resume: bool = False) -> QueueStats:
        """Promote due delayed jobs and requeue stale entries; one script call.

        ``resume`` takes this consumer's own unacknowledged entries whatever their idle time (at start,
        after a crash); otherwise every consumer's entries idle past the visibility timeout.
        """
        reply = await self.scripts.call_json(
            "queue_maintain",
            [
                self.keys.stream,
                self.keys.jobs,
                self.keys.delayed,
                self.keys.delayed_payloads,
                self.keys.dead_letters,
            ],
            [
                self.keys.group,
                self.consumer if resume else "",
                0 if resume else int(self.visibility_timeout_s * 1000),
                self.max_attempts,
                MAINTENANCE_BATCH,
                DEAD_LETTER_MAXLEN,
            ],
            self.redis,
        )
        return QueueStats.from_lua(reply)

    async def stats(self) -> QueueStats:
        """Queue figures without changing anything (for status); one script call."""
        reply = await self.scripts.call_json(
            "queue_stats",
            [self.keys.stream, self.keys.delayed, self.keys.dead_letters],
            [self.keys.group],
            self.redis,
        )
        return QueueStats.from_lua(reply)

    # -- dead letters ----------------------------------------------------------------------------------

    async def dead_letters(self, count: int = 100) -> list[tuple[str, dict[str, str]]]:
        """The oldest dead letters; read as bytes, since a poison entry's fields may not be UTF-8."""
        entries: list[Any] = await self.blocking.xrange(self.keys.dead_letters, count=count) or []

        def text(value: bytes) -> str:
            return value.decode("utf-8", "backslashreplace")

        return [(text(eid), {text(k): text(v) for k, v in (fields or {}).items()}) for eid, fields in entries]

    async def requeue_dead(self, entry_ids: Sequence[str] = ()) -> dict[str, int]:
        """Put dead letters (all, or these ids) back on the queue with fresh attempts; one call."""
        reply = await self.scripts.call_json(
            "dlq_requeue",
            [self.keys.stream, self.keys.jobs, self.keys.delayed, self.keys.dead_letters],
            list(entry_ids),
            self.redis,
        )
        return {k: int(v) for k, v in reply.items()}

    async def purge_dead(self) -> int:
        """Drop every dead letter; returns how many there were."""
        count = int(await self.redis.xlen(self.keys.dead_letters))
        await self.redis.delete(self.keys.dead_letters)
        return count


# -- the runtime -----------------------------------------------------------------------------------------


def retry_delay_s(
    attempt: int, base_s: float, *, cap_s: float = 1800, rand: Callable[[], float] = random.random
) -> float:
    """Exponential backoff with jitter: base * 4^(attempt-1), +/-20 %, capped."""
    raw = min(cap_s, base_s * 4.0 ** max(0, attempt - 1))
    return float(raw * (0.8 + 0.4 * rand()))


@dataclass(frozen=True)
class _Unsent:
    """One queue_cycle call, kept whole so a retry sends exactly the same thing under the same id."""

    id: str
    outcomes: list[tuple[str, str]]
    done: list[Done]
    read: list[Job]
    fetch: int


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
        idle_maintenance_s: float = 900.0,
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
        # A finished job is acknowledged well before anyone could take it over as unacknowledged.
        self.max_unsettled_s = queue.visibility_timeout_s / 3
        self.clock = clock
        self.progress = progress
        self.state = ConsumerState()

        self._running = 0
        self._done: list[Done] = []
        self._outcomes: list[tuple[str, str]] = []
        self._cycle_lock = anyio.Lock()
        self._capacity = anyio.Event()  # set when a job finishes
        self._finished = anyio.Event()  # set when a job finishes, for the settler
        self._poke_maintainer = anyio.Event()
        self._maintain_at = 0.0  # clock time of the next maintenance
        self._paused_until = 0.0  # breaker said wait
        self._reader_waiting_on_stream = False
        self._active_since_maintenance = False
        self._settle_by = float("inf")  # clock time by which the buffered outcomes must be settled
        self._last_cycle_id: str | None = None
        self._unconfirmed: _Unsent | None = None  # a cycle given up on, that may or may not have run

    # -- lifecycle -------------------------------------------------------------------------------------

    async def run(self, stopping: anyio.Event) -> None:
        await self._with_redis_retry(self.queue.ensure_group, stopping)
        resumed = await self._with_redis_retry(lambda: self.queue.maintain(resume=True), stopping)
        if resumed is not None:
            self._observe_stats(resumed)
            if resumed.requeued or resumed.dead:
                logger.info(
                    "resumed %d unacknowledged jobs of consumer %s (%d dead-lettered)",
                    resumed.requeued,
                    self.queue.consumer,
                    resumed.dead,
                )
        try:
            async with anyio.create_task_group() as jobs:
                async with anyio.create_task_group() as loops:
                    loops.start_soon(self._reader, jobs, stopping)
                    loops.start_soon(self._settler)
                    loops.start_soon(self._maintainer)
                    await stopping.wait()
                    loops.cancel_scope.cancel()
                if self.progress is not None:
                    self.progress.done("reader")
                    self.progress.done("maintainer")
                if self._running:
                    logger.info("draining: waiting for %d running jobs", self._running)
        finally:
            with anyio.move_on_after(15, shield=True):
                # Twice at most: confirming a cycle whose reply was lost may hand jobs back, to settle as well.
                for _ in range(2):
                    if not (self._done or self._outcomes or self._unconfirmed):
                        break
                    if await self._cycle([], keep_trying=lambda: False) is None:
                        logger.warning(
                            "could not settle %d finished jobs before exit; they are redelivered after restart",
                            len(self._done),
                        )
                        break

    async def _with_redis_retry(self, call: Callable[[], Any], stopping: anyio.Event) -> Any:
        delay = 1.0
        while not stopping.is_set():
            try:
                result = await call()
            except REDIS_ERRORS as exc:
                self._redis_down(exc)
                with anyio.move_on_after(delay):
                    await stopping.wait()
                delay = min(30.0, delay * 2)
            else:
                self._redis_up()
                return result
        return None

    def _redis_down(self, exc: BaseException) -> None:
        if self.state.redis_ok:
            logger.warning("queue: Redis unavailable (%s); retrying with backoff", exc)
        self.state.redis_ok = False

    def _redis_up(self) -> None:
        if not self.state.redis_ok:
            logger.info("queue: Redis is back")
        self.state.redis_ok = True

    def _expect(self, loop: str, within_s: float) -> None:
        if self.progress is not None:
            self.progress.expect(loop, within_s)

    # -- reader ------------------------------------------------------------------------------------------

    async def _reader(self, jobs: TaskGroup, stopping: anyio.Event) -> None:
        """Feed the pool: one script call per batch while the stream has work, a blocking read when not.

        While busy (the last batch filled every free slot, or finished jobs wait to be settled), one
        queue_cycle call settles, takes up to the free slots' worth of entries and admits them. Only when
        the stream runs dry does the reader block on XREADGROUP (minutes at a time), and the entries that
        wake it are admitted with the next call: so an idle consumer costs one command per block period.
        """
        delay = 1.0
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
            free = self.concurrency - self._running
            if busy or self._done or self._outcomes:
                renew(30)
                fetch = 0 if stopping.is_set() else free
                result = await self._cycle([], fetch=fetch, keep_trying=keep_trying, on_retry=renew)
                if result is None:
                    continue
                self._log_poison(result)
                busy = fetch > 0 and len(result.fetched) + len(result.poisoned) >= fetch
                if result.fetched or result.poisoned:
                    self._active_since_maintenance = True
                    self._start(jobs, result.fetched, result, stopping)
                    continue
            self._reader_waiting_on_stream = True
            renew(self.idle_block_s)
            try:
                with anyio.fail_after(self.idle_block_s + 30):
                    entries = await self.queue.read(free, self.idle_block_s)
            except (*REDIS_ERRORS, TimeoutError) as exc:
                self._reader_waiting_on_stream = False
                self._redis_down(exc)
                renew(delay)
                await anyio.sleep(delay)
                delay = min(30.0, delay * 2)
                continue
            self._reader_waiting_on_stream = False
            self._redis_up()
            delay = 1.0
            if not entries:
                continue
            # A full read suggests more is waiting: take the next batch with the settle call.
            busy = len(entries) >= free
            self._active_since_maintenance = True
            good = [e for e in entries if isinstance(e, Job)]
            for bad in (e for e in entries if isinstance(e, Malformed)):
                logger.error("entry %s dead-lettered: %s", bad.entry_id, bad.reason)
                self._done.append(Done(bad, "poison", error=bad.reason))
                self.state.dead_lettered += 1
            result = await self._cycle(good, keep_trying=keep_trying, on_retry=renew)
            if result is not None:
                self._start(jobs, good, result, stopping)

    def _log_poison(self, result: CycleResult) -> None:
        for entry_id, reason in result.poisoned:
            logger.error("entry %s dead-lettered: %s", entry_id, reason)
        self.state.dead_lettered += len(result.poisoned)

    def _start(self, jobs: TaskGroup, batch: Sequence[Job], result: CycleResult, stopping: anyio.Event) -> None:
        """Start the admitted head of ``batch``; note a breaker deferral of the rest. No await: once Redis
        admitted these jobs they are started (or handed back) before anything can cancel us."""
        now = self.clock()
        for i, job in enumerate(batch[: result.admitted]):
            ticket = Ticket(job, trial=result.trials[i] if i < len(result.trials) else "", read_at=now)
            self._running += 1
            self.state.running = self._running
            if stopping.is_set():
                # Admitted as the stop came: hand it straight back, no attempt spent.
                self._settled(ticket, Done(job, "requeue", attempts=job.attempts))
            else:
                jobs.start_soon(self._run, ticket)
        if result.admitted < len(batch):
            self.state.deferred += result.deferred
            self._paused_until = self.clock() + max(0.1, result.retry_after_s)
            logger.info(
                "breaker %s: %d jobs deferred for %.0fs without spending an attempt",
                result.breaker.state,
                result.deferred,
                result.retry_after_s,
            )

    async def _wait_for_capacity(self) -> None:
        # Read when about half the slots are free (or all of them are): fewer, larger batches.
        while True:
            free = self.concurrency - self._running
            if free >= self.refill_at or self._running == 0:
                return
            self._capacity = anyio.Event()
            await self._capacity.wait()

    # -- settling ------------------------------------------------------------------------------------------

    async def _cycle(
        self,
        read: Sequence[Job],
        *,
        fetch: int = 0,
        keep_trying: Callable[[], bool],
        on_retry: Callable[[float], None] | None = None,
    ) -> CycleResult | None:
        """Settle everything buffered and admit ``read`` (or up to ``fetch`` entries the script takes):
        one queue_cycle call, retried while ``keep_trying()``. None when it gave up.

        The call itself is shielded, and it is retried under its cycle id, which the script answers from a
        reply cache if an earlier try did run (its answer lost): so neither a cancellation nor a lost reply
        drops an outcome or applies one twice. A cycle given up on stays "unconfirmed" and is sent again,
        under its id, before anything else; jobs it turns out to have admitted (never started) are handed
        back then, without spending an attempt.
        """
        async with self._cycle_lock:
            if self._unconfirmed is not None:
                earlier = self._unconfirmed
                result = await self._send(earlier, keep_trying, on_retry)
                if result is None:
                    return None
                self._unconfirmed = None
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
            delay = 0.5
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
                    self._redis_down(exc)
                    if not keep_trying():
                        return None
                    if on_retry is not None:
                        on_retry(delay)
                    await anyio.sleep(delay)
                    delay = min(10.0, delay * 2)
                    continue
                confirmed = True
                self._last_cycle_id = cycle.id
                self._redis_up()
                self._observe_cycle(result)
                return result
        finally:
            if not confirmed:
                self._unconfirmed = cycle
                self._settle_by = self.clock()

    def _hand_back(self, cycle: _Unsent, result: CycleResult) -> None:
        """Jobs a confirmed-late cycle admitted were never started: requeue them, free their trial slots."""
        admitted = (cycle.read or result.fetched)[: result.admitted]
        for i, job in enumerate(admitted):
            self._done.append(Done(job, "requeue", attempts=job.attempts))
            trial = result.trials[i] if i < len(result.trials) else ""
            if trial:
                self._outcomes.append(("n", trial))
        self._log_poison(result)
        if admitted:
            logger.info("%d jobs admitted by a cycle whose reply was lost go back to the queue", len(admitted))

    async def _settler(self) -> None:
        """Settle finished jobs the reader will not settle soon.

        The reader settles everything with its next cycle, which comes once enough slots are free. Outcomes
        would sit unsent when it waits on the stream (or the breaker) instead, or when the jobs still
        running are slow: then the settler sends them, at the latest a third of the visibility timeout after
        their delivery, long before another consumer could take them over as unacknowledged.
        """
        while True:
            if not (self._done or self._outcomes or self._unconfirmed):
                self._finished = anyio.Event()
                await self._finished.wait()
                continue
            await anyio.sleep(self.settle_linger_s)
            due = self._reader_waiting_on_stream or self.clock() >= self._settle_by
            if due and (self._done or self._outcomes or self._unconfirmed):
                await self._cycle([], keep_trying=lambda: True)  # the reader's calls settle these too

    def _observe_cycle(self, result: CycleResult) -> None:
        self.state.breaker = result.breaker
        self.state.breaker_at = self.clock()
        self._observe_stats(result.stats)
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
        self._done.append(done)
        self._settle_by = min(self._settle_by, ticket.read_at + self.max_unsettled_s)
        if ticket.trial or ticket.breaker != "n":
            self._outcomes.append((ticket.breaker, ticket.trial))
        self._running -= 1
        self.state.running = self._running
        self._capacity.set()
        self._finished.set()

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
        delay = 1.0
        self._maintain_at = self.clock() + self.busy_maintenance_s
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
                self._maintain_at = self.clock() + delay
                delay = min(30.0, delay * 2)
                continue
            delay = 1.0
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
