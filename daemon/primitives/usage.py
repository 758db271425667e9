"""The Redis command ledger: this process's counts flushed to a per-day hash, read back for ``status``.

The counting itself is in ``primitives.clients``; the counts are flushed to a per-day hash in Redis (one
script call at most every flush interval) so ``seatwatch status`` can show them for every daemon.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Callable

    from daemon.keys import Keys
    from daemon.primitives.clients import RedisClients
    from daemon.primitives.scripts import Scripts

logger = logging.getLogger(__name__)

USAGE_TTL_S: Final = 40 * 86400


def utc_day(now: float) -> str:
    """``YYYY-MM-DD`` in UTC: the day a usage hash counts."""
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


class UsageLedger:
    """Flushes this process's counts into ``{prefix}:usage:{day}`` and reads them back for status."""

    def __init__(self, clients: RedisClients, keys: Keys, scripts: Scripts, now: Callable[[], float]) -> None:
        self.clients = clients
        self.keys = keys
        self.scripts = scripts
        self.now = now
        self.redis = clients.client("usage")

    async def flush(self) -> bool:
        """Add the unflushed counts (the flush itself included) to today's hash; one script call."""
        if not self.clients.usage.unflushed:
            return False
        self.clients.usage.add("usage")  # the call below, counted before it happens so it is included
        counts = self.clients.usage.take_unflushed()
        args: list[str | int] = [USAGE_TTL_S]
        for purpose, n in sorted(counts.items()):
            args.extend((purpose, n))
        try:
            await self.scripts.call("usage_flush", [self.keys.usage(utc_day(self.now()))], args, self.redis)
        except Exception:
            self.clients.usage.give_back(counts)
            raise
        return True

    async def today(self) -> dict[str, int]:
        """Today's flushed counts by purpose, every daemon's."""
        raw: dict[Any, Any] = await self.clients.client("admin").hgetall(self.keys.usage(utc_day(self.now())))
        return {str(k): int(v) for k, v in raw.items()}


def projection(today: dict[str, int], now: float, budget_per_day: int) -> dict[str, Any]:
    """Today's count by purpose, extrapolated to a 30-day month, against the daily budget."""
    total = sum(today.values())
    midnight = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    elapsed_s = max(60.0, now - midnight.timestamp())
    per_day = total * 86400 / elapsed_s
    return {
        "today": total,
        "by_purpose": dict(sorted(today.items())),
        "projected_day": round(per_day),
        "projected_month": round(per_day * 30),
        "budget_per_day": budget_per_day,
        "budget_month": budget_per_day * 30,
    }
