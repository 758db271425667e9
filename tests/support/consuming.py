"""The in-process consumer harness of the queue tests: a recording handler, consumers run in a task group,
and what a drained queue looks like in Redis."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import anyio

from daemon.checks.consumer import Consumer, Handler

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    import redis.asyncio as aioredis

    from daemon.checks.pipeline import Ticket
    from daemon.keys import Keys
    from daemon.primitives.queue import Queue


def make_consumer(queue: Queue, handler: Handler, **overrides: Any) -> Consumer:
    options: dict[str, Any] = {
        "concurrency": 4,
        "retry_base_s": 0.05,
        "idle_block_s": 1.0,
        "idle_maintenance_s": 1.0,
        "settle_linger_s": 0.05,
    }
    options.update(overrides)
    return Consumer(queue, handler, **options)


@contextlib.asynccontextmanager
async def consuming(*consumers: Consumer, stop_within_s: float = 15) -> AsyncIterator[anyio.Event]:
    """Run the consumers until the block ends; then set ``stopping`` and wait for them to return."""
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:
        for consumer in consumers:
            tg.start_soon(consumer.run, stopping)
        try:
            yield stopping
        finally:
            stopping.set()
            tg.cancel_scope.deadline = anyio.current_time() + stop_within_s


class Recorder:
    """A handler that records (job id, attempt) and then does what ``behave`` says for that delivery."""

    def __init__(self, behave: Callable[[Ticket], Awaitable[None]] | None = None) -> None:
        self.started: list[tuple[str, int]] = []
        self.done: list[tuple[str, int]] = []
        self.finished: list[tuple[str, int]] = []  # returned or raised
        self.tickets: list[Ticket] = []
        self.behave = behave

    async def __call__(self, ticket: Ticket) -> None:
        self.started.append((ticket.job.id, ticket.job.attempt))
        self.tickets.append(ticket)
        try:
            if self.behave is not None:
                await self.behave(ticket)
            ticket.success()
            self.done.append((ticket.job.id, ticket.job.attempt))
        finally:
            self.finished.append((ticket.job.id, ticket.job.attempt))


async def pending_count(r: aioredis.Redis, keys: Keys) -> int:
    summary: Any = await r.xpending(keys.stream, keys.group)
    return int(summary["pending"])


async def drained(r: aioredis.Redis, keys: Keys) -> bool:
    """Nothing left anywhere: stream, pending list, delayed set."""
    return await r.xlen(keys.stream) == 0 and await pending_count(r, keys) == 0 and await r.zcard(keys.delayed) == 0
