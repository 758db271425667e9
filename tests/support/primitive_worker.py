"""A separate OS process driving the cron lock or the breaker, for the multi-process tests.

Run as ``python -m tests.support.primitive_worker URL PREFIX COMMAND ...``; every result is one JSON line on
stdout, flushed at once, so the test can read replies while the process is still running.

Commands:
- ``lock-acquire --tasks N --holder NAME --ttl-s T``: print ``{"ready": true}``, wait for a line on stdin
  (the start gun shared with the test's own tasks), then N concurrent acquire attempts, one line each.
- ``lock-cycle --count N --holder NAME --ttl-s T``: N grants one after another (acquire, retry while busy,
  release), one line per grant with its fencing token.
- ``breaker-record --config JSON OUTCOMES...``: record the outcomes (``s``, ``f``, ``n``) in one batch.
- ``breaker-allow --config JSON N``: ask to make N calls; print the admission.
- ``breaker-hold --config JSON``: take one trial, print it, then sleep until killed (a probe that dies).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING, Any, cast

import orjson

from daemon.errors import LockBusy
from daemon.keys import Keys
from daemon.primitives.breaker import BreakerConfig, BreakerState, CircuitBreaker, OutcomeKind
from daemon.primitives.clients import RedisClients
from daemon.primitives.lock import CronLock
from daemon.primitives.scripts import Scripts

if TYPE_CHECKING:
    from collections.abc import Sequence


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(record).decode() + "\n")
    sys.stdout.flush()


def breaker_dict(state: BreakerState) -> dict[str, Any]:
    return {
        "state": state.state,
        "failures": state.failures,
        "successes": state.successes,
        "in_flight": state.in_flight,
    }


async def lock_acquire(clients: RedisClients, keys: Keys, scripts: Scripts, args: argparse.Namespace) -> None:
    locks = [
        CronLock(clients.client("lock"), keys, scripts, ttl_s=args.ttl_s, holder=f"{args.holder}-{i}")
        for i in range(args.tasks)
    ]
    await clients.client("lock").ping()  # connect before the start gun so the race is not skewed
    emit({"ready": True})
    await asyncio.to_thread(sys.stdin.readline)

    async def attempt(lock: CronLock) -> dict[str, Any]:
        try:
            grant = await lock.acquire()
        except LockBusy as busy:
            return {"holder": lock.holder, "acquired": False, "busy_holder": busy.holder}
        return {"holder": lock.holder, "acquired": True, "fence": grant.fence}

    for result in await asyncio.gather(*(attempt(lock) for lock in locks)):
        emit(result)


async def lock_cycle(clients: RedisClients, keys: Keys, scripts: Scripts, args: argparse.Namespace) -> None:
    lock = CronLock(clients.client("lock"), keys, scripts, ttl_s=args.ttl_s, holder=args.holder)
    for _ in range(args.count):
        while True:
            try:
                grant = await lock.acquire()
            except LockBusy:
                await asyncio.sleep(0.001)
                continue
            break
        released = await lock.release(grant)
        emit({"holder": args.holder, "fence": grant.fence, "released": released})


async def breaker_command(clients: RedisClients, keys: Keys, scripts: Scripts, args: argparse.Namespace) -> None:
    config = BreakerConfig(**orjson.loads(args.config))
    breaker = CircuitBreaker(clients.client("breaker"), keys, scripts, config)
    if args.command == "breaker-record":
        outcomes: Sequence[tuple[OutcomeKind, str]] = [(cast("OutcomeKind", kind), "") for kind in args.outcomes]
        emit(breaker_dict(await breaker.record(outcomes)))
        return
    admission = await breaker.allow(args.n if args.command == "breaker-allow" else 1)
    emit(
        {
            "admitted": admission.admitted,
            "trials": admission.trials,
            "retry_after_s": admission.retry_after_s,
            **breaker_dict(admission.breaker),
        }
    )
    if args.command == "breaker-hold":
        await asyncio.Event().wait()  # the trial stays in flight until this process is killed


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="primitive_worker")
    parser.add_argument("redis_url")
    parser.add_argument("prefix")
    commands = parser.add_subparsers(dest="command", required=True)
    acquire = commands.add_parser("lock-acquire")
    acquire.add_argument("--tasks", type=int, required=True)
    acquire.add_argument("--holder", required=True)
    acquire.add_argument("--ttl-s", type=float, required=True)
    cycle = commands.add_parser("lock-cycle")
    cycle.add_argument("--count", type=int, required=True)
    cycle.add_argument("--holder", required=True)
    cycle.add_argument("--ttl-s", type=float, required=True)
    record = commands.add_parser("breaker-record")
    record.add_argument("--config", required=True)
    record.add_argument("outcomes", nargs="+", choices=["s", "f", "n"])
    allow = commands.add_parser("breaker-allow")
    allow.add_argument("--config", required=True)
    allow.add_argument("n", type=int)
    hold = commands.add_parser("breaker-hold")
    hold.add_argument("--config", required=True)
    return parser.parse_args(argv)


async def main(argv: Sequence[str]) -> None:
    args = parse(argv)
    clients = RedisClients(args.redis_url)
    try:
        scripts = Scripts(clients.client("startup"))
        await scripts.load(clients.client("startup"))
        keys = Keys(args.prefix)
        if args.command == "lock-acquire":
            await lock_acquire(clients, keys, scripts, args)
        elif args.command == "lock-cycle":
            await lock_cycle(clients, keys, scripts, args)
        else:
            await breaker_command(clients, keys, scripts, args)
    finally:
        await clients.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
