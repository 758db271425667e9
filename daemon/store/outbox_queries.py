"""The outbox's SQL: batches of ``seatwatch_outbox`` rows, leased, sent, retried, failed and purged.

Each function is one or two statements on a connection the caller holds (inside its transaction when the
statements must go together); the policy (when to retry, split or give up) is ``daemon.checks.outbox``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    import asyncpg


@dataclass(frozen=True)
class BatchRow:
    """One email of a batch: its row id, the stored request payload, and its notification type."""

    id: int
    payload: str
    notification_type: str


@dataclass(frozen=True)
class DueBatch:
    """A pending batch just leased: its key, the attempt this is, its age and whether it may have been sent.

    ``ambiguous``: an earlier attempt may have reached Resend, as its outcome said (no answer, a 5xx) or as
    no outcome says (an attempt started whose outcome was never recorded: not every earlier one was refused).
    """

    key: str
    attempt: int
    age_s: float
    ambiguous: bool


async def release_leases(conn: asyncpg.Connection, owner: str) -> int:
    """Free the live leases ``owner`` holds (its previous process died sending them); how many."""
    released = await conn.fetchval(
        """
        WITH freed AS (
            UPDATE seatwatch_outbox_batches SET leased_until = NULL
            WHERE status = 'pending' AND leased_by = $1 AND leased_until > now()
            RETURNING 1
        )
        SELECT count(*) FROM freed
        """,
        owner,
    )
    return int(released or 0)


async def lease_due_batch(conn: asyncpg.Connection, lease_s: float, owner: str, max_rows: int = 100) -> DueBatch | None:
    """Lease the pending batch due first that nobody holds and that has at most ``max_rows`` rows, counting an
    attempt (in the caller's transaction)."""
    row = await conn.fetchrow(
        """
        SELECT key, attempts, ambiguous OR refused < attempts AS ambiguous,
               extract(epoch FROM now() - created_at) AS age_s
        FROM seatwatch_outbox_batches b
        WHERE status = 'pending' AND next_attempt_at <= now()
          AND (leased_until IS NULL OR leased_until < now())
          AND (SELECT count(*) FROM seatwatch_outbox o WHERE o.batch_key = b.key) <= $1
        ORDER BY next_attempt_at
        LIMIT 1
        FOR UPDATE SKIP LOCKED
        """,
        max_rows,
    )
    if row is None:
        return None
    await conn.execute(
        """
        UPDATE seatwatch_outbox_batches
        SET leased_until = now() + make_interval(secs => $2), leased_by = $3, attempts = attempts + 1
        WHERE key = $1
        """,
        row["key"],
        lease_s,
        owner,
    )
    return DueBatch(row["key"], row["attempts"] + 1, float(row["age_s"]), row["ambiguous"])


async def sent_counts(conn: asyncpg.Connection | asyncpg.Pool) -> tuple[int, int]:
    """Emails sent today and this month (UTC days and months, as Resend counts its quotas)."""
    row = await conn.fetchrow(
        """
        SELECT count(*) FILTER (WHERE sent_at >= date_trunc('day', now(), 'UTC')) AS today,
               count(*) AS month
        FROM seatwatch_outbox
        WHERE status = 'sent' AND sent_at >= date_trunc('month', now(), 'UTC')
        """
    )
    return (int(row["today"]), int(row["month"])) if row is not None else (0, 0)


async def unbatched_rows(conn: asyncpg.Connection, limit: int) -> list[tuple[int, bool]]:
    """(id, solo) of up to ``limit`` pending rows in no batch, locked (in the caller's transaction)."""
    rows = await conn.fetch(
        """
        SELECT id, solo FROM seatwatch_outbox
        WHERE status = 'pending' AND batch_key IS NULL
        ORDER BY id
        LIMIT $1
        FOR UPDATE SKIP LOCKED
        """,
        limit,
    )
    return [(r["id"], r["solo"]) for r in rows]


async def create_batch(conn: asyncpg.Connection, key: str, ids: Sequence[int], lease_s: float, owner: str) -> None:
    """Record batch ``key`` (leased by ``owner``, first attempt) on rows ``ids``."""
    await conn.execute(
        """
        INSERT INTO seatwatch_outbox_batches (key, attempts, leased_until, leased_by)
        VALUES ($1, 1, now() + make_interval(secs => $2), $3)
        """,
        key,
        lease_s,
        owner,
    )
    await conn.execute("UPDATE seatwatch_outbox SET batch_key = $1 WHERE id = ANY($2::bigint[])", key, ids)


async def batch_rows(conn: asyncpg.Connection, key: str) -> list[BatchRow]:
    """The rows of batch ``key``, in id order (the same order on every attempt)."""
    rows = await conn.fetch(
        "SELECT id, payload, notification_type FROM seatwatch_outbox WHERE batch_key = $1 ORDER BY id",
        key,
    )
    return [BatchRow(r["id"], r["payload"], r["notification_type"]) for r in rows]


async def mark_sent(conn: asyncpg.Connection, key: str, row_ids: Sequence[int], provider_ids: Sequence[str]) -> None:
    """Batch ``key`` was delivered: its rows get the provider's ids."""
    await conn.execute(
        """
        UPDATE seatwatch_outbox o SET status = 'sent', sent_at = now(), provider_id = v.provider_id,
                                      last_error = NULL
        FROM unnest($1::bigint[], $2::text[]) AS v(id, provider_id)
        WHERE o.id = v.id
        """,
        list(row_ids),
        list(provider_ids),
    )
    await conn.execute(
        "UPDATE seatwatch_outbox_batches SET status = 'sent', sent_at = now(), leased_until = NULL, "
        "last_error = NULL WHERE key = $1",
        key,
    )


async def schedule_retry(
    conn: asyncpg.Connection, key: str, delay_s: float, reason: str, ambiguous: bool, *, counted: bool = True
) -> None:
    """Batch ``key`` goes again, as it is, in ``delay_s``; a refused attempt (not ``ambiguous``) is counted as such.

    ``counted=False``: this attempt does not count at all (a quota pause spends no retry).
    """
    await conn.execute(
        """
        UPDATE seatwatch_outbox_batches
        SET next_attempt_at = now() + make_interval(secs => $2), leased_until = NULL, last_error = $3,
            ambiguous = ambiguous OR $4,
            refused = refused + CASE WHEN $4 OR NOT $5 THEN 0 ELSE 1 END,
            attempts = attempts - CASE WHEN $5 OR $4 THEN 0 ELSE 1 END
        WHERE key = $1
        """,
        key,
        delay_s,
        reason,
        ambiguous,
        counted,
    )


async def ineligible(conn: asyncpg.Connection, row_ids: Sequence[int]) -> dict[int, str]:
    """Rows of ``row_ids`` no longer owed, with the reason (SPEC §7.4's send-time re-check).

    The recipient is gone or no longer eligible, the watch is gone, or, for a seat email, its claim is no
    longer the one that owed it: the section was seen full since (the fill deleted the claim; a later
    opening claimed it again and owes its own email).
    """
    rows = await conn.fetch(
        """
        SELECT o.id, CASE
            WHEN u.id IS NULL THEN 'user deleted'
            WHEN w.id IS NULL THEN 'watch deleted'
            WHEN COALESCE(p.is_disabled, false) THEN 'user disabled'
            WHEN COALESCE(p.email_bounced, false) THEN 'email bounced'
            WHEN COALESCE(p.spam_complained, false) THEN 'spam complaint'
            WHEN NOT COALESCE(p.notifications_enabled, true) AND p.unsubscribed_at IS NOT NULL THEN 'unsubscribed'
            WHEN NOT COALESCE(p.notifications_enabled, true) THEN 'notifications off'
            WHEN o.notification_type = 'seat_available' AND NOT EXISTS (
                SELECT 1 FROM notifications_sent ns
                WHERE ns.class_watch_id = o.class_watch_id AND ns.notification_type = 'seat_available'
                  AND ns.sent_at <= o.created_at
            ) THEN 'section full since'
        END AS reason
        FROM seatwatch_outbox o
        LEFT JOIN auth.users u ON u.id = o.user_id
        LEFT JOIN class_watches w ON w.id = o.class_watch_id
        LEFT JOIN user_profiles p ON p.user_id = o.user_id
        WHERE o.id = ANY($1::bigint[])
        """,
        list(row_ids),
    )
    return {r["id"]: r["reason"] for r in rows if r["reason"] is not None}


async def suppress(conn: asyncpg.Connection, reasons: dict[int, str]) -> None:
    """Move rows out of the outbox into ``seatwatch_outbox_suppressed`` with their reasons."""
    await conn.execute(
        """
        WITH gone AS (
            DELETE FROM seatwatch_outbox o
            USING unnest($1::bigint[], $2::text[]) AS v(id, reason)
            WHERE o.id = v.id
            RETURNING o.id, o.created_at, o.class_watch_id, o.user_id, o.notification_type, o.term, o.class_nbr,
                      v.reason
        )
        INSERT INTO seatwatch_outbox_suppressed
            (id, created_at, class_watch_id, user_id, notification_type, term, class_nbr, reason)
        SELECT * FROM gone
        ON CONFLICT (id) DO NOTHING
        """,
        list(reasons),
        list(reasons.values()),
    )


async def close_empty_batch(conn: asyncpg.Connection, key: str, reason: str) -> None:
    """Batch ``key`` has no rows left to send (all suppressed): it is done with."""
    await _fail_batch(conn, key, reason)


async def retire_batch(conn: asyncpg.Connection, key: str, reason: str, *, solo: bool) -> None:
    """Batch ``key`` is given up; its rows go back to pending (each alone when ``solo``) for a new batch."""
    await conn.execute(
        "UPDATE seatwatch_outbox SET batch_key = NULL, solo = solo OR $3, last_error = $2 WHERE batch_key = $1",
        key,
        reason,
        solo,
    )
    await _fail_batch(conn, key, reason)


async def fail_batch_rows(conn: asyncpg.Connection, key: str, reason: str) -> None:
    """Batch ``key`` and its rows failed for good."""
    await conn.execute(
        "UPDATE seatwatch_outbox SET status = 'failed', last_error = $2 WHERE batch_key = $1",
        key,
        reason,
    )
    await _fail_batch(conn, key, reason)


async def _fail_batch(conn: asyncpg.Connection, key: str, reason: str) -> None:
    await conn.execute(
        "UPDATE seatwatch_outbox_batches SET status = 'failed', leased_until = NULL, last_error = $2 WHERE key = $1",
        key,
        reason,
    )


async def purge(conn: asyncpg.Connection, retention_days: int) -> int:
    """Delete sent, failed and suppressed rows older than the retention, and their batches; how many rows."""
    deleted = await conn.fetchval(
        """
        WITH gone AS (
            DELETE FROM seatwatch_outbox
            WHERE status IN ('sent', 'failed')
              AND coalesce(sent_at, created_at) < now() - make_interval(days => $1)
              -- this month's sent rows count against the monthly quota (a month may have 31 days)
              AND coalesce(sent_at, created_at) < date_trunc('month', now(), 'UTC')
            RETURNING 1
        )
        SELECT count(*) FROM gone
        """,
        retention_days,
    )
    deleted += await conn.fetchval(
        """
        WITH gone AS (
            DELETE FROM seatwatch_outbox_suppressed WHERE suppressed_at < now() - make_interval(days => $1)
            RETURNING 1
        )
        SELECT count(*) FROM gone
        """,
        retention_days,
    )
    await conn.execute(
        """
        DELETE FROM seatwatch_outbox_batches b
        WHERE b.status IN ('sent', 'failed')
          AND b.created_at < now() - make_interval(days => $1)
          AND NOT EXISTS (SELECT 1 FROM seatwatch_outbox o WHERE o.batch_key = b.key)
        """,
        retention_days,
    )
    return int(deleted or 0)
