"""Adaptive checking's plan: how often each watched section is checked, within the budgets. Pure logic.

A section where an opening would email someone now (``waiting`` > 0: eligible watchers whose seat claim is
not held) is worth checking often; more such watchers and recent seat movement make it worth more. A
section nobody waits on is checked at the maximum interval only (that records fills, which re-arm claims).

The checks per second the budgets allow go first to the cold sections at the maximum interval, and the rest
is shared by the hot ones: interval_i = clamp(c / weight_i, min, max), with the one ``c`` that spends the
allowance exactly (found by bisection). When even every section at the maximum interval does not fit, the
plan is behind, and the take script's ordering (priority first) decides who waits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

DAY_S: Final = 86400.0
RECENT_MOVE_S: Final = 6 * 3600.0
SCRAPES = "scrapes_per_hour"
REDIS = "redis_budget_per_day"
CAPACITY = "scraper_capacity"
MIN_INTERVAL = "min_interval"

LIFT: Final = {
    SCRAPES: "raise SEATWATCH_SCRAPES_PER_HOUR",
    REDIS: "raise SEATWATCH_REDIS_BUDGET_PER_DAY (a paid Redis plan)",
    CAPACITY: "add scraper capacity or raise SEATWATCH_CONCURRENCY / SEATWATCH_CONCURRENCY_MAX",
    MIN_INTERVAL: "lower SEATWATCH_MIN_CHECK_INTERVAL_S",
}


@dataclass(frozen=True)
class Section:
    """A watched section as the planner sees it."""

    id: str  # "{term}-{class_nbr}"
    waiting: int = 0  # eligible watchers whose seat_available claim is not held
    moved_age_s: float | None = None  # since seats or instructor last changed


@dataclass(frozen=True)
class Budgets:
    """Checks per second each budget allows, every daemon together."""

    scrapes_per_s: float
    redis_per_s: float
    capacity_per_s: float | None = None  # measured; None until measured

    def allowed(self) -> tuple[float, str]:
        """The smallest allowance and the budget it comes from."""
        options = [(self.scrapes_per_s, SCRAPES), (self.redis_per_s, REDIS)]
        if self.capacity_per_s is not None:
            options.append((self.capacity_per_s, CAPACITY))
        rate, name = min(options, key=lambda o: o[0])
        return max(0.0, rate), name


@dataclass(frozen=True)
class Plan:
    """Each section's interval and priority, and what the plan spends against what the budgets allow."""

    intervals_s: dict[str, float]
    priorities: dict[str, int]
    allowed_per_s: float  # what the budgets allow
    spend_per_s: float  # what the plan spends
    needed_per_s: float  # every section at the maximum interval (the promise)
    binding: str  # the budget that limits the plan, or MIN_INTERVAL when none does
    hot: int = 0
    hot_interval_s: float | None = None  # the median interval of hot sections
    notes: list[str] = field(default_factory=list)

    @property
    def behind(self) -> bool:
        """The budgets cannot check every section within the maximum interval."""
        return self.needed_per_s > self.allowed_per_s * 1.0001


def weight(section: Section) -> float:
    """How much checking this section is worth; 0 when an opening would email nobody."""
    if section.waiting <= 0:
        return 0.0
    w = 1.0 + math.log2(1 + section.waiting)
    if section.moved_age_s is not None:
        if section.moved_age_s < RECENT_MOVE_S:
            w *= 2.0
        elif section.moved_age_s < DAY_S:
            w *= 1.5
    return w


def redis_checks_per_s(budget_per_day: float, floor_per_day: float, commands_per_check: float) -> float:
    """Checks per second the Redis day pays for once the idle floor is set aside."""
    spare = max(0.0, budget_per_day - floor_per_day)
    return spare / max(commands_per_check, 1e-3) / DAY_S


def plan(sections: list[Section], budgets: Budgets, *, min_s: float, max_s: float) -> Plan:
    """Intervals and priorities for every section within ``budgets``."""
    allowed, binding = budgets.allowed()
    n = len(sections)
    needed = n / max_s
    weights = {s.id: weight(s) for s in sections}
    hot = {sid: w for sid, w in weights.items() if w > 0}
    priorities = {sid: max(1, round(w * 100)) if w > 0 else 0 for sid, w in weights.items()}
    cold_spend = (n - len(hot)) / max_s

    def spend(c: float) -> float:
        return cold_spend + sum(1.0 / min(max_s, max(min_s, c / w)) for w in hot.values())

    if not hot:
        c = 0.0
        intervals = dict.fromkeys(weights, max_s)
        if needed <= allowed:
            binding = MIN_INTERVAL if n else binding
    elif spend(0.0) <= allowed:
        binding = MIN_INTERVAL
        intervals = {sid: (min_s if sid in hot else max_s) for sid in weights}
    elif spend(math.inf) >= allowed:
        intervals = dict.fromkeys(weights, max_s)
    else:
        lo, hi = 0.0, max_s * max(hot.values())  # spend(lo) > allowed >= spend(hi)
        for _ in range(60):
            mid = (lo + hi) / 2
            if spend(mid) > allowed:
                lo = mid
            else:
                hi = mid
        c = hi
        intervals = {sid: (min(max_s, max(min_s, c / hot[sid])) if sid in hot else max_s) for sid in weights}
    # On a grid of ~6 % steps (never below the minimum), so a plan that barely moved writes nothing new.
    intervals = {sid: _on_grid(i, min_s, max_s) for sid, i in intervals.items()}
    total = sum(1.0 / i for i in intervals.values()) if intervals else 0.0
    hot_intervals = sorted(intervals[sid] for sid in hot)
    return Plan(
        intervals_s=intervals,
        priorities=priorities,
        allowed_per_s=allowed,
        spend_per_s=total,
        needed_per_s=needed,
        binding=binding,
        hot=len(hot),
        hot_interval_s=hot_intervals[len(hot_intervals) // 2] if hot_intervals else None,
    )


def _on_grid(interval_s: float, min_s: float, max_s: float) -> float:
    if interval_s <= min_s or interval_s >= max_s:
        return min(max_s, max(min_s, interval_s))
    step = 10 ** (math.ceil(40 * math.log10(interval_s)) / 40)  # rounded up: never spends more than planned
    return min(max_s, max(min_s, step))


def project(watched: int, budgets: Budgets, *, min_s: float, max_s: float, hot: int | None = None) -> dict[str, object]:
    """What adaptive checking can reach for ``watched`` sections (``hot`` of them with someone waiting)."""
    hot = watched if hot is None else hot
    allowed, binding = budgets.allowed()
    cold_spend = (watched - hot) / max_s
    if hot == 0:
        interval = max_s
    else:
        spare = allowed - cold_spend
        interval = hot / spare if spare > 0 else math.inf
        if interval <= min_s:
            interval, binding = min_s, MIN_INTERVAL
    reachable = interval if math.isfinite(interval) else None
    return {
        "watched": watched,
        "hot": hot,
        "allowed_checks_per_hour": round(allowed * 3600, 1),
        "reachable_interval_s": None if reachable is None else round(reachable, 1),
        "within_promise": reachable is not None and reachable <= max_s and watched / max_s <= allowed,
        "binding": binding,
        "lift": LIFT.get(binding),
    }
