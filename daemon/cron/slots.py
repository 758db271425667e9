"""Cron maths, pure: fire times of a cron expression in a zone, slot ids, the parity group of a slot."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from croniter import croniter

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo


def latest_slot(cron: str, tz: ZoneInfo, now: float) -> datetime:
    """The most recent fire time at or before ``now``."""
    at = datetime.fromtimestamp(now, tz)
    prev: datetime = croniter(cron, at).get_prev(datetime)
    following: datetime = croniter(cron, prev).get_next(datetime)
    return following if following.timestamp() <= now else prev


def next_slot(cron: str, tz: ZoneInfo, after: datetime) -> datetime:
    """The first fire time strictly after ``after``."""
    result: datetime = croniter(cron, after).get_next(datetime)
    return result


def slot_id(at: datetime) -> str:
    """A cron slot's id: its UTC minute, ``2026-01-15T16:30Z``."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")


def group_for(at: datetime, stagger: str) -> str:
    """parity: the first half hour checks even last digits, the second odd; none: everything."""
    if stagger == "none":
        return "all"
    return "even" if (at.minute // 30) % 2 == 0 else "odd"


def shortest_cron_gap_s(cron: str, tz: ZoneInfo, *, samples: int = 100) -> float:
    """The shortest gap, in seconds, among the next ``samples`` fire times of ``cron`` in ``tz``."""
    it = croniter(cron, datetime.now(tz))
    times = [it.get_next(float) for _ in range(samples + 1)]
    return float(min(b - a for a, b in itertools.pairwise(times)))
