"""The Redis command ledger: this process's counts flushed to a per-day hash, read back for ``status``.

The counting itself is in ``primitives.clients``. Each process writes its own running totals for the day
into ``{prefix}:usage:{day}`` under fields ``{purpose}|{instance}`` with one HSET (plus one EXPIRE the first
time a day is written): absolute values, so a flush costs one billed command however many purposes there
are, and a flush repeated after a lost reply writes the same numbers again. ``today`` sums the fields by
purpose over every daemon (fields without an instance, from older daemons' increments, count as they are).
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
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
    """Writes this process's counts for the day into ``{prefix}:usage:{day}`` and reads them back for status."""

    def __init__(self, clients: RedisClients, keys: Keys, scripts: Scripts, now: Callable[[], float]) -> None:
        self.clients = clients
        self.keys = keys
        self.scripts = scripts  # kept for the wiring's signature; the flush needs no script
        self.now = now
        self.redis = clients.client("usage")
        self.instance = f"{os.getpid()}.{secrets.token_hex(3)}"
        self._day = ""
        self._day_counts: collections.Counter[str] = collections.Counter()

    async def flush(self) -> bool:
        """Write this process's counts of the day (the flush itself included); one HSET, and one EXPIRE the
        first time a day is written."""
        if not self.clients.usage.unflushed:
            return False
        day = utc_day(self.now())
        first_of_day = day != self._day
        own = 2 if first_of_day else 1
        # The commands below, counted before they happen so the values written include them; the counting
        # client counts them again when they are sent, and that second count is taken back after.
        self.clients.usage.add("usage", own)
        counts = self.clients.usage.take_unflushed()
        day_counts = collections.Counter() if first_of_day else collections.Counter(self._day_counts)
        day_counts.update(counts)
        key = self.keys.usage(day)
        mapping = {f"{purpose}|{self.instance}": n for purpose, n in sorted(day_counts.items())}
        try:
            await self.redis.hset(key, mapping=mapping)  # type: ignore[arg-type]
            if first_of_day:
                await self.redis.expire(key, USAGE_TTL_S)
        except Exception:
            self.clients.usage.give_back(counts)
            raise
        finally:
            # Counted in advance and again by the client as sent: what was sent stays counted once, what was
            # never sent (after a failure) not at all.
            self.clients.usage.forget("usage", own)
        self._day, self._day_counts = day, day_counts
        return True

    async def today(self) -> dict[str, int]:
        """Today's counts by purpose, every daemon's."""
        raw: dict[Any, Any] = await self.clients.client("admin").hgetall(self.keys.usage(utc_day(self.now())))
        totals: collections.Counter[str] = collections.Counter()
        for field, value in raw.items():
            totals[str(field).split("|", 1)[0]] += int(value)
        return dict(totals)


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
