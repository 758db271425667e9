"""The section queue on a Redis Stream, as a Redis primitive: each method is one command (mostly one script).

At-least-once, deduplicated, reclaimed, retried, dead-lettered. Every command Redis runs is billed, those a
script runs included (SPEC §5), so nothing costs a command per section: one stream entry carries a batch of
up to ``batch_size`` sections, retries wait in the delayed set as one member per settled batch, and the
dedup of waiting sections reads the stream and the delayed set whole (one command each) instead of keeping
an index. Enqueue skips a section while it waits, runs or waits for a retry; ``cycle`` settles finished
entries, records their breaker outcomes and admits new entries in one atomic script call; ``maintain``
promotes due retries and requeues entries nobody acknowledged within the visibility timeout (a consumer
working through a long batch keeps its entries with ``heartbeat``). The runtime that drives it is
``daemon.checks.consumer``; what a job is: ``daemon.jobs``; how it travels to Lua: ``queue_wire``.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson
import redis.exceptions

from daemon.jobs import Done, Job, Malformed
from daemon.primitives.breaker import BreakerConfig, BreakerState, trial_list
from daemon.primitives.queue_wire import EntryWire, done_wire, job_from_wire, job_wire, parse_stream_entry

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from daemon.keys import Keys
    from daemon.primitives.clients import CountingRedis
    from daemon.primitives.scripts import Scripts

logger = logging.getLogger(__name__)

ENQUEUE_CHUNK: Final = 2000  # sections per enqueue script call (keeps each call's request small)
# Sections per stream entry. A batch costs about ten commands to read, admit and settle, whatever its size,
# so 200 brings a check under 0.1 commands; a consumer keeps a batch it is still working on with a
# heartbeat, so a long one outlives the visibility timeout.
BATCH_SIZE: Final = 200
DEAD_LETTER_MAXLEN: Final = 10_000
MAINTENANCE_BATCH: Final = 500


@dataclass(frozen=True)
class EnqueueResult:
    """What one enqueue added, skipped as already queued, and whether the lock's fence stopped it."""

    added: int
    skipped: int
    fenced: bool = False
    entries: int = 0


@dataclass(frozen=True)
class QueueStats:
    """The queue's figures from a script reply; the counts of a maintenance call too."""

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
        """The four counts health and status show."""
        return {
            "waiting": self.waiting,
            "pending": self.pending,
            "delayed": self.delayed,
            "dead_letters": self.dead_letters,
        }


@dataclass(frozen=True)
class CycleResult:
    """One ``queue_cycle`` reply: what was admitted and the breaker's state (no queue figures: each costs)."""

    admitted: int
    trials: list[str]
    retry_after_s: float
    fetched: list[Job]  # sections the script read itself (``fetch``); the first ``admitted`` may run
    bad: list[Malformed]  # sections of fetched batches that are not jobs: the caller settles them as poison
    poisoned: list[tuple[str, str]]  # (entry id, reason) of fetched entries that were not jobs: now dead letters
    breaker: BreakerState
    next_due_in_s: float | None  # until the earliest retry this call delayed is due, from Redis time


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
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self.redis = redis
        self.blocking = blocking
        self.keys = keys
        self.scripts = scripts
        self.consumer = consumer
        self.visibility_timeout_s = visibility_timeout_s
        self.max_attempts = max_attempts
        self.breaker = breaker or BreakerConfig(trial_ttl_s=visibility_timeout_s)
        self.batch_size = batch_size

    async def ensure_group(self) -> None:
        """Create the stream and its consumer group if missing (one command)."""
        try:
            await self.redis.xgroup_create(self.keys.stream, self.keys.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def enqueue(self, sections: Iterable[tuple[str, str]], *, fence: int | None = None) -> EnqueueResult:
        """Add (term, class_nbr) jobs unless already waiting, running or delayed, ``batch_size`` to an entry;
        one call per 2,000 sections.

        With ``fence``, nothing is added once the cron lock has been granted to someone else since.
        """
        added = skipped = entries = 0
        flat: list[str] = []
        items = list(sections)
        for start in range(0, len(items), ENQUEUE_CHUNK):
            flat = [value for pair in items[start : start + ENQUEUE_CHUNK] for value in pair]
            reply = await self.scripts.call_json(
                "queue_enqueue",
                [self.keys.stream, self.keys.delayed, self.keys.lock_meta],
                ["" if fence is None else str(fence), self.batch_size, *flat],
                self.redis,
            )
            if reply.get("fenced"):
                return EnqueueResult(added, skipped, fenced=True, entries=entries)
            added += int(reply["added"])
            skipped += int(reply["skipped"])
            entries += int(reply["entries"])
        return EnqueueResult(added, skipped, entries=entries)

    async def read(self, count: int, block_s: float) -> list[Job | Malformed]:
        """The sections of up to ``count`` new entries for this consumer, blocking up to ``block_s`` for the first."""
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
                found.extend(parse_stream_entry(entry_id, dict(fields or {})))
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
        """Settle the entries of ``done``, record ``outcomes`` in order, and admit ``read``; one script call.

        ``done`` must hold every section of each entry it names (the consumer sends an entry once all its
        sections are done): the entry is acknowledged and deleted, its retries delayed as one member.
        With no ``read`` and ``fetch`` > 0 the script itself takes up to ``fetch`` new entries (without
        blocking) and admits their sections: when the stream has work, a batch costs this one call in all.

        Calls with the same ``cycle_id`` within ten minutes get the first call's reply and change nothing.
        ``forget`` names an earlier cycle whose reply is no longer needed, so the cache holds one per consumer.
        """
        cfg = {**self.breaker.lua(), "dlq_maxlen": DEAD_LETTER_MAXLEN}
        settle: dict[str, EntryWire] = {}
        for d in done:
            eid = d.job.entry_id
            settle.setdefault(eid, {"entry_id": eid, "jobs": []})["jobs"].append(done_wire(d))
        payload = {
            "cfg": cfg,
            "outcomes": [list(o) for o in outcomes],
            "settle": list(settle.values()),
            "read": [job_wire(j) for j in read],
            "fetch": fetch,
        }
        reply = await self.scripts.call_json(
            "queue_cycle",
            [
                self.keys.stream,
                self.keys.delayed,
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
        fetched, bad, poisoned = reply.get("fetched"), reply.get("bad"), reply.get("poisoned")
        return CycleResult(
            admitted=int(reply["admitted"]),
            trials=trial_list(reply["trials"]),
            retry_after_s=int(reply["retry_after_ms"]) / 1000,
            # cjson encodes an empty table as an object: only a list holds entries.
            fetched=[job_from_wire(e) for e in fetched] if isinstance(fetched, list) else [],
            bad=[Malformed(str(b["entry_id"]), {"section": str(b["raw"])}, str(b["reason"])) for b in bad]
            if isinstance(bad, list)
            else [],
            poisoned=[(str(p["entry_id"]), str(p["reason"])) for p in poisoned] if isinstance(poisoned, list) else [],
            breaker=BreakerState.from_lua(view),
            next_due_in_s=_due_in({"next_due_ms": reply["next_due_ms"], "now_ms": view["now_ms"]}),
        )

    async def heartbeat(self, entry_ids: Sequence[str]) -> None:
        """Keep entries this consumer is still working on from being taken over: one XCLAIM resets their
        idle time (JUSTID: no delivery counted, nothing read)."""
        if entry_ids:
            await self.redis.xclaim(self.keys.stream, self.keys.group, self.consumer, 0, list(entry_ids), justid=True)

    async def maintain(self, *, resume: bool = False) -> QueueStats:
        """Promote due delayed jobs and requeue stale entries; one script call.

        ``resume`` takes this consumer's own unacknowledged entries whatever their idle time (at start,
        after a crash); otherwise every consumer's entries idle past the visibility timeout.
        """
        reply = await self.scripts.call_json(
            "queue_maintain",
            [self.keys.stream, self.keys.delayed, self.keys.delayed_payloads, self.keys.dead_letters],
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
        """Queue figures, in sections, without changing anything (for status); one script call."""
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
            [self.keys.stream, self.keys.delayed, self.keys.dead_letters],
            [self.batch_size, *entry_ids],
            self.redis,
        )
        return {k: int(v) for k, v in reply.items()}

    async def purge_dead(self) -> int:
        """Drop every dead letter; returns how many there were."""
        count = int(await self.redis.xlen(self.keys.dead_letters))
        await self.redis.delete(self.keys.dead_letters)
        return count
