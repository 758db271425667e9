"""The adaptive plan (pure): intervals by priority within the budgets, and the projection status shows."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.adaptive import plan as planner
from daemon.adaptive.plan import Budgets, Section, plan, project, redis_checks_per_s

MIN_S, MAX_S = 120.0, 3600.0


def budgets(per_hour: float, redis_per_hour: float = 1e9, capacity_per_hour: float | None = None) -> Budgets:
    capacity = None if capacity_per_hour is None else capacity_per_hour / 3600
    return Budgets(per_hour / 3600, redis_per_hour / 3600, capacity)


def test_nobody_waiting_means_the_maximum_interval() -> None:
    """Sections where an opening would email nobody are checked at the maximum interval only."""
    p = plan([Section(f"t-{i}") for i in range(10)], budgets(3600), min_s=MIN_S, max_s=MAX_S)
    assert set(p.intervals_s.values()) == {MAX_S}
    assert set(p.priorities.values()) == {0}
    assert p.hot == 0


def test_hot_sections_share_what_the_cold_ones_leave() -> None:
    """100 hot and 100 cold sections on 360 checks/h: cold at the max, the hot ones spend the rest evenly."""
    sections = [Section(f"h-{i}", waiting=1) for i in range(100)] + [Section(f"c-{i}") for i in range(100)]
    p = plan(sections, budgets(360), min_s=MIN_S, max_s=MAX_S)
    assert all(p.intervals_s[f"c-{i}"] == MAX_S for i in range(100))
    hot = {p.intervals_s[f"h-{i}"] for i in range(100)}
    assert len(hot) == 1
    # 100 cold use 100/h; 260/h left for 100 hot: ~1385 s each (rounded up onto the grid)
    assert 1385 <= hot.pop() <= 1385 * 1.07
    assert p.spend_per_s <= p.allowed_per_s
    assert p.binding == planner.SCRAPES
    assert not p.behind


def test_more_watchers_and_recent_movement_come_first() -> None:
    """More waiting watchers and a recent seat change earn a shorter interval and a higher priority."""
    sections = [
        Section("one", waiting=1, moved_age_s=None),
        Section("many", waiting=8, moved_age_s=None),
        Section("moved", waiting=1, moved_age_s=600),
    ] + [Section(f"x-{i}", waiting=1) for i in range(200)]
    p = plan(sections, budgets(400), min_s=MIN_S, max_s=MAX_S)
    assert p.intervals_s["many"] < p.intervals_s["one"]
    assert p.intervals_s["moved"] < p.intervals_s["one"]
    assert p.priorities["many"] > p.priorities["one"]
    assert p.priorities["moved"] > p.priorities["one"]


def test_budget_to_spare_means_the_minimum_interval() -> None:
    """When every hot section at the minimum interval fits, that is the plan and the minimum binds."""
    p = plan([Section(f"h-{i}", waiting=2) for i in range(10)], budgets(3600), min_s=MIN_S, max_s=MAX_S)
    assert set(p.intervals_s.values()) == {MIN_S}
    assert p.binding == planner.MIN_INTERVAL


def test_too_little_budget_is_behind_and_names_the_binding_one() -> None:
    """5,000 sections cannot all be checked hourly on 3,600 scrapes/h: behind, scrapes_per_hour binds."""
    p = plan([Section(f"h-{i}", waiting=1) for i in range(5000)], budgets(3600), min_s=MIN_S, max_s=MAX_S)
    assert p.behind
    assert p.binding == planner.SCRAPES
    assert set(p.intervals_s.values()) == {MAX_S}


def test_the_smallest_budget_binds() -> None:
    """Of scrapes, the Redis day and measured capacity, the smallest allowance is the binding budget."""
    assert budgets(3600, 1000, 5000).allowed()[1] == planner.REDIS
    assert budgets(3600, 9000, 1000).allowed()[1] == planner.CAPACITY
    assert budgets(3600, 9000, None).allowed()[1] == planner.SCRAPES


def test_the_redis_day_pays_for_checks_after_the_idle_floor() -> None:
    """Upstash's free 16,000 a day, less a 644-command floor, at 0.25 commands a check: ~2,560 checks/h."""
    per_s = redis_checks_per_s(16000, 644, 0.25)
    assert round(per_s * 3600) == 2559


def test_projection_names_the_reachable_interval_and_the_binding_budget() -> None:
    """status' projection: 300 sections on the free tier reach ~7 minutes; 12,000 cannot keep the hour."""
    free = Budgets(3600 / 3600, redis_checks_per_s(16000, 644, 0.25), None)
    small = project(300, free, min_s=MIN_S, max_s=MAX_S)
    assert small["binding"] == planner.REDIS
    assert 400 <= small["reachable_interval_s"] <= 430  # type: ignore[operator]
    assert small["within_promise"] is True
    big = project(12000, free, min_s=MIN_S, max_s=MAX_S)
    assert big["within_promise"] is False
    assert big["reachable_interval_s"] > MAX_S  # type: ignore[operator]
    tiny = project(5, free, min_s=MIN_S, max_s=MAX_S)
    assert tiny["reachable_interval_s"] == MIN_S
    assert tiny["binding"] == planner.MIN_INTERVAL


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=30), st.one_of(st.none(), st.floats(min_value=0, max_value=1e6))),
        max_size=120,
    ),
    st.floats(min_value=1, max_value=100000),
    st.integers(min_value=1, max_value=600),
    st.integers(min_value=0, max_value=3000),
)
def test_plans_keep_the_bounds_and_the_budget(
    rows: list[tuple[int, float | None]], per_hour: float, min_s: int, extra_s: int
) -> None:
    """Every interval is within [min, max]; when the promise fits, the plan never spends more than allowed."""
    max_s = min_s + extra_s
    sections = [Section(f"s-{i}", waiting=w, moved_age_s=m) for i, (w, m) in enumerate(rows)]
    p = plan(sections, budgets(per_hour), min_s=min_s, max_s=max_s)
    assert all(min_s <= i <= max_s for i in p.intervals_s.values())
    assert set(p.intervals_s) == {s.id for s in sections}
    if not p.behind:
        assert p.spend_per_s <= p.allowed_per_s * 1.0001 + 1e-12
    for s in sections:
        if s.waiting == 0:
            assert p.intervals_s[s.id] == max_s
