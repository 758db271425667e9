"""How many scrapes may be in flight at once: fixed, or adaptive (``SEATWATCH_CONCURRENCY=auto``). Pure logic.

The adaptive limit is a Vegas-style limiter (after Netflix's concurrency-limits): the scraper's latency
with nothing queued in it (``floor_s``) is compared with the latency now; ``limit * (1 - floor / rtt)`` is
an estimate of how many of our requests wait inside the scraper for a free slot. Below ``alpha`` waiting
the limit grows by about one per round trip, above ``beta`` it shrinks by about one per round trip, and a
429, a 5xx or a timeout cuts it by 30 % (at most once per round trip). So the daemon fills the scraper's
slots and keeps at most a couple of requests waiting in it.

A floor measured once would drift out of date (a slower scraper would read as a queue forever, a faster
one never be noticed), and a floor that is allowed to creep up would follow the queue it should expose.
So every ``probe_every`` samples the limiter probes: for two round trips it admits only half its limit,
the queue inside the scraper drains, and the floor is measured afresh from the second round trip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

DROP_FACTOR: Final = 0.7
PROBE_EVERY: Final = 400  # samples between probes


@dataclass
class AdaptiveLimit:
    """The in-flight limit from latency and errors; ``clock`` is seconds (monotonic), injected by the caller."""

    low: int = 1
    high: int = 32
    initial: float = 4.0
    alpha: float = 1.0
    beta: float = 2.0
    probe_every: int = PROBE_EVERY

    def __post_init__(self) -> None:
        self.value = float(min(self.high, max(self.low, self.initial)))
        self.floor_s: float | None = None
        self.smoothed_s: float | None = None
        self._last_cut = -math.inf
        self._samples = 0
        self._probe_from = math.inf  # clock time the probe's measuring half starts
        self._probe_until = -math.inf
        self._probe_floor: float | None = None
        self._next_probe = self.probe_every
        self._now = 0.0

    @property
    def limit(self) -> int:
        """What may be in flight now (half the limit while probing)."""
        whole = max(self.low, min(self.high, math.floor(self.value)))
        if self.probing:
            return max(self.low, whole // 2)
        return whole

    @property
    def probing(self) -> bool:
        """A probe above the limit is running (its latency samples decide whether the limit grows)."""
        return self._probe_until > self._now

    def tick(self, now: float) -> None:
        """Let time pass: a probe that is over sets the new floor."""
        self._now = now
        if self._probe_until != -math.inf and now >= self._probe_until:
            if self._probe_floor is not None:
                self.floor_s = self._probe_floor
            self._probe_floor = None
            self._probe_until = -math.inf
            self._probe_from = math.inf

    def sample(self, rtt_s: float, now: float, *, dropped: bool = False, in_flight: int | None = None) -> None:
        """One finished request: its latency, or that it was dropped (429, 5xx, timeout)."""
        self.tick(now)
        if dropped:
            rtt = self.smoothed_s or rtt_s
            if now - self._last_cut >= rtt:
                self.value = max(float(self.low), self.value * DROP_FACTOR)
                self._last_cut = now
            return
        rtt_s = max(rtt_s, 1e-6)
        self.smoothed_s = rtt_s if self.smoothed_s is None else 0.9 * self.smoothed_s + 0.1 * rtt_s
        if self._probe_from <= now < self._probe_until:
            self._probe_floor = rtt_s if self._probe_floor is None else min(self._probe_floor, rtt_s)
        if self.floor_s is None or rtt_s < self.floor_s:
            self.floor_s = rtt_s
        self._samples += 1
        if self._samples >= self._next_probe and not self.probing:
            self._start_probe(now)
        if self.probing:
            return
        queued = self.value * (1 - self.floor_s / rtt_s)
        step = 1.0 / max(1.0, self.value)  # about one per round trip's worth of samples
        if queued < self.alpha:
            # Grow only while the limit is what holds us back: an idle daemon must not inflate it.
            if in_flight is None or in_flight + 1 >= math.floor(self.value):
                self.value = min(float(self.high), self.value + step)
        elif queued > self.beta:
            self.value = max(float(self.low), self.value - step)

    def _start_probe(self, now: float) -> None:
        rtt = self.smoothed_s or self.floor_s or 1.0
        self._probe_from = now + rtt
        self._probe_until = now + 2 * rtt
        self._probe_floor = None
        self._next_probe = self._samples + self.probe_every


@dataclass
class FixedLimit:
    """``SEATWATCH_CONCURRENCY=N``: always N; latency is still tracked for capacity estimates."""

    value_n: int = 4

    def __post_init__(self) -> None:
        self.smoothed_s: float | None = None
        self.floor_s: float | None = None

    @property
    def limit(self) -> int:
        """The configured number of scrapes in flight."""
        return self.value_n

    @property
    def probing(self) -> bool:
        """Never: a fixed limit does not probe."""
        return False

    def tick(self, now: float) -> None:
        """Nothing to do: a fixed limit does not move."""
        return

    def sample(self, rtt_s: float, now: float, *, dropped: bool = False, in_flight: int | None = None) -> None:
        """Keep the latency figures (for health); the limit itself does not move."""
        if dropped:
            return
        self.smoothed_s = rtt_s if self.smoothed_s is None else 0.9 * self.smoothed_s + 0.1 * rtt_s
        self.floor_s = rtt_s if self.floor_s is None else min(self.floor_s, rtt_s)


Limit = AdaptiveLimit | FixedLimit


def capacity_per_s(limit: Limit) -> float | None:
    """Scrapes per second the scraper sustains at this limit (Little's law: in flight / latency).

    An adaptive limit below its ceiling gets one slot of headroom, so the work offered lets it grow.
    None before any measurement.
    """
    if limit.smoothed_s is None or limit.smoothed_s <= 0:
        return None
    slots = limit.limit
    if isinstance(limit, AdaptiveLimit) and limit.value < limit.high:
        slots += 1
    return slots / limit.smoothed_s
