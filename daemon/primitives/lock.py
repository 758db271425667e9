"""The cron lock: one holder at a time across every daemon sharing the Redis, with fencing tokens.

It replaces the ``CronLockDO`` Durable Object. Acquire is ``SET NX PX`` plus a metadata hash under the same
TTL and a fencing token from ``INCR`` (tokens only grow, so work done under a lock that has since expired
and been granted again can be refused: the queue's enqueue checks it). A lock held past its TTL is free.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from daemon.errors import LockBusy, SlotDone

if TYPE_CHECKING:
    from daemon.keys import Keys
    from daemon.primitives.clients import CountingRedis
    from daemon.primitives.scripts import Scripts

logger = logging.getLogger(__name__)

# A slot marker outlives any misfire grace by far; it only has to stop a slot from running twice.
SLOT_MARKER_TTL_MS = 2 * 86400 * 1000


@dataclass(frozen=True)
class Grant:
    """A held lock: the owner token (the secret that proves ownership) and its fencing token."""

    owner: str
    fence: int
    acquired_at_ms: int
    expires_at_ms: int


@dataclass(frozen=True)
class LockStatus:
    """The cron lock as ``status`` reads it."""

    locked: bool
    holder: str | None
    acquired_at_ms: int | None
    time_held_ms: int | None
    expires_at_ms: int | None
    fence: int
    last_tick: str

    def as_dict(self) -> dict[str, Any]:
        """Its fields, times as epoch milliseconds (``runtime.report.lock_view`` shows them)."""
        return {
            "locked": self.locked,
            "lock_holder": self.holder,
            "lock_acquired_at": self.acquired_at_ms,
            "time_held_ms": self.time_held_ms,
            "expires_at": self.expires_at_ms,
            "fence": self.fence,
        }


class CronLock:
    """The cron lock with fencing: at most one tick at a time across daemons, and each cron slot once."""

    def __init__(self, redis: CountingRedis, keys: Keys, scripts: Scripts, *, ttl_s: float, holder: str) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = scripts
        self.ttl_ms = int(ttl_s * 1000)
        self.holder = holder

    def new_owner(self) -> str:
        """A fresh owner token: the holder's name and a random part only this caller knows."""
        return f"{self.holder}:{secrets.token_hex(8)}"

    async def acquire(self, *, slot: str | None = None, owner: str | None = None) -> Grant:
        """Take the lock or raise ``LockBusy`` (or ``SlotDone`` when ``slot`` already ran). One call.

        Retrying with the same ``owner`` after a lost reply gets the lock that first call took.
        """
        owner = owner or self.new_owner()
        keys = [self.keys.lock, self.keys.lock_meta, self.keys.lock_fence]
        args: list[Any] = [owner, self.ttl_ms, self.holder]
        if slot is not None:
            keys.append(self.keys.slot(slot))
            args.append(SLOT_MARKER_TTL_MS)
        reply = await self.scripts.call_json("lock_acquire", keys, args, self.redis)
        if reply.get("slot_done"):
            raise SlotDone(slot)
        if not reply["acquired"]:
            raise LockBusy(reply["holder"], int(reply["acquired_at_ms"]), int(reply["expires_at_ms"]))
        return Grant(owner, int(reply["fence"]), int(reply["acquired_at_ms"]), int(reply["expires_at_ms"]))

    async def release(self, grant: Grant, *, slot: str | None = None, slot_outcome: str = "", tick: str = "") -> bool:
        """Owner-checked release; closes ``slot`` as ``done`` or ``abort``. False if the lock was lost."""
        keys = [self.keys.lock, self.keys.lock_meta]
        args: list[Any] = [grant.owner]
        if slot is not None:
            keys += [self.keys.slot(slot), self.keys.ticks]
            args += [slot_outcome, SLOT_MARKER_TTL_MS, tick]
        released = bool(await self.scripts.call("lock_release", keys, args, self.redis))
        if not released:
            logger.warning("cron lock had expired or changed hands before release (fence %d)", grant.fence)
        return released

    async def status(self) -> LockStatus:
        """The lock now, and the last tick's summary; one script call."""
        reply = await self.scripts.call_json(
            "lock_status",
            [self.keys.lock, self.keys.lock_meta, self.keys.lock_fence, self.keys.ticks],
            [],
            self.redis,
        )
        return LockStatus(
            locked=bool(reply["locked"]),
            holder=reply.get("holder"),
            acquired_at_ms=reply.get("acquired_at_ms"),
            time_held_ms=reply.get("time_held_ms"),
            expires_at_ms=reply.get("expires_at_ms"),
            fence=int(reply.get("fence", 0)),
            last_tick=reply.get("last_tick", ""),
        )

    async def force_release(self) -> bool:
        """Operator override: free the lock whoever holds it. True if it was held."""
        return bool(await self.redis.delete(self.keys.lock, self.keys.lock_meta))
