"""Adaptive checking's shared vocabulary (SPEC §11): its Redis keys, its timing and clock, its budget constants
and the figures that health, metrics and ``status`` read.

The planning loop (``replanner.py``) writes the plan to Postgres and keeps the coverage figures; the taker
(``taker.py``) leases due sections and counts the checks. Both speak the names defined here, and neither
holds the other's state.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from daemon.adaptive import plan as planner
from daemon.adaptive.limit import AdaptiveLimit

if TYPE_CHECKING:
    from collections.abc import Sequence

    from daemon.adaptive.gate import Gate
    from daemon.keys import Keys
    from daemon.settings.config import Settings

PURPOSE: Final = "adaptive"  # Redis commands of the take script (all-in: what it runs counted too)
IDLE_FLOOR_PER_DAY: Final = 400.0  # SPEC §5: a waiting daemon's whole spend
FIGURES_EVERY_S: Final = 600.0
WARN_EVERY_S: Final = 3600.0
# Until measured: one take call (six billed commands with what it runs) per ~60 checks.
DEFAULT_COMMANDS_PER_CHECK: Final = 0.1
# The pace runs 3 % under the budget, so jitter in when checks actually start (an event loop that is late,
# two daemons' replies arriving at different moments) never pushes any one minute over it.
PACE_MARGIN: Final = 0.97
# Checks one take call aims to slot: a call costs six billed commands whatever its size, so ~150 checks a call
# is 0.04 a check. The horizon is what that many take at this daemon's share of the pace, within the cap.
CHECKS_PER_CALL: Final = 150
HORIZON_CAP_S: Final = 120.0  # never hold slots further ahead (new hot sections wait at most this)


class AdaptiveKeys:
    """The adaptive schedule's keys, under the deployment's prefix: the shared pace and the breaker's."""

    def __init__(self, keys: Keys) -> None:
        p = f"{keys.prefix}:adaptive"
        self.pace = f"{p}:slots"
        self.breaker, self.breaker_trials = keys.breaker, keys.breaker_trials
        # Earlier versions kept the plan in Redis (billed per section); dropped at start (adaptive_sync).
        self.old_layout = [f"{p}:{name}" for name in ("due", "interval", "prio", "last", "gen", "pace")] + [
            f"{p}:{name}" for name in ("scrapes", "report", "daemons")
        ]


class RedisClock:
    """Redis time in ms, estimated between take calls from the last reply (hosts may disagree; Redis is one)."""

    def __init__(self) -> None:
        self.offset_ms = 0.0

    def seen(self, redis_now_ms: int, rtt_s: float = 0.0) -> None:
        """A reply said Redis time was ``redis_now_ms`` about half a round trip ago."""
        self.offset_ms = redis_now_ms + rtt_s * 500 - time.time() * 1000

    def now_ms(self) -> int:
        """Redis time now, as estimated."""
        return int(time.time() * 1000 + self.offset_ms)


@dataclass(frozen=True)
class Timing:
    """The intervals and margins both loops work to, from the settings (scaled with compressed time)."""

    min_s: float  # SEATWATCH_MIN_CHECK_INTERVAL_S
    max_s: float  # SEATWATCH_MAX_CHECK_INTERVAL_S: the promise
    plan_every_s: float  # how often the planner reads Postgres
    figures_every_s: float  # an unchanged plan is written again this often, for fresh coverage figures
    late_s: float  # a check may start this late after its slot
    # Due times carry twice that: one for the lateness allowed, one for what the local check cannot see (the
    # take reply's way back, the request's way out to the scraper).
    margin_s: float
    horizon_cap_s: float  # slots are reserved at most this far ahead

    @classmethod
    def from_settings(cls, settings: Settings, plan_every_s: float | None = None) -> Timing:
        """The timing for these settings; ``plan_every_s`` overrides the planning period (tests, benches)."""
        min_s, max_s = float(settings.min_check_interval_s), float(settings.max_check_interval_s)
        plan_s = plan_every_s or min(60.0, max(1.0, min_s / 2))
        late_s = min(1.0, 0.05 * min_s)
        return cls(
            min_s=min_s,
            max_s=max_s,
            plan_every_s=plan_s,
            figures_every_s=min(FIGURES_EVERY_S, max(plan_s, max_s / 6)),
            late_s=late_s,
            margin_s=2 * late_s,
            # Never more than a minimum interval ahead: a hot section is leased again within its interval.
            horizon_cap_s=max(0.5, min(HORIZON_CAP_S, min_s)),
        )


@dataclass
class Figures:
    """What the schedule looks like, for health, metrics, status and the hourly warning."""

    watched: int = 0
    covered: int = 0
    hot: int = 0
    scrapes_last_hour: int = 0
    daemons: int = 1
    plan: planner.Plan | None = None
    synced_at: float | None = None
    checks: int = 0
    skipped: int = 0
    takes: int = 0
    commands_per_check: float = DEFAULT_COMMANDS_PER_CHECK
    intervals_s: deque[float] = field(default_factory=lambda: deque(maxlen=2000))

    def check(self, gate: Gate) -> dict[str, Any]:
        """The health endpoint's ``schedule`` check (SPEC §11), from memory."""
        plan = self.plan
        behind = max(0, self.watched - self.covered)
        degraded = behind > 0 or bool(plan and plan.behind)
        intervals = list(self.intervals_s)
        limit = gate.limit
        binding = plan.binding if plan else None
        return {
            "status": "degraded" if degraded else "healthy",
            "mode": "adaptive",
            "watched": self.watched,
            "hot": self.hot,
            "coverage": round(self.covered / self.watched, 4) if self.watched else 1.0,
            "behind": behind,
            "interval_p50_s": round2(quantile(intervals, 0.5)),
            "interval_p95_s": round2(quantile(intervals, 0.95)),
            "hot_interval_s": round2(plan.hot_interval_s) if plan else None,
            "binding": binding,
            "lift": planner.LIFT.get(binding or "") if degraded else None,
            "allowed_checks_per_hour": round(plan.allowed_per_s * 3600, 1) if plan else None,
            "needed_checks_per_hour": round(plan.needed_per_s * 3600, 1) if plan else None,
            "scrapes_last_hour": self.scrapes_last_hour,
            "checks_here": self.checks,
            "take_calls": self.takes,
            "skipped_late": self.skipped,
            "redis_commands_per_check": round(self.commands_per_check, 3),
            "projected_redis_day": round(
                IDLE_FLOOR_PER_DAY * self.daemons + (plan.spend_per_s if plan else 0) * 86400 * self.commands_per_check
            ),
            "concurrency": {
                "mode": "auto" if isinstance(limit, AdaptiveLimit) else "fixed",
                "limit": limit.limit,
                "latency_floor_s": round2(limit.floor_s),
                "latency_s": round2(limit.smoothed_s),
                "in_flight": gate.in_flight,
            },
            "age_s": round(time.monotonic() - self.synced_at, 1) if self.synced_at else None,
        }


def quantile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile of ``values`` (nearest rank), None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def round2(value: float | None) -> float | None:
    """Rounded to two places, None kept."""
    return None if value is None else round(value, 2)
