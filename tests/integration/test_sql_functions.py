"""The SQL functions on a migrated database: the web app's legacy ones as they were, and seatwatch's own.

Rows go straight into auth.users, user_profiles and class_watches. Tests share one database per module, so
each uses its own terms and class numbers (a counter makes class numbers unique within the session).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import pytest

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

SEAT: Final = "seat_available"
INSTRUCTOR: Final = "instructor_assigned"
BOTH: Final = (SEAT, INSTRUCTOR)

_numbers = itertools.count(1000)


def new_term() -> str:
    """A term no other test uses."""
    return f"T{uuid.uuid4().hex[:7]}"


def new_class_nbr(last: str = "1") -> str:
    """A class number no other test uses, ending in ``last``."""
    return f"{next(_numbers):04d}{last}"


@pytest.fixture
async def conn(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as connection:
        yield connection


PROFILE_COLUMNS: Final = {"notifications_enabled", "email_bounced", "spam_complained", "is_disabled"}


async def add_user(conn: asyncpg.Connection, *, email: str | None = "", profile: dict[str, bool] | None = None) -> str:
    """A user in auth.users (email made up unless given; None for none), with a profile row if ``profile``."""
    user_id = str(uuid.uuid4())
    address = f"u-{user_id[:8]}@example.edu" if email == "" else email
    await conn.execute("INSERT INTO auth.users (id, email) VALUES ($1, $2)", user_id, address)
    if profile is not None:
        assert set(profile) <= PROFILE_COLUMNS
        columns = ["user_id", *profile]
        placeholders = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
        await conn.execute(
            f"INSERT INTO user_profiles ({', '.join(columns)}) VALUES ({placeholders})", user_id, *profile.values()
        )
    return user_id


async def set_email(conn: asyncpg.Connection, user_id: str, email: str | None) -> None:
    await conn.execute("UPDATE auth.users SET email = $2 WHERE id = $1", user_id, email)


async def add_watch(conn: asyncpg.Connection, user_id: str, term: str, class_nbr: str) -> str:
    watch_id = await conn.fetchval(
        """
        INSERT INTO class_watches (user_id, term, subject, catalog_nbr, class_nbr)
        VALUES ($1, $2, 'CSE', '110', $3) RETURNING id
        """,
        user_id,
        term,
        class_nbr,
    )
    return str(watch_id)


# The users get_watchers_for_sections and seatwatch_claim must skip, and two they must keep.
AUDIENCE: Final[dict[str, dict[str, bool] | None]] = {
    "no_profile": None,
    "default_profile": {},
    "notifications_off": {"notifications_enabled": False},
    "bounced": {"email_bounced": True},
    "complained": {"spam_complained": True},
    "disabled": {"is_disabled": True},
}
KEPT: Final = {"no_profile", "default_profile"}


async def add_audience(conn: asyncpg.Connection, term: str, class_nbr: str) -> dict[str, tuple[str, str]]:
    """One watcher of (term, class_nbr) per AUDIENCE entry: label -> (user_id, watch_id)."""
    found = {}
    for label, profile in AUDIENCE.items():
        user_id = await add_user(conn, profile=profile)
        found[label] = (user_id, await add_watch(conn, user_id, term, class_nbr))
    return found


async def email_of(conn: asyncpg.Connection, user_id: str) -> str:
    return str(await conn.fetchval("SELECT email FROM auth.users WHERE id = $1", user_id))


async def wait_until_blocked(pool: asyncpg.Pool, pid: int, timeout_s: float = 10) -> None:
    """Wait until backend ``pid`` waits on a lock (a row, a tuple or an advisory lock)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await pool.fetchval("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid) == "Lock":
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"backend {pid} never waited on a lock")


# -- sections to check ---------------------------------------------------------------------------------


async def legacy_sections(conn: asyncpg.Connection, group: str, term: str) -> list[str]:
    rows = await conn.fetch("SELECT class_nbr, term FROM get_sections_to_check($1)", group)
    return [r["class_nbr"] for r in rows if r["term"] == term]


async def seatwatch_sections(conn: asyncpg.Connection, group: str, terms: Sequence[str]) -> list[tuple[str, str]]:
    rows = await conn.fetch("SELECT term, class_nbr FROM seatwatch_sections_to_check($1)", group)
    return [(r["term"], r["class_nbr"]) for r in rows if r["term"] in terms]


async def add_parity_watches(conn: asyncpg.Connection, term: str) -> dict[str, str]:
    """Watches in ``term`` on class numbers ending in each digit and in a letter: ending -> class_nbr."""
    user = await add_user(conn)
    other = await add_user(conn)
    numbers = {last: new_class_nbr(last) for last in "0123456789A"}
    for class_nbr in numbers.values():
        await add_watch(conn, user, term, class_nbr)
    await add_watch(conn, other, term, numbers["4"])  # two watchers, one section
    return numbers


async def test_legacy_sections_to_check_splits_by_last_digit(conn: asyncpg.Connection) -> None:
    """Legacy get_sections_to_check splits by last digit, a non-digit ending in neither group; others: all."""
    term = new_term()
    numbers = await add_parity_watches(conn, term)

    assert await legacy_sections(conn, "even", term) == sorted(numbers[d] for d in "02468")
    assert await legacy_sections(conn, "odd", term) == sorted(numbers[d] for d in "13579")
    assert await legacy_sections(conn, "all", term) == sorted(numbers.values())
    assert await legacy_sections(conn, "whatever", term) == sorted(numbers.values())


async def test_seatwatch_sections_to_check_counts_non_digit_endings_as_even(conn: asyncpg.Connection) -> None:
    """seatwatch_sections_to_check splits by last digit, counting a non-digit ending as even; 'all' is all."""
    term = new_term()
    numbers = await add_parity_watches(conn, term)

    assert await seatwatch_sections(conn, "even", [term]) == sorted((term, numbers[d]) for d in "02468A")
    assert await seatwatch_sections(conn, "odd", [term]) == sorted((term, numbers[d]) for d in "13579")
    assert await seatwatch_sections(conn, "all", [term]) == sorted((term, n) for n in numbers.values())


async def test_seatwatch_sections_to_check_returns_each_term_of_a_class(conn: asyncpg.Connection) -> None:
    """seatwatch_sections_to_check returns distinct (term, class_nbr): one class in two terms comes twice."""
    fall, spring = sorted([new_term(), new_term()])
    class_nbr = new_class_nbr("3")
    first, second = await add_user(conn), await add_user(conn)
    await add_watch(conn, first, fall, class_nbr)
    await add_watch(conn, second, fall, class_nbr)
    await add_watch(conn, first, spring, class_nbr)

    expected = [(fall, class_nbr), (spring, class_nbr)]
    assert await seatwatch_sections(conn, "odd", [fall, spring]) == expected
    assert await seatwatch_sections(conn, "all", [fall, spring]) == expected
    assert await seatwatch_sections(conn, "even", [fall, spring]) == []


@pytest.mark.parametrize("group", ["EVEN", "none", "", "even ", None])
async def test_seatwatch_sections_to_check_rejects_unknown_group(conn: asyncpg.Connection, group: str | None) -> None:
    """seatwatch_sections_to_check raises for any group but 'even', 'odd' or 'all', NULL included."""
    await add_watch(conn, await add_user(conn), new_term(), new_class_nbr("1"))
    with pytest.raises(asyncpg.RaiseError, match="group"):
        await conn.fetch("SELECT * FROM seatwatch_sections_to_check($1)", group)


# -- get_watchers_for_sections -------------------------------------------------------------------------


async def test_get_watchers_for_sections_skips_opted_out_users(conn: asyncpg.Connection) -> None:
    """get_watchers_for_sections drops muted/bounced/complained/disabled users, keeps profileless, any term."""
    term = new_term()
    first, second, unasked = new_class_nbr(), new_class_nbr(), new_class_nbr()
    audience = await add_audience(conn, term, first)
    other_term_user = await add_user(conn)
    other_term_watch = await add_watch(conn, other_term_user, new_term(), first)
    second_user = await add_user(conn, profile={})
    second_watch = await add_watch(conn, second_user, term, second)
    await add_watch(conn, await add_user(conn), term, unasked)

    rows = await conn.fetch("SELECT * FROM get_watchers_for_sections($1::text[])", [second, first])

    expected = sorted(
        [(audience[label][0], audience[label][1], first) for label in KEPT]
        + [(other_term_user, other_term_watch, first), (second_user, second_watch, second)],
        key=lambda r: (r[2], r[0]),
    )
    assert [(str(r["user_id"]), str(r["watch_id"]), r["class_nbr"]) for r in rows] == expected
    for r in rows:
        assert r["email"] == await email_of(conn, str(r["user_id"]))


# -- try_record_notification ---------------------------------------------------------------------------


async def test_try_record_notification_claims_once_even_after_expiry(conn: asyncpg.Connection) -> None:
    """try_record_notification is true once, then false, still false after expiry (quirk) until deleted."""
    watch = await add_watch(conn, await add_user(conn), new_term(), new_class_nbr())

    assert await conn.fetchval("SELECT try_record_notification($1, $2)", watch, SEAT) is True
    assert await conn.fetchval("SELECT try_record_notification($1, $2)", watch, SEAT) is False
    await conn.execute(
        "UPDATE notifications_sent SET expires_at = now() - interval '1 minute' WHERE class_watch_id = $1", watch
    )
    assert await conn.fetchval("SELECT try_record_notification($1, $2)", watch, SEAT) is False

    assert await conn.fetchval("SELECT try_record_notification($1, $2, 2)", watch, INSTRUCTOR) is True
    lifetime = await conn.fetchval(
        "SELECT expires_at - sent_at FROM notifications_sent WHERE class_watch_id = $1 AND notification_type = $2",
        watch,
        INSTRUCTOR,
    )
    assert lifetime.total_seconds() == 2 * 3600

    await conn.execute(
        "DELETE FROM notifications_sent WHERE class_watch_id = $1 AND notification_type = $2", watch, SEAT
    )
    assert await conn.fetchval("SELECT try_record_notification($1, $2)", watch, SEAT) is True


@pytest.mark.parametrize(("notification_type", "hours"), [("seat", 24), ("email", 24), (SEAT, 0), (SEAT, 169)])
async def test_try_record_notification_rejects_bad_arguments(
    conn: asyncpg.Connection, notification_type: str, hours: int
) -> None:
    """try_record_notification raises for an unknown type or an expiry outside 1..168 hours, recording nothing."""
    watch = await add_watch(conn, await add_user(conn), new_term(), new_class_nbr())
    with pytest.raises(asyncpg.RaiseError):
        await conn.fetchval("SELECT try_record_notification($1, $2, $3)", watch, notification_type, hours)
    assert await conn.fetchval("SELECT count(*) FROM notifications_sent WHERE class_watch_id = $1", watch) == 0


# -- seatwatch_claim -----------------------------------------------------------------------------------

Claimed = list[tuple[str, str, str, str]]


async def claim(
    conn: asyncpg.Connection, term: str, class_nbr: str, types: Sequence[str] = (SEAT,), *, reset_seat: bool = False
) -> Claimed:
    """seatwatch_claim's rows as (watch_id, user_id, email, notification_type), sorted."""
    rows = await conn.fetch(
        "SELECT * FROM seatwatch_claim($1, $2, $3, $4::text[])", term, class_nbr, reset_seat, list(types)
    )
    return sorted((str(r["watch_id"]), str(r["user_id"]), r["email"], r["notification_type"]) for r in rows)


async def claims_of(conn: asyncpg.Connection, *watch_ids: str) -> set[tuple[str, str]]:
    rows = await conn.fetch(
        "SELECT class_watch_id, notification_type FROM notifications_sent WHERE class_watch_id = ANY($1::uuid[])",
        list(watch_ids),
    )
    return {(str(r["class_watch_id"]), r["notification_type"]) for r in rows}


async def test_claim_takes_each_watch_and_type_once(conn: asyncpg.Connection) -> None:
    """seatwatch_claim claims each (watch, type) once for 24 hours, with watcher and email; then nothing."""
    term, class_nbr = new_term(), new_class_nbr()
    users = [await add_user(conn), await add_user(conn)]
    watches = [await add_watch(conn, user, term, class_nbr) for user in users]

    first = await claim(conn, term, class_nbr, BOTH)

    emails = [await email_of(conn, user) for user in users]
    assert first == sorted(
        (watch, user, email, kind) for watch, user, email in zip(watches, users, emails, strict=True) for kind in BOTH
    )
    assert await claim(conn, term, class_nbr, BOTH) == []
    lifetimes = await conn.fetch(
        "SELECT expires_at - sent_at AS lifetime FROM notifications_sent WHERE class_watch_id = ANY($1::uuid[])",
        watches,
    )
    assert [r["lifetime"].total_seconds() for r in lifetimes] == [24 * 3600] * 4


async def test_claim_retakes_an_expired_claim(conn: asyncpg.Connection) -> None:
    """seatwatch_claim re-takes a claim whose expires_at has passed, renewing its row; live claims stay taken."""
    term, class_nbr = new_term(), new_class_nbr()
    user = await add_user(conn)
    watch = await add_watch(conn, user, term, class_nbr)
    assert len(await claim(conn, term, class_nbr, BOTH)) == 2
    await conn.execute(
        "UPDATE notifications_sent SET expires_at = now() - interval '1 second' "
        "WHERE class_watch_id = $1 AND notification_type = $2",
        watch,
        SEAT,
    )

    assert await claim(conn, term, class_nbr, BOTH) == [(watch, user, await email_of(conn, user), SEAT)]
    row = await conn.fetchrow(
        "SELECT count(*) AS n, bool_and(expires_at > now()) AS live FROM notifications_sent WHERE class_watch_id = $1",
        watch,
    )
    assert row is not None
    assert (row["n"], row["live"]) == (2, True)
    assert await claim(conn, term, class_nbr, BOTH) == []


async def test_claim_reset_deletes_only_this_sections_seat_claims(conn: asyncpg.Connection) -> None:
    """reset_seat deletes only the seat claims of this (term, class_nbr): not instructor, other term or class."""
    term, other_term = new_term(), new_term()
    class_nbr, other_class = new_class_nbr(), new_class_nbr()
    user = await add_user(conn)
    here = await add_watch(conn, user, term, class_nbr)
    elsewhere_term = await add_watch(conn, await add_user(conn), other_term, class_nbr)
    elsewhere_class = await add_watch(conn, await add_user(conn), term, other_class)
    for section in [(term, class_nbr), (other_term, class_nbr), (term, other_class)]:
        assert len(await claim(conn, *section, BOTH)) == 2

    assert await claim(conn, term, class_nbr, [], reset_seat=True) == []

    everything = {(w, kind) for w in (here, elsewhere_term, elsewhere_class) for kind in BOTH}
    assert await claims_of(conn, here, elsewhere_term, elsewhere_class) == everything - {(here, SEAT)}
    # The next opening notifies again; a reset in the same call comes before the claim.
    email = await email_of(conn, user)
    assert await claim(conn, term, class_nbr, [SEAT]) == [(here, user, email, SEAT)]
    assert await claim(conn, term, class_nbr, [SEAT], reset_seat=True) == [(here, user, email, SEAT)]
    assert await claims_of(conn, here, elsewhere_term, elsewhere_class) == everything


async def test_claim_matches_term_and_class_nbr(conn: asyncpg.Connection) -> None:
    """seatwatch_claim picks watches on term and class_nbr: not the class in another term, not another class."""
    term, other_term = new_term(), new_term()
    class_nbr, other_class = new_class_nbr(), new_class_nbr()
    user, in_other_term, in_other_class = await add_user(conn), await add_user(conn), await add_user(conn)
    watch = await add_watch(conn, user, term, class_nbr)
    other_term_watch = await add_watch(conn, in_other_term, other_term, class_nbr)
    await add_watch(conn, in_other_class, term, other_class)

    assert await claim(conn, term, class_nbr) == [(watch, user, await email_of(conn, user), SEAT)]
    assert await claim(conn, other_term, class_nbr) == [
        (other_term_watch, in_other_term, await email_of(conn, in_other_term), SEAT)
    ]


async def test_claim_skips_opted_out_users_and_missing_emails(conn: asyncpg.Connection) -> None:
    """seatwatch_claim skips muted/bounced/complained/disabled users and missing emails; profileless kept."""
    term, class_nbr = new_term(), new_class_nbr()
    audience = await add_audience(conn, term, class_nbr)
    no_email = await add_user(conn, email=None)
    blank_email = await add_user(conn, profile={})
    await set_email(conn, blank_email, "")
    silent = [await add_watch(conn, no_email, term, class_nbr), await add_watch(conn, blank_email, term, class_nbr)]

    claimed = await claim(conn, term, class_nbr, BOTH)

    kept = [(audience[label][1], audience[label][0], await email_of(conn, audience[label][0])) for label in KEPT]
    assert claimed == sorted((*watcher, kind) for watcher in kept for kind in BOTH)
    skipped = [audience[label][1] for label in AUDIENCE if label not in KEPT] + silent
    assert await claims_of(conn, *skipped) == set()


@pytest.mark.parametrize("first_outcome", ["commit", "rollback"])
@pytest.mark.parametrize("prior", ["none", "expired"])
async def test_claim_is_exclusive_between_concurrent_transactions(
    pool: asyncpg.Pool, conn: asyncpg.Connection, first_outcome: str, prior: str
) -> None:
    """A concurrent second claim waits: gets nothing if the first commits, everything if it rolls back."""
    term, class_nbr = new_term(), new_class_nbr()
    users = [await add_user(conn), await add_user(conn)]
    for user in users:
        await add_watch(conn, user, term, class_nbr)
    if prior == "expired":
        assert len(await claim(conn, term, class_nbr, BOTH)) == 4
        await conn.execute(
            "UPDATE notifications_sent SET expires_at = now() - interval '1 second' "
            "WHERE class_watch_id IN (SELECT id FROM class_watches WHERE term = $1)",
            term,
        )

    async with pool.acquire() as first_conn, pool.acquire() as second_conn:
        first_tx = first_conn.transaction()
        await first_tx.start()
        first = await claim(first_conn, term, class_nbr, BOTH)
        second_tx = second_conn.transaction()
        await second_tx.start()
        second_task = asyncio.create_task(claim(second_conn, term, class_nbr, BOTH))
        await wait_until_blocked(pool, second_conn.get_server_pid())
        if first_outcome == "commit":
            await first_tx.commit()
        else:
            await first_tx.rollback()
        second = await asyncio.wait_for(second_task, 10)
        await second_tx.commit()

    assert len(first) == 4
    assert second == ([] if first_outcome == "commit" else first)


async def test_racing_claims_never_take_a_claim_twice(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    """Several concurrent transactions claiming one section take each (watch, type) exactly once in total."""
    term, class_nbr = new_term(), new_class_nbr()
    watches = [await add_watch(conn, await add_user(conn), term, class_nbr) for _ in range(5)]

    async def one() -> Claimed:
        async with pool.acquire() as racer, racer.transaction():
            return await claim(racer, term, class_nbr, BOTH)

    results = await asyncio.gather(*(one() for _ in range(6)))

    taken = [(watch, kind) for result in results for watch, _user, _email, kind in result]
    assert sorted(taken) == sorted((watch, kind) for watch in watches for kind in BOTH)


# -- seatwatch_observe ---------------------------------------------------------------------------------

BASE: Final[dict[str, Any]] = {
    "subject": "CSE",
    "catalog_nbr": "110",
    "title": "Principles of Programming",
    "instructor": "Staff",
    "seats_available": 0,
    "seats_capacity": 150,
    "non_reserved_seats": None,
    "location": "BYENG 210",
    "meeting_times": "MWF 9:00AM-9:50AM",
}


async def observe(conn: asyncpg.Connection, term: str, class_nbr: str, **changes: Any) -> tuple[Any, ...]:
    """seatwatch_observe_v3 (the pipeline's) with BASE overridden by ``changes``.

    Returns (source, instructor, seats, non-reserved) of the previous state.
    """
    data = {**BASE, **changes}
    row = await conn.fetchrow(
        "SELECT * FROM seatwatch_observe_v3($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        term,
        class_nbr,
        *data.values(),
    )
    assert row is not None
    return (row["prev_source"], row["prev_instructor"], row["prev_seats_available"], row["prev_non_reserved_seats"])


NOTHING: Final = (None, None, None, None)


async def add_class_state(conn: asyncpg.Connection, term: str, class_nbr: str, **values: Any) -> None:
    row = {
        "term": term,
        "subject": "CSE",
        "catalog_nbr": "110",
        "class_nbr": class_nbr,
        "instructor_name": "Staff",
        "seats_available": 0,
        "seats_capacity": 150,
        **values,
    }
    placeholders = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    await conn.execute(f"INSERT INTO class_states ({', '.join(row)}) VALUES ({placeholders})", *row.values())


async def test_observe_returns_nothing_first_then_the_previous_observation(conn: asyncpg.Connection) -> None:
    """seatwatch_observe returns no previous state for a first observation, then each time the one before."""
    term, class_nbr = new_term(), new_class_nbr()

    assert await observe(conn, term, class_nbr) == NOTHING
    assert await observe(conn, term, class_nbr, instructor="Ada L", seats_available=5, non_reserved_seats=3) == (
        "seatwatch",
        "Staff",
        0,
        None,
    )
    assert await observe(conn, term, class_nbr, seats_available=0) == ("seatwatch", "Ada L", 5, 3)


async def test_observe_takes_the_class_states_row_of_the_same_term(conn: asyncpg.Connection) -> None:
    """Without its own row, seatwatch_observe returns the same-term class_states row as previous state."""
    term, class_nbr = new_term(), new_class_nbr()
    await add_class_state(conn, term, class_nbr, instructor_name="Staff", seats_available=2, non_reserved_seats=0)

    assert await observe(conn, term, class_nbr, seats_available=4) == ("class_states", "Staff", 2, 0)
    assert await observe(conn, term, class_nbr) == ("seatwatch", "Staff", 4, None)


async def test_observe_ignores_a_class_states_row_of_another_term(conn: asyncpg.Connection) -> None:
    """A class_states row of another term is no previous state; the mirror row then takes the new term."""
    term, class_nbr = new_term(), new_class_nbr()
    await add_class_state(conn, new_term(), class_nbr, seats_available=7)

    assert await observe(conn, term, class_nbr) == NOTHING
    assert await conn.fetchval("SELECT term FROM class_states WHERE class_nbr = $1", class_nbr) == term


STATE_FIELDS: Final = (
    "subject",
    "catalog_nbr",
    "title",
    "instructor_name",
    "seats_available",
    "seats_capacity",
    "non_reserved_seats",
    "location",
    "meeting_times",
)


async def test_observe_mirrors_every_field_into_class_states(conn: asyncpg.Connection) -> None:
    """seatwatch_observe writes every field to its own row and to class_states, latest of any term wins."""
    fall, spring, class_nbr = new_term(), new_term(), new_class_nbr()
    fall_data = {**BASE, "instructor": "Ada L", "seats_available": 3, "non_reserved_seats": 1}
    spring_data = {
        "subject": "MAT",
        "catalog_nbr": "265",
        "title": "Calculus III",
        "instructor": "Staff",
        "seats_available": 0,
        "seats_capacity": 40,
        "non_reserved_seats": None,
        "location": None,
        "meeting_times": None,
    }

    def expected(term: str, data: dict[str, Any]) -> dict[str, Any]:
        values = dict(zip(STATE_FIELDS, data.values(), strict=True))
        return {"term": term, "class_nbr": class_nbr, **values, "checked_now": True}

    select = ", ".join(["term", "class_nbr", *STATE_FIELDS, "last_checked_at = now() AS checked_now"])
    for term, data in [(fall, fall_data), (spring, spring_data)]:
        async with conn.transaction():
            await observe(conn, term, class_nbr, **data)
            mirror = await conn.fetch(f"SELECT {select} FROM class_states WHERE class_nbr = $1", class_nbr)
            own = await conn.fetchrow(
                f"SELECT {select} FROM seatwatch_section_states WHERE term = $1 AND class_nbr = $2", term, class_nbr
            )
        assert [dict(r) for r in mirror] == [expected(term, data)]
        assert own is not None
        assert dict(own) == expected(term, data)

    kept = await conn.fetchrow(
        f"SELECT {', '.join(STATE_FIELDS)} FROM seatwatch_section_states WHERE term = $1 AND class_nbr = $2",
        fall,
        class_nbr,
    )
    assert kept is not None
    assert tuple(kept) == tuple(fall_data.values())


async def test_observe_v2_fills_unknown_course_code_and_keeps_the_known_instructor(conn: asyncpg.Connection) -> None:
    """Unknown subject/catalog fall back to the previous, else ''; an unknown instructor keeps the known name."""
    term, class_nbr = new_term(), new_class_nbr()
    assert await observe(conn, term, class_nbr, subject=None, catalog_nbr=None, instructor=None) == NOTHING
    row = await conn.fetchrow(
        "SELECT subject, catalog_nbr, instructor_name FROM seatwatch_section_states WHERE term = $1 AND class_nbr = $2",
        term,
        class_nbr,
    )
    assert row is not None
    assert tuple(row) == ("", "", None)
    await observe(conn, term, class_nbr)  # CSE 110, Staff
    assert await observe(conn, term, class_nbr, subject=None, catalog_nbr=None, instructor=None) == (
        "seatwatch",
        "Staff",
        0,
        None,
    )
    for table in ("seatwatch_section_states", "class_states"):
        kept = await conn.fetchrow(
            f"SELECT subject, catalog_nbr, instructor_name FROM {table} WHERE term = $1 AND class_nbr = $2",
            term,
            class_nbr,
        )
        assert kept is not None
        assert tuple(kept) == ("CSE", "110", "Staff")


async def test_observe_mirror_fires_the_class_states_trigger(conn: asyncpg.Connection) -> None:
    """The class_states mirror goes through its trigger: last_changed_at moves on seats/instructor only."""
    term, class_nbr = new_term(), new_class_nbr()
    await observe(conn, term, class_nbr)

    async def mirror_changed(**changes: Any) -> bool:
        await conn.execute("UPDATE class_states SET last_changed_at = '2000-01-01Z' WHERE class_nbr = $1", class_nbr)
        async with conn.transaction():
            await observe(conn, term, class_nbr, **changes)
            row = await conn.fetchrow(
                "SELECT last_changed_at = now() AS changed, last_checked_at = now() AS checked "
                "FROM class_states WHERE class_nbr = $1",
                class_nbr,
            )
        assert row is not None
        assert row["checked"]
        return bool(row["changed"])

    assert await mirror_changed(location="COOR 170") is False
    assert await mirror_changed(seats_available=2) is True
    assert await mirror_changed(seats_available=2, instructor="Ada L") is True
    assert await mirror_changed(seats_available=2, instructor="Ada L", title="Renamed") is False


@pytest.mark.parametrize(
    ("change", "moves"),
    [
        ({"seats_available": 4}, True),
        ({"non_reserved_seats": 0}, True),
        ({"instructor": "Ada L"}, True),
        ({"instructor": None}, False),  # unknown: the known instructor is kept (issue 9)
        ({"location": "COOR 170"}, False),
        ({"title": "Renamed"}, False),
        ({"meeting_times": "TTh 1:30PM-2:45PM"}, False),
        ({"seats_capacity": 99}, False),
        ({}, False),
    ],
)
async def test_observe_moves_its_own_changed_at_only_on_seats_or_instructor(
    conn: asyncpg.Connection, change: dict[str, Any], moves: bool
) -> None:
    """seatwatch's last_changed_at moves only on a seats, non-reserved or instructor change; checked_at always."""
    term, class_nbr = new_term(), new_class_nbr()
    await observe(conn, term, class_nbr)
    await conn.execute(
        "UPDATE seatwatch_section_states SET last_changed_at = '2000-01-01Z', last_checked_at = '2000-01-01Z' "
        "WHERE term = $1 AND class_nbr = $2",
        term,
        class_nbr,
    )

    async with conn.transaction():
        await observe(conn, term, class_nbr, **change)
        row = await conn.fetchrow(
            "SELECT last_changed_at = now() AS changed, last_checked_at = now() AS checked "
            "FROM seatwatch_section_states WHERE term = $1 AND class_nbr = $2",
            term,
            class_nbr,
        )
    assert row is not None
    assert (row["changed"], row["checked"]) == (moves, True)


async def test_observe_serialises_checks_of_a_section(pool: asyncpg.Pool) -> None:
    """A second observation waits for the first's commit and sees its values, even for a first observation."""
    term, class_nbr = new_term(), new_class_nbr()
    async with pool.acquire() as first_conn, pool.acquire() as second_conn:
        async with first_conn.transaction():
            assert await observe(first_conn, term, class_nbr, seats_available=0) == NOTHING
            second_task = asyncio.create_task(observe(second_conn, term, class_nbr, seats_available=6))
            await wait_until_blocked(pool, second_conn.get_server_pid())
        assert await asyncio.wait_for(second_task, 10) == ("seatwatch", "Staff", 0, None)
