"""``seatwatch check`` runs every Lua script once, on throwaway keys under the prefix, then removes them.

Loading a script proves only that Redis compiles it. A managed Redis may still refuse what a script does when
it runs (``TIME`` before a write, ``cjson``, a stream command inside a script): that should fail ``check``,
not the running daemon. Each script is called through the same Python wrapper the daemon uses, with the keys
of a fresh prefix ``{prefix}:check-{random}``, so nothing the daemon owns is read or written. About a hundred
billed commands in all.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

import orjson

from daemon.adaptive.figures import AdaptiveKeys
from daemon.jobs import Done
from daemon.keys import Keys
from daemon.primitives.breaker import BreakerConfig, CircuitBreaker
from daemon.primitives.lock import CronLock
from daemon.primitives.queue import Queue
from daemon.primitives.scripts import Scripts

if TYPE_CHECKING:
    from collections.abc import Sequence

    from daemon.primitives.clients import CountingRedis
    from daemon.settings.config import Settings


class _Recording(Scripts):
    """``Scripts`` that notes each script as it is tried (so a refusal names the last one noted)."""

    def __init__(self, client: CountingRedis, ran: list[str]) -> None:
        super().__init__(client)
        self.ran = ran

    async def call(self, name: str, keys: Sequence[str], args: Sequence[Any], client: CountingRedis) -> Any:
        """Note script ``name``, then run it."""
        self.ran.append(name)
        return await super().call(name, keys, args, client)


async def exercise_scripts(settings: Settings, client: CountingRedis, ran: list[str]) -> None:
    """Run every script once on throwaway keys (removed afterwards), appending each name to ``ran`` as it is tried.

    A script Redis refuses raises the driver's ``ResponseError``: the last one in ``ran``.
    """
    keys = Keys(f"{settings.redis_prefix}:check-{secrets.token_hex(6)}")
    scripts = _Recording(client, ran)
    try:
        await _run_each(settings, client, keys, scripts)
    finally:
        await _remove(client, keys)


async def _run_each(settings: Settings, client: CountingRedis, keys: Keys, scripts: Scripts) -> None:
    config = BreakerConfig.from_settings(settings)
    lock = CronLock(client, keys, scripts, ttl_s=10, holder="seatwatch-check")
    grant = await lock.acquire(slot="check")
    await lock.status()
    await lock.release(grant, slot="check", slot_outcome="abort")

    breaker = CircuitBreaker(client, keys, scripts, config)
    admission = await breaker.allow(1)
    await breaker.record([("s", admission.trial(0))])
    await breaker.status()

    queue = Queue(
        client,
        client,
        keys,
        scripts,
        consumer="seatwatch-check",
        visibility_timeout_s=settings.visibility_timeout_s,
        max_attempts=settings.max_attempts,
        breaker=config,
    )
    await queue.ensure_group()
    await queue.enqueue([("0000", "00000")])
    taken = await queue.cycle([], [], [], fetch=1)
    await queue.cycle([], [Done(job, "dead", error="seatwatch check") for job in taken.fetched], [])
    await queue.maintain()
    await queue.stats()
    await queue.requeue_dead([])

    a = AdaptiveKeys(keys)
    await scripts.call("adaptive_sync", a.old_layout, [], client)
    take = {
        "cfg": config.lua(),
        "outcomes": [["s", ""]],
        "dues": [int(time.time() * 1000)],
        "horizon_ms": 1_000,
        "spacing_ms": 1_000,
    }
    take_keys = [a.pace, a.breaker, a.breaker_trials]
    await scripts.call_json("adaptive_take", take_keys, [orjson.dumps(take).decode()], client)


async def _remove(client: CountingRedis, keys: Keys) -> None:
    found = [key async for key in client.scan_iter(match=f"{keys.prefix}:*", count=1000)]
    for start in range(0, len(found), 500):
        await client.delete(*found[start : start + 500])
