"""Rows the web app would have written: users, profiles, watches, legacy class_states."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncpg


async def add_user(db: asyncpg.Pool | asyncpg.Connection, email: str, **profile: Any) -> str:
    """An auth.users row, with a user_profiles row when ``profile`` flags are given."""
    user_id = str(uuid.uuid4())
    await db.execute("INSERT INTO auth.users (id, email) VALUES ($1, $2)", user_id, email)
    if profile:
        columns = ", ".join(["user_id", *profile])
        placeholders = ", ".join(f"${i}" for i in range(1, len(profile) + 2))
        await db.execute(f"INSERT INTO user_profiles ({columns}) VALUES ({placeholders})", user_id, *profile.values())
    return user_id


async def add_watch(
    db: asyncpg.Pool | asyncpg.Connection,
    user_id: str,
    term: str,
    class_nbr: str,
    *,
    subject: str = "CSE",
    catalog_nbr: str = "240",
) -> str:
    watch_id = await db.fetchval(
        "INSERT INTO class_watches (user_id, term, subject, catalog_nbr, class_nbr) VALUES ($1, $2, $3, $4, $5) "
        "RETURNING id",
        user_id,
        term,
        subject,
        catalog_nbr,
        class_nbr,
    )
    return str(watch_id)


async def add_legacy_state(
    db: asyncpg.Pool | asyncpg.Connection,
    term: str,
    class_nbr: str,
    *,
    seats: int = 0,
    non_reserved: int | None = None,
    instructor: str = "Staff",
) -> None:
    """A class_states row as the original app (or the web app's watch creation) left it."""
    await db.execute(
        "INSERT INTO class_states (term, subject, catalog_nbr, class_nbr, title, instructor_name, seats_available, "
        "seats_capacity, non_reserved_seats) VALUES ($1, 'CSE', '240', $2, 'Intro', $3, $4, 30, $5)",
        term,
        class_nbr,
        instructor,
        seats,
        non_reserved,
    )


async def web_app_writes(
    db: asyncpg.Pool | asyncpg.Connection,
    term: str,
    class_nbr: str,
    *,
    seats: int,
    non_reserved: int | None = None,
    instructor: str = "Staff",
) -> None:
    """The web app's own scrape of a section (a student added a watch): an upsert of its class_states row."""
    await db.execute(
        "INSERT INTO class_states (term, subject, catalog_nbr, class_nbr, title, instructor_name, seats_available, "
        "seats_capacity, non_reserved_seats, last_checked_at) VALUES ($1, 'CSE', '240', $2, 'Intro', $3, $4, 30, $5, "
        "now()) ON CONFLICT (class_nbr) DO UPDATE SET term = EXCLUDED.term, "
        "instructor_name = EXCLUDED.instructor_name, "
        "seats_available = EXCLUDED.seats_available, non_reserved_seats = EXCLUDED.non_reserved_seats, "
        "last_checked_at = now()",
        term,
        class_nbr,
        instructor,
        seats,
        non_reserved,
    )


async def clear(db: asyncpg.Pool | asyncpg.Connection) -> None:
    """Empty every table the tests write, so tests in one module do not see each other."""
    await db.execute(
        "TRUNCATE seatwatch_outbox, seatwatch_outbox_batches, seatwatch_outbox_suppressed, seatwatch_section_states, "
        "notifications_sent, class_watches, class_states, user_profiles, auth.users CASCADE"
    )
    await db.execute("TRUNCATE seatwatch_adaptive_plan, seatwatch_adaptive_minutes, seatwatch_adaptive_daemons")


async def watched(pool: asyncpg.Pool, class_nbrs: list[str], *, per_section: int = 1, term: str = "2261") -> list[str]:
    """Watchers for each section, with legacy rows saying the section is full (so an opening notifies)."""
    emails = []
    for class_nbr in class_nbrs:
        for i in range(per_section):
            email = f"s{class_nbr}-{i}@example.edu"
            await add_watch(pool, await add_user(pool, email), term, class_nbr)
            emails.append(email)
        await add_legacy_state(pool, term, class_nbr, seats=0)
    return sorted(emails)


async def owed_emails(pool: asyncpg.Pool, n: int) -> None:
    """``n`` pending outbox rows, each to travel alone (so each is its own batch), with the claims that owe them."""
    await clear(pool)
    for i in range(n):
        user = await add_user(pool, f"o{i}@example.edu")
        watch = await add_watch(pool, user, "2261", f"1244{i}")
        await pool.execute(
            "INSERT INTO notifications_sent (class_watch_id, notification_type) VALUES ($1, 'seat_available')", watch
        )
        payload = (
            f'{{"from":"n@pickmyclass.test","to":["o{i}@example.edu"],"subject":"s","html":"h","text":"t",'
            '"headers":{}}'
        )
        await pool.execute(
            "INSERT INTO seatwatch_outbox (class_watch_id, user_id, notification_type, term, class_nbr, payload, "
            "unsubscribe_token, solo) VALUES ($1, $2, 'seat_available', '2261', $3, $4, 'tok', true)",
            watch,
            user,
            f"1244{i}",
            payload,
        )
