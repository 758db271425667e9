"""The scraper's circuit breaker, shared by every daemon on the Redis (it replaces a Durable Object).

CLOSED admits every call; each failure adds to a consecutive-failure count that any success resets, and at
``failures`` the breaker opens. OPEN denies until ``recovery_s`` after the last failure, then reads
HALF_OPEN, which admits at most ``half_open_max`` trial calls in flight across all daemons; ``successes``
successes close it and any failure re-opens it. A trial whose outcome never arrives (its process died)
frees its slot after ``trial_ttl_s``, so the breaker cannot wedge half-open.

Admission and outcome recording are each one script call and take batches (``allow(n)``, ``record([...])``)
so the queue can batch without changing the semantics; the queue's cycle script runs the same Lua state
machine (``lua/breaker_lib.lua``) together with its acknowledgements. If Redis is unreachable the caller
gets the Redis error: the breaker never "fails open".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import orjson

if TYPE_CHECKING:
    from collections.abc import Sequence

    from daemon.keys import Keys
    from daemon.primitives.clients import CountingRedis
    from daemon.primitives.scripts import Scripts
    from daemon.settings.config import Settings

OutcomeKind = Literal["s", "f", "n"]  # success, failure, neutral (frees a trial slot only)


@dataclass(frozen=True)
class BreakerConfig:
    """The breaker's thresholds."""

    failures: int = 10
    recovery_s: float = 120
    successes: int = 3
    half_open_max: int = 3
    trial_ttl_s: float = 300

    @classmethod
    def from_settings(cls, settings: Settings) -> BreakerConfig:
        """The thresholds the settings give (trials expire with the visibility timeout)."""
        return cls(
            failures=settings.breaker_failures,
            recovery_s=settings.breaker_recovery_s,
            successes=settings.breaker_successes,
            half_open_max=settings.breaker_half_open_max,
            # A trial cannot legitimately run longer than a job may stay unacknowledged.
            trial_ttl_s=settings.visibility_timeout_s,
        )

    def lua(self) -> dict[str, Any]:
        """As the Lua state machine takes them (milliseconds)."""
        return {
            "failures": self.failures,
            "recovery_ms": int(self.recovery_s * 1000),
            "successes": self.successes,
            "half_open_max": self.half_open_max,
            "trial_ttl_ms": int(self.trial_ttl_s * 1000),
        }


@dataclass(frozen=True)
class BreakerState:
    """The breaker as a script last returned it."""

    state: str
    failures: int
    successes: int
    last_failure_ms: int | None
    last_change_ms: int | None
    in_flight: int
    retry_after_s: float

    @classmethod
    def from_lua(cls, view: dict[str, Any]) -> BreakerState:
        """From a script's breaker view."""
        return cls(
            state=str(view["state"]),
            failures=int(view["failures"]),
            successes=int(view["successes"]),
            last_failure_ms=int(view["last_failure_ms"]) or None,
            last_change_ms=int(view["last_change_ms"]) or None,
            in_flight=int(view.get("in_flight", 0)),
            retry_after_s=int(view.get("retry_after_ms", 0)) / 1000,
        )

    def as_dict(self) -> dict[str, Any]:
        """Its fields, times as epoch milliseconds (``runtime.report.breaker_view`` shows them)."""
        return {
            "state": self.state,
            "failure_count": self.failures,
            "success_count": self.successes,
            "last_failure": self.last_failure_ms,
            "last_state_change": self.last_change_ms,
            "half_open_in_flight": self.in_flight,
            "retry_after_s": self.retry_after_s,
        }


CLOSED = BreakerState("CLOSED", 0, 0, None, None, 0, 0.0)


@dataclass(frozen=True)
class Admission:
    """``admitted`` of the calls asked for may go; in HALF_OPEN each carries one of ``trials``."""

    admitted: int
    trials: list[str] = field(default_factory=list)
    retry_after_s: float = 0.0
    breaker: BreakerState = CLOSED

    def trial(self, i: int) -> str:
        """The trial id of the i-th admitted call ('' when it is not a half-open trial)."""
        return self.trials[i] if i < len(self.trials) else ""


def trial_list(raw: Any) -> list[str]:
    """cjson encodes an empty Lua table as ``{}``: read both shapes as a list."""
    return [str(t) for t in raw] if isinstance(raw, list) else []


class CircuitBreaker:
    """The shared breaker's own calls: ``status`` and ``reset`` (admin), ``allow`` and ``record`` (tests, bench).

    The daemon does not call these: its admission and outcome recording run inside the queue's cycle script
    (``lua/queue_cycle.lua``, the same state machine from ``lua/breaker_lib.lua``), one call per batch.
    """

    def __init__(self, redis: CountingRedis, keys: Keys, scripts: Scripts, config: BreakerConfig) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = scripts
        self.config = config

    @property
    def _keys(self) -> list[str]:
        return [self.keys.breaker, self.keys.breaker_trials]

    async def allow(self, n: int = 1) -> Admission:
        """Ask to make ``n`` calls; one script call whatever ``n`` is."""
        reply = await self.scripts.call_json("breaker_allow", self._keys, [n, _json(self.config.lua())], self.redis)
        return Admission(
            admitted=int(reply["admitted"]),
            trials=trial_list(reply["trials"]),
            retry_after_s=int(reply["retry_after_ms"]) / 1000,
            breaker=BreakerState.from_lua(reply["breaker"]),
        )

    async def record(self, outcomes: Sequence[tuple[OutcomeKind, str]]) -> BreakerState:
        """Record (kind, trial id) outcomes in order; one script call for the whole batch."""
        reply = await self.scripts.call_json(
            "breaker_record",
            self._keys,
            [_json(self.config.lua()), _json([list(o) for o in outcomes])],
            self.redis,
        )
        return BreakerState.from_lua(reply)

    async def status(self) -> BreakerState:
        """The breaker's state now; one script call."""
        reply = await self.scripts.call_json("breaker_status", self._keys, [_json(self.config.lua())], self.redis)
        return BreakerState.from_lua(reply)

    async def reset(self) -> None:
        """Operator override: back to CLOSED with every count zero and no trials in flight.

        The trial id counter survives, so a trial admitted before the reset cannot free a newer one's slot.
        """
        await self.redis.hdel(self.keys.breaker, "state", "failures", "successes", "last_failure_ms", "last_change_ms")
        await self.redis.delete(self.keys.breaker_trials)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()
