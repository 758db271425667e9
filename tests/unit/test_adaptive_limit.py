"""The adaptive concurrency limit (pure): it fills a capacity-limited scraper without queueing in it."""

from __future__ import annotations

import heapq
import statistics

from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.adaptive.limit import AdaptiveLimit, FixedLimit, capacity_per_s


def simulate(limit: AdaptiveLimit, *, slots: int, service_s: float, duration_s: float) -> list[float]:
    """A client that always has work, against a scraper serving ``slots`` at once in ``service_s`` each.

    Returns how long each request waited inside the scraper for a slot.
    """
    now = 0.0
    free_at = [0.0] * slots  # when each slot frees
    heapq.heapify(free_at)
    in_flight: list[tuple[float, float]] = []  # (finish, start)
    waits: list[float] = []
    while now < duration_s:
        limit.tick(now)
        while len(in_flight) < limit.limit:
            slot = heapq.heappop(free_at)
            begin = max(now, slot)
            finish = begin + service_s
            heapq.heappush(free_at, finish)
            waits.append(begin - now)
            heapq.heappush(in_flight, (finish, now))
        finish, start = heapq.heappop(in_flight)
        now = finish
        limit.sample(finish - start, now, in_flight=len(in_flight))
    return waits


def test_the_limit_settles_near_the_scrapers_capacity() -> None:
    """Against 4 slots the limit ends between 4 and 7, and requests wait less than one service time (median)."""
    limit = AdaptiveLimit(high=32)
    waits = simulate(limit, slots=4, service_s=1.0, duration_s=2000)
    assert 4 <= limit.limit <= 7
    assert statistics.median(waits[len(waits) // 2 :]) <= 1.0


def test_the_limit_grows_to_a_large_scraper() -> None:
    """Against 20 slots the limit climbs from 4 to use them."""
    limit = AdaptiveLimit(high=32)
    simulate(limit, slots=20, service_s=1.0, duration_s=1000)
    assert limit.limit >= 18


def test_the_ceiling_holds() -> None:
    """Against a scraper larger than the ceiling the limit stops at SEATWATCH_CONCURRENCY_MAX."""
    limit = AdaptiveLimit(high=8)
    simulate(limit, slots=50, service_s=1.0, duration_s=500)
    assert limit.limit == 8


def test_drops_cut_the_limit_once_per_round_trip() -> None:
    """429s, 5xx and timeouts cut the limit by 30 %, but a burst of them within one round trip cuts once."""
    limit = AdaptiveLimit(high=32, initial=20)
    limit.sample(1.0, 1.0)
    limit.sample(1.0, 2.0, dropped=True)
    assert limit.limit == 14
    limit.sample(1.0, 2.1, dropped=True)
    assert limit.limit == 14
    limit.sample(1.0, 3.5, dropped=True)
    assert limit.limit == 9


def test_the_floor_follows_a_slower_scraper() -> None:
    """When the scraper becomes slower for good, probes re-measure the floor and the limit recovers."""
    limit = AdaptiveLimit(high=32)
    simulate(limit, slots=6, service_s=1.0, duration_s=800)
    simulate(limit, slots=6, service_s=3.0, duration_s=6000)
    assert limit.floor_s is not None
    assert limit.floor_s >= 2.5
    assert 5 <= limit.limit <= 9


def test_an_idle_client_does_not_inflate_the_limit() -> None:
    """Fast answers while little is in flight do not raise the limit (it grows only when it binds)."""
    limit = AdaptiveLimit(high=32)
    for i in range(500):
        limit.sample(0.1, i * 0.2, in_flight=0)
    assert limit.limit == 4


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(min_value=0.001, max_value=100), st.booleans(), st.integers(min_value=0, max_value=40)),
        max_size=300,
    ),
    st.integers(min_value=1, max_value=64),
)
def test_the_limit_stays_between_one_and_the_ceiling(samples: list[tuple[float, bool, int]], high: int) -> None:
    """Whatever latencies and errors arrive, the limit stays within [1, SEATWATCH_CONCURRENCY_MAX]."""
    limit = AdaptiveLimit(low=1, high=high)
    now = 0.0
    for rtt, dropped, in_flight in samples:
        now += rtt / 3
        limit.sample(rtt, now, dropped=dropped, in_flight=in_flight)
        assert 1 <= limit.limit <= high


def test_capacity_is_in_flight_over_latency() -> None:
    """Measured capacity (Little's law) is the fixed limit over the smoothed latency; unknown before samples."""
    fixed = FixedLimit(4)
    assert capacity_per_s(fixed) is None
    fixed.sample(2.0, 1.0)
    assert capacity_per_s(fixed) == 2.0
