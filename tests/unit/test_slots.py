"""Cron slots (SPEC §4): latest and next fire times in the configured zone, slot ids, parity groups."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.cron.slots import group_for, latest_slot, next_slot, slot_id

PHOENIX = ZoneInfo("America/Phoenix")
NEW_YORK = ZoneInfo("America/New_York")
DEFAULT_CRON = "0,30 * * * *"


def ts(year: int, month: int, day: int, hour: int, minute: int, second: int = 0, *, tz: ZoneInfo = PHOENIX) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=tz).timestamp()


# -- latest_slot / next_slot -----------------------------------------------------------------------------------


def test_latest_slot_between_fire_times() -> None:
    """Between fire times the latest slot is the previous one."""
    slot = latest_slot(DEFAULT_CRON, PHOENIX, ts(2025, 1, 15, 10, 17, 42))
    assert slot == datetime(2025, 1, 15, 10, 0, tzinfo=PHOENIX)


def test_latest_slot_exactly_on_fire_time() -> None:
    """Exactly on a fire time, that fire time is the latest slot (not the one before)."""
    slot = latest_slot(DEFAULT_CRON, PHOENIX, ts(2025, 1, 15, 10, 30))
    assert slot == datetime(2025, 1, 15, 10, 30, tzinfo=PHOENIX)


def test_latest_slot_just_before_fire_time() -> None:
    """A millisecond before a fire time, the latest slot is still the previous one."""
    slot = latest_slot(DEFAULT_CRON, PHOENIX, ts(2025, 1, 15, 10, 30) - 0.001)
    assert slot == datetime(2025, 1, 15, 10, 0, tzinfo=PHOENIX)


def test_latest_slot_is_in_zone() -> None:
    """The slot is an aware datetime in the configured zone."""
    slot = latest_slot(DEFAULT_CRON, PHOENIX, ts(2025, 6, 1, 0, 5))
    assert slot.utcoffset() == timedelta(hours=-7)
    assert slot == datetime(2025, 6, 1, 0, 0, tzinfo=PHOENIX)


def test_next_slot_strictly_after() -> None:
    """next_slot is strictly after its argument, even when that is itself a fire time."""
    at = datetime(2025, 1, 15, 10, 30, tzinfo=PHOENIX)
    assert next_slot(DEFAULT_CRON, PHOENIX, at) == datetime(2025, 1, 15, 11, 0, tzinfo=PHOENIX)
    assert next_slot(DEFAULT_CRON, PHOENIX, at + timedelta(seconds=1)) == datetime(2025, 1, 15, 11, 0, tzinfo=PHOENIX)


def test_next_slot_crosses_midnight() -> None:
    """23:30 is followed by 00:00 of the next day."""
    at = datetime(2025, 12, 31, 23, 30, tzinfo=PHOENIX)
    assert next_slot(DEFAULT_CRON, PHOENIX, at) == datetime(2026, 1, 1, 0, 0, tzinfo=PHOENIX)


def test_daily_cron_follows_zone_across_dst() -> None:
    """A 09:00 cron in New York fires at 13:00 UTC in summer and 14:00 UTC in winter."""
    summer = latest_slot("0 9 * * *", NEW_YORK, ts(2024, 11, 2, 12, 0, tz=NEW_YORK))
    winter = next_slot("0 9 * * *", NEW_YORK, summer)
    assert summer.astimezone(UTC) == datetime(2024, 11, 2, 13, 0, tzinfo=UTC)
    assert winter.astimezone(UTC) == datetime(2024, 11, 3, 14, 0, tzinfo=UTC)
    assert winter.timestamp() - summer.timestamp() == 25 * 3600


def test_phoenix_has_no_dst() -> None:
    """Phoenix's 09:00 is 16:00 UTC all year."""
    for month in (1, 7):
        slot = latest_slot("0 9 * * *", PHOENIX, ts(2025, month, 10, 12, 0))
        assert slot.astimezone(UTC) == datetime(2025, month, 10, 16, 0, tzinfo=UTC)


MINUTE_CRONS = {
    "0,30 * * * *": {0, 30},
    "*/10 * * * *": {0, 10, 20, 30, 40, 50},
    "15,45 * * * *": {15, 45},
    "0 * * * *": {0},
}
ZONES = ["America/Phoenix", "America/New_York", "Europe/London", "Asia/Kolkata", "Australia/Adelaide"]
instants = st.integers(
    min_value=int(datetime(2024, 1, 1, tzinfo=UTC).timestamp()),
    max_value=int(datetime(2026, 12, 31, tzinfo=UTC).timestamp()),
)


def reference_latest(minutes: set[int], tz: ZoneInfo, now: float) -> float:
    """Walk back minute by minute (in UTC) until the local wall-clock minute is a fire minute."""
    t = int(now) - int(now) % 60
    while datetime.fromtimestamp(t, tz).minute not in minutes:
        t -= 60
    return float(t)


def reference_next(minutes: set[int], tz: ZoneInfo, after: float) -> float:
    t = int(after) - int(after) % 60 + 60
    while datetime.fromtimestamp(t, tz).minute not in minutes:
        t += 60
    return float(t)


@given(
    cron=st.sampled_from(sorted(MINUTE_CRONS)),
    zone=st.sampled_from(ZONES),
    now=instants,
    fraction=st.sampled_from([0.0, 0.25, 0.999]),
)
def test_slots_match_reference(cron: str, zone: str, now: int, fraction: float) -> None:
    """For minute crons in zones with and without DST, latest/next slots match a brute-force walk."""
    tz = ZoneInfo(zone)
    at = now + fraction
    latest = latest_slot(cron, tz, at)
    assert latest.timestamp() == reference_latest(MINUTE_CRONS[cron], tz, at)
    assert latest.timestamp() <= at
    following = next_slot(cron, tz, latest)
    assert following.timestamp() == reference_next(MINUTE_CRONS[cron], tz, latest.timestamp())
    assert following.timestamp() > at


@given(zone=st.sampled_from(ZONES), now=instants)
def test_on_fire_time_is_latest(zone: str, now: int) -> None:
    """latest_slot of a fire time is that fire time."""
    tz = ZoneInfo(zone)
    fire = next_slot(DEFAULT_CRON, tz, datetime.fromtimestamp(now, tz))
    assert latest_slot(DEFAULT_CRON, tz, fire.timestamp()) == fire


# -- slot ids ------------------------------------------------------------------------------------------------


def test_slot_id_is_utc_minute() -> None:
    """A slot id is the UTC time to the minute: 10:30 Phoenix is 17:30Z."""
    assert slot_id(datetime(2025, 1, 15, 10, 30, tzinfo=PHOENIX)) == "2025-01-15T17:30Z"


def test_slot_id_drops_seconds() -> None:
    """Seconds and microseconds do not change the id."""
    assert slot_id(datetime(2025, 1, 15, 10, 30, 59, 999999, tzinfo=PHOENIX)) == "2025-01-15T17:30Z"


def test_slot_id_same_instant_same_id() -> None:
    """The same instant in two zones has the same id."""
    at = datetime(2025, 3, 9, 7, 0, tzinfo=UTC)
    assert slot_id(at.astimezone(NEW_YORK)) == slot_id(at.astimezone(PHOENIX)) == "2025-03-09T07:00Z"


def test_slot_ids_distinct_across_fall_back() -> None:
    """The repeated 01:30 of a DST fall-back gives two different slot ids."""
    first = datetime(2024, 11, 3, 1, 30, tzinfo=NEW_YORK, fold=0)
    second = datetime(2024, 11, 3, 1, 30, tzinfo=NEW_YORK, fold=1)
    assert slot_id(first) == "2024-11-03T05:30Z"
    assert slot_id(second) == "2024-11-03T06:30Z"


# -- groups --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("minute", "group"),
    [(0, "even"), (15, "even"), (29, "even"), (30, "odd"), (45, "odd"), (59, "odd")],
)
def test_parity_group(minute: int, group: str) -> None:
    """parity: minutes 0-29 check even class numbers, 30-59 odd ones."""
    assert group_for(datetime(2025, 1, 15, 10, minute, tzinfo=PHOENIX), "parity") == group


@given(at=st.datetimes(timezones=st.sampled_from([PHOENIX, NEW_YORK, UTC])))
def test_group_none_is_all(at: datetime) -> None:
    """stagger 'none' checks every section at every tick."""
    assert group_for(at, "none") == "all"


@given(at=st.datetimes(timezones=st.sampled_from([PHOENIX, NEW_YORK, ZoneInfo("Asia/Kolkata")])))
def test_parity_uses_local_minute(at: datetime) -> None:
    """The parity group follows the slot's wall-clock minute in its zone."""
    assert group_for(at, "parity") == ("even" if at.minute < 30 else "odd")


def test_default_cron_alternates_groups() -> None:
    """With the default cron, consecutive ticks alternate even and odd, so each section is checked hourly."""
    slot = latest_slot(DEFAULT_CRON, PHOENIX, ts(2025, 1, 15, 0, 0))
    groups = []
    for _ in range(6):
        groups.append(group_for(slot, "parity"))
        slot = next_slot(DEFAULT_CRON, PHOENIX, slot)
    assert groups == ["even", "odd"] * 3
