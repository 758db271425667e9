"""Retention (`seatwatch prune [--dry-run]`, the daemon's daily run) on real Postgres: what the privacy policy
promises goes, nothing the web app still shows or seatwatch still needs does."""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Final

import anyio

from daemon.checks.pruner import Pruner
from daemon.store import prune_queries
from tests.support.procs import run_cli
from tests.support.seed import add_user, add_watch, clear

if TYPE_CHECKING:
    import asyncpg

TERM: Final = "2261"


async def seed(pool: asyncpg.Pool) -> dict[str, int]:
    """Rows each rule must delete (``old_*``) beside rows it must keep; the expected deletions per table."""
    await clear(pool)
    await pool.execute("TRUNCATE seatwatch_outbox_suppressed")
    user = await add_user(pool, "kept@example.edu")
    watched = await add_watch(pool, user, TERM, "10001")
    owed = await add_watch(pool, user, TERM, "10002")
    recent = await add_watch(pool, user, TERM, "10003")
    claims = [
        # (watch, type, sent days ago, expires days ago)
        (watched, "seat_available", 400, 399),  # old, expired, nothing owed: goes
        (watched, "instructor_assigned", 200, 199),  # under a year: stays
        (owed, "seat_available", 400, 399),  # an email still owed rests on it: stays
        (recent, "seat_available", 1, -1),  # live: stays
    ]
    for watch, kind, sent_days, expires_days in claims:
        await pool.execute(
            "INSERT INTO notifications_sent (class_watch_id, notification_type, sent_at, expires_at) "
            "VALUES ($1, $2, now() - make_interval(days => $3), now() - make_interval(days => $4))",
            watch,
            kind,
            sent_days,
            expires_days,
        )
    await pool.execute(
        "INSERT INTO seatwatch_outbox (class_watch_id, user_id, notification_type, term, class_nbr, payload, "
        "unsubscribe_token) VALUES ($1, $2, 'seat_available', $3, '10002', '{}', 'tok')",
        owed,
        user,
        TERM,
    )
    states = [
        # (term, class_nbr, checked days ago): 20001/20002 unwatched, 10001 watched
        (TERM, "20001", 200),  # unwatched, over six months: goes
        (TERM, "20002", 30),  # unwatched, recent: stays
        (TERM, "10001", 400),  # watched: stays, however old
        ("2257", "10003", 400),  # another term's row of a watched class number: the web app shows it
    ]
    for term, class_nbr, days in states:
        await pool.execute(
            "INSERT INTO class_states (term, subject, catalog_nbr, class_nbr, seats_available, seats_capacity, "
            "last_checked_at) VALUES ($1, 'CSE', '240', $2, 0, 10, now() - make_interval(days => $3))",
            term,
            class_nbr,
            days,
        )
        await pool.execute(
            "INSERT INTO seatwatch_section_states (term, class_nbr, subject, catalog_nbr, seats_available, "
            "seats_capacity, last_checked_at) VALUES ($1, $2, 'CSE', '240', 0, 10, now() - make_interval(days => $3))",
            term,
            class_nbr,
            days,
        )
    await pool.execute(
        "INSERT INTO seatwatch_outbox_batches (key, status, created_at) "
        "VALUES ('old', 'sent', now() - interval '40 days')"
    )
    for days in (40, 2):
        await pool.execute(
            "INSERT INTO seatwatch_outbox (class_watch_id, user_id, notification_type, term, class_nbr, payload, "
            "unsubscribe_token, status, batch_key, created_at, sent_at) VALUES ($1, $2, 'seat_available', $3, '10001', "
            "'{}', 'tok', 'sent', $4, now() - make_interval(days => $5), now() - make_interval(days => $5))",
            watched,
            user,
            TERM,
            "old" if days == 40 else None,
            days,
        )
    for days in (40, 2):
        await pool.execute(
            "INSERT INTO seatwatch_outbox_suppressed (id, created_at, suppressed_at, notification_type, term, "
            "class_nbr, reason) VALUES ($1::int, now(), now() - make_interval(days => $1::int), 'seat_available', "
            "$2, '1', 'x')",
            days,
            TERM,
        )
    return {
        "notifications_sent": 1,
        "class_states": 1,
        "seatwatch_section_states": 2,  # 20001, and 2257-10003 (seatwatch's own row is per term)
        "seatwatch_outbox": 1,
        "seatwatch_outbox_batches": 1,
        "seatwatch_outbox_suppressed": 1,
    }


async def rows(pool: asyncpg.Pool) -> dict[str, int]:
    return {rule.table: int(await pool.fetchval(f"SELECT count(*) FROM {rule.table}")) for rule in prune_queries.RULES}


async def test_dry_run_prints_counts_per_table_and_deletes_nothing(pool: asyncpg.Pool, database_url: str) -> None:
    """`seatwatch prune --dry-run` names each table with the rows a prune would delete, and deletes none."""
    expected = await seed(pool)
    before = await rows(pool)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DATABASE_URL": database_url}
    shown = await asyncio.to_thread(run_cli, "prune", "--dry-run", env=env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "dry run: nothing deleted; a prune now would delete"
    counted = {line.split()[0]: int(line.split()[1]) for line in lines[1:]}
    assert counted == expected
    assert await rows(pool) == before

    done = await asyncio.to_thread(run_cli, "prune", env=env)
    assert done.returncode == 0, done.stderr
    after = await rows(pool)
    assert {table: before[table] - after[table] for table in before} == expected
    again = await prune_queries.count(pool)
    assert all(n == 0 for _, n in again)


async def test_prune_keeps_what_the_web_app_shows_and_seatwatch_needs(pool: asyncpg.Pool) -> None:
    """After a prune: watched sections' states, young or owed claims and unsent emails are all still there."""
    await seed(pool)
    async with pool.acquire() as conn:
        await prune_queries.delete(conn)
    assert sorted(r["class_nbr"] for r in await pool.fetch("SELECT class_nbr FROM class_states")) == [
        "10001",
        "10003",
        "20002",
    ]
    claims = await pool.fetch(
        "SELECT w.class_nbr, ns.notification_type FROM notifications_sent ns JOIN class_watches w "
        "ON w.id = ns.class_watch_id ORDER BY 1, 2"
    )
    assert [(r[0], r[1]) for r in claims] == [
        ("10001", "instructor_assigned"),
        ("10002", "seat_available"),
        ("10003", "seat_available"),
    ]
    assert await pool.fetchval("SELECT count(*) FROM seatwatch_outbox WHERE status = 'pending'") == 1


async def test_the_daemons_daily_run_prunes(pool: asyncpg.Pool) -> None:
    """The daemon's retention loop runs the rules (here at once) and stops when asked."""
    expected = await seed(pool)
    pruner = Pruner(pool, first_after_s=0, every_s=3600)
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(pruner.run, stopping)
        with anyio.fail_after(10):
            while pruner.last_run is None:
                await anyio.sleep(0.05)
        stopping.set()
    assert pruner.last_run is not None
    assert dict(pruner.last_run) == expected
