"""Postgres queries: typed calls to seatwatch's SQL functions and the outbox's statements.

The pool and the outage boundary are ``store.pool``; the schema is ``store.migrations`` and ``store/sql``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from daemon.detect import PreviousState

if TYPE_CHECKING:
    from collections.abc import Sequence

    import asyncpg

logger = logging.getLogger(__name__)

# -- typed calls -------------------------------------------------------------------------------------


async def sections_to_check(conn: asyncpg.Connection | asyncpg.Pool, group: str) -> list[tuple[str, str]]:
    """(term, class_nbr) of every watched section in ``group`` (even, odd or all)."""
    rows = await conn.fetch("SELECT term, class_nbr FROM seatwatch_sections_to_check($1)", group)
    return [(r["term"], r["class_nbr"]) for r in rows]


async def observe(conn: asyncpg.Connection, term: str, class_nbr: str, data: Sequence[Any]) -> PreviousState | None:
    """Lock the section, record the observation (and its class_states mirror), return the previous state.

    The previous state carries the web app's newer ``class_states`` row of the same term as its ``snapshot``.

    ``data`` is (subject, catalog_nbr, title, instructor, seats_available, seats_capacity,
    non_reserved_seats, location, meeting_times). Must run inside the caller's transaction.
    """
    row = await conn.fetchrow(
        "SELECT * FROM seatwatch_observe_v3($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        term,
        class_nbr,
        *data,
    )
    if row is None or row["prev_source"] is None:
        return None
    snapshot = None
    if row["snap_seats_available"] is not None:
        snapshot = PreviousState(
            source="class_states",
            instructor=row["snap_instructor"],
            seats_available=row["snap_seats_available"],
            non_reserved_seats=row["snap_non_reserved_seats"],
        )
    return PreviousState(
        source=row["prev_source"],
        instructor=row["prev_instructor"],
        seats_available=row["prev_seats_available"],
        non_reserved_seats=row["prev_non_reserved_seats"],
        snapshot=snapshot,
    )


@dataclass(frozen=True)
class Claim:
    """One notification this transaction claimed: exactly one email is owed for it."""

    watch_id: str
    user_id: str
    email: str
    notification_type: str


async def claim(
    conn: asyncpg.Connection, term: str, class_nbr: str, *, reset_seat: bool, types: Sequence[str]
) -> list[Claim]:
    """Reset seat claims if asked, then claim ``types`` for every eligible watcher of the section."""
    rows = await conn.fetch(
        "SELECT * FROM seatwatch_claim($1, $2, $3, $4::text[])", term, class_nbr, reset_seat, list(types)
    )
    return [Claim(str(r["watch_id"]), str(r["user_id"]), r["email"], r["notification_type"]) for r in rows]


async def watch_courses(conn: asyncpg.Connection, watch_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Each watch's own (subject, catalog_nbr), for emails whose scraped course code was unusable."""
    rows = await conn.fetch("SELECT id, subject, catalog_nbr FROM class_watches WHERE id = ANY($1::uuid[])", watch_ids)
    return {str(r["id"]): (r["subject"], r["catalog_nbr"]) for r in rows}


@dataclass(frozen=True)
class OutboxRow:
    """One rendered email to insert into ``seatwatch_outbox``."""

    watch_id: str
    user_id: str
    notification_type: str
    term: str
    class_nbr: str
    payload: str
    unsubscribe_token: str


async def insert_outbox(conn: asyncpg.Connection, rows: Sequence[OutboxRow]) -> None:
    """Write the rendered emails in one statement, inside the caller's transaction."""
    if not rows:
        return
    await conn.execute(
        """
        INSERT INTO seatwatch_outbox
            (class_watch_id, user_id, notification_type, term, class_nbr, payload, unsubscribe_token)
        SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
        """,
        [r.watch_id for r in rows],
        [r.user_id for r in rows],
        [r.notification_type for r in rows],
        [r.term for r in rows],
        [r.class_nbr for r in rows],
        [r.payload for r in rows],
        [r.unsubscribe_token for r in rows],
    )


async def outbox_counts(conn: asyncpg.Connection | asyncpg.Pool) -> dict[str, int]:
    """Pending, failed and suppressed (kept back, last 30 days) outbox rows, and the emails sent today and this
    month (UTC, as Resend counts its quotas), for health, status and metrics."""
    row = await conn.fetchrow(
        """
        SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
               count(*) FILTER (WHERE status = 'failed') AS failed,
               count(*) FILTER (WHERE status = 'failed' AND created_at > now() - interval '24 hours') AS failed_24h,
               (SELECT count(*) FROM seatwatch_outbox_suppressed) AS suppressed,
               (SELECT count(*) FROM seatwatch_outbox
                WHERE status = 'sent' AND sent_at >= date_trunc('day', now(), 'UTC')) AS sent_today,
               (SELECT count(*) FROM seatwatch_outbox
                WHERE status = 'sent' AND sent_at >= date_trunc('month', now(), 'UTC')) AS sent_this_month
        FROM seatwatch_outbox
        WHERE status IN ('pending', 'failed')
        """
    )
    assert row is not None
    return {
        "pending": int(row["pending"]),
        "failed": int(row["failed"]),
        "failed_24h": int(row["failed_24h"]),
        "suppressed": int(row["suppressed"]),
        "sent_today": int(row["sent_today"]),
        "sent_this_month": int(row["sent_this_month"]),
    }


async def quota_paused_until(conn: asyncpg.Connection | asyncpg.Pool) -> datetime | None:
    """When a batch Resend refused for its quota goes again (the quota's reset), if one waits for that."""
    value = await conn.fetchval(
        """
        SELECT max(next_attempt_at) FROM seatwatch_outbox_batches
        WHERE status = 'pending' AND next_attempt_at > now() AND last_error LIKE '%quota_exceeded%'
        """
    )
    return value if isinstance(value, datetime) else None


async def adaptive_sections(conn: asyncpg.Connection | asyncpg.Pool) -> list[asyncpg.Record]:
    """Every watched (term, class_nbr) with its waiting watchers and last check and change (adaptive planner)."""
    return list(await conn.fetch("SELECT * FROM seatwatch_adaptive_sections()"))


async def adaptive_counts(conn: asyncpg.Connection | asyncpg.Pool) -> tuple[int, int]:
    """How many sections are watched, and how many of them have someone an opening would email now."""
    row = await conn.fetchrow(
        "SELECT count(*) AS watched, count(*) FILTER (WHERE waiting > 0) AS hot FROM seatwatch_adaptive_sections()"
    )
    return (int(row["watched"]), int(row["hot"])) if row is not None else (0, 0)
