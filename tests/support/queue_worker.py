"""A queue consumer in its own process, for tests that kill, restart and signal real processes.

Run as ``python -m tests.support.queue_worker --redis URL --prefix P --consumer NAME [--concurrency N]
[--sleep-s S] [--visibility-s V] [--max-attempts A] [--idle-block-s B]``. Its handler sleeps ``--sleep-s``
and records every job it starts and completes, under the prefix:

* ``{prefix}:test:started`` and ``{prefix}:test:done``: lists of ``"{job id}|{attempt}|{consumer}"``;
* ``{prefix}:test:ready``: a list the worker pushes its consumer name to once it has resumed its own
  unacknowledged jobs and is about to read the stream.

SIGTERM (or SIGINT) sets ``stopping``: running jobs finish and are settled, then the process exits 0; a
second signal cancels the running jobs, which go back to the stream.
"""

from __future__ import annotations

import argparse
import logging
import signal
from typing import TYPE_CHECKING, Any

import anyio
import redis.asyncio as aioredis

from daemon.checks.consumer import Consumer
from daemon.keys import Keys
from daemon.primitives.breaker import BreakerConfig
from daemon.primitives.clients import RedisClients
from daemon.primitives.queue import Queue
from daemon.primitives.scripts import Scripts

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from daemon.checks.pipeline import Ticket


def record(ticket: Ticket, consumer: str) -> str:
    """How a delivery is written to the test lists."""
    return f"{ticket.job.id}|{ticket.job.attempt}|{consumer}"


def parse_record(raw: str) -> tuple[str, int, str]:
    """(job id, attempt, consumer) of one record."""
    job_id, attempt, consumer = raw.split("|")
    return job_id, int(attempt), consumer


def started_key(prefix: str) -> str:
    return f"{prefix}:test:started"


def done_key(prefix: str) -> str:
    return f"{prefix}:test:done"


def ready_key(prefix: str) -> str:
    return f"{prefix}:test:ready"


def draining_key(prefix: str) -> str:
    """Where a worker records that its first signal arrived (it drains from then on)."""
    return f"{prefix}:test:draining"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.support.queue_worker")
    parser.add_argument("--redis", required=True, help="Redis URL")
    parser.add_argument("--prefix", required=True, help="key prefix shared with the test")
    parser.add_argument("--consumer", required=True, help="consumer name in the group")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--sleep-s", type=float, default=0.0, help="how long each job takes")
    parser.add_argument("--visibility-s", type=float, default=3.0)
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--retry-base-s", type=float, default=0.05)
    parser.add_argument("--idle-block-s", type=float, default=1.0)
    parser.add_argument("--idle-maintenance-s", type=float, default=1.0)
    return parser.parse_args(argv)


async def watch_signals(stopping: anyio.Event, work: anyio.CancelScope, draining: Callable[[], Awaitable[Any]]) -> None:
    """First signal drains (and says so through ``draining``); a second one cancels the running jobs."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _signum in signals:
            if stopping.is_set():
                work.cancel()
                continue
            stopping.set()
            await draining()


async def main(args: argparse.Namespace) -> None:
    keys = Keys(args.prefix)
    clients = RedisClients(args.redis)
    recorder = aioredis.Redis.from_url(args.redis, decode_responses=True)
    try:
        scripts = Scripts(clients.client("startup"))
        await scripts.load(clients.client("startup"))
        queue = Queue(
            clients.client("queue"),
            clients.client("queue", blocking=True),
            keys,
            scripts,
            consumer=args.consumer,
            visibility_timeout_s=args.visibility_s,
            max_attempts=args.max_attempts,
            breaker=BreakerConfig(trial_ttl_s=args.visibility_s),
        )

        async def handler(ticket: Ticket) -> None:
            line = record(ticket, args.consumer)
            await recorder.rpush(started_key(args.prefix), line)
            if args.sleep_s > 0:
                await anyio.sleep(args.sleep_s)
            await recorder.rpush(done_key(args.prefix), line)

        consumer = Consumer(
            queue,
            handler,
            concurrency=args.concurrency,
            retry_base_s=args.retry_base_s,
            idle_block_s=args.idle_block_s,
            idle_maintenance_s=args.idle_maintenance_s,
            settle_linger_s=0.05,
        )
        stopping = anyio.Event()

        async def announce_ready() -> None:
            # The consumer records what it saw after resuming its own jobs; the reader starts right after.
            while consumer.state.stats is None and not stopping.is_set():
                await anyio.sleep(0.02)
            await recorder.rpush(ready_key(args.prefix), args.consumer)

        async with anyio.create_task_group() as outer:
            with anyio.CancelScope() as work:
                outer.start_soon(
                    watch_signals, stopping, work, lambda: recorder.rpush(draining_key(args.prefix), args.consumer)
                )
                outer.start_soon(announce_ready)
                await consumer.run(stopping)
            outer.cancel_scope.cancel()
    finally:
        await recorder.aclose()
        await clients.aclose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    anyio.run(main, parse_args())
