"""Adaptive checking's SQL (migration 0007): the plan, the leases and the schedule's figures in Postgres.

Every function is one statement, so it works through a transaction-mode pooler; every time is Redis time in
milliseconds, as the taker estimates it. The policy (what to lease, when, into which slots) is
``daemon.adaptive``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from collections.abc import Sequence

    import asyncpg


@dataclass(frozen=True)
class Planned:
    """One watched section as the planner writes it."""

    term: str
    class_nbr: str
    interval_ms: int
    priority: int
    checked_ms: int  # its last check by any mode (0: unknown)
    jitter_ms: int  # a never-checked section is first due this long after it joins


@dataclass(frozen=True)
class Leased:
    """A section leased for slotting: its due time and last slot (None: never) before the lease."""

    term: str
    class_nbr: str
    due_ms: int
    last_ms: int | None
    priority: int


@dataclass(frozen=True)
class Again:
    """A section handed back: due again by ``due_ms``; with ``restore``, its last slot set back to ``last_ms``."""

    term: str
    class_nbr: str
    due_ms: int
    restore: bool = False
    last_ms: int | None = None


async def sync(
    conn: asyncpg.Pool | asyncpg.Connection,
    sections: Sequence[Planned],
    *,
    now_ms: int,
    late_ms: int,
    max_ms: int,
    consumer: str,
    daemon_ttl_ms: int,
    report: dict[str, Any],
) -> dict[str, int]:
    """Write the plan (joins, interval changes, leavers) and this daemon's report; the schedule's figures."""
    row = await conn.fetchrow(
        "SELECT * FROM seatwatch_adaptive_sync($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb)",
        [s.term for s in sections],
        [s.class_nbr for s in sections],
        [s.interval_ms for s in sections],
        [s.priority for s in sections],
        [s.checked_ms for s in sections],
        [s.jitter_ms for s in sections],
        now_ms,
        late_ms,
        max_ms,
        consumer,
        daemon_ttl_ms,
        orjson.dumps(report).decode(),
    )
    return dict(row) if row else {}


async def figures(
    conn: asyncpg.Pool | asyncpg.Connection, *, now_ms: int, max_ms: int, late_ms: int, daemon_ttl_ms: int
) -> dict[str, int]:
    """Watched, covered, scrapes in the last hour, daemons: every daemon's schedule."""
    row = await conn.fetchrow(
        "SELECT * FROM seatwatch_adaptive_figures($1, $2, $3, $4)", now_ms, max_ms, late_ms, daemon_ttl_ms
    )
    return dict(row) if row else {}


async def last_report(conn: asyncpg.Pool | asyncpg.Connection) -> dict[str, Any]:
    """The report of the daemon that planned last, for ``seatwatch status`` ({} when none has)."""
    raw = await conn.fetchval("SELECT report::text FROM seatwatch_adaptive_daemons ORDER BY seen_ms DESC LIMIT 1")
    report: dict[str, Any] = orjson.loads(raw) if raw else {}
    return report


async def lease(
    conn: asyncpg.Pool | asyncpg.Connection, *, now_ms: int, until_ms: int, n: int, held_until_ms: int
) -> list[Leased]:
    """Up to ``n`` sections due by ``until_ms``, held until ``held_until_ms`` for slotting, best first (due now
    by priority, then by due)."""
    rows = await conn.fetch(
        "SELECT * FROM seatwatch_adaptive_lease($1, $2, $3, $4)", now_ms, until_ms, n, held_until_ms
    )
    leased = [Leased(r["term"], r["class_nbr"], r["due_ms"], r["last_ms"], r["priority"]) for r in rows]
    # RETURNING keeps no order: the lease's own, again.
    leased.sort(
        key=lambda x: (x.due_ms > now_ms, -x.priority if x.due_ms <= now_ms else 0, x.due_ms, x.term, x.class_nbr)
    )
    return leased


async def settle(
    conn: asyncpg.Pool | asyncpg.Connection,
    leased: Sequence[Leased],
    slots_ms: Sequence[int],
    *,
    late_ms: int,
    held_until_ms: int,
) -> set[tuple[str, str]]:
    """Each leased section still held with a slot (>= 0) due again one interval after it, the others released;
    the (term, class_nbr) settled with a slot: only those may be checked."""
    rows = await conn.fetch(
        "SELECT * FROM seatwatch_adaptive_settle($1, $2, $3, $4, $5)",
        [x.term for x in leased],
        [x.class_nbr for x in leased],
        list(slots_ms),
        late_ms,
        held_until_ms,
    )
    return {(r["term"], r["class_nbr"]) for r in rows}


async def again(conn: asyncpg.Pool | asyncpg.Connection, sections: Sequence[Again]) -> None:
    """Hand sections back (a failed check, a slot that could not start in time)."""
    await conn.execute(
        "SELECT seatwatch_adaptive_again($1, $2, $3, $4, $5)",
        [s.term for s in sections],
        [s.class_nbr for s in sections],
        [s.due_ms for s in sections],
        [s.restore for s in sections],
        [s.last_ms for s in sections],
    )


async def next_due_ms(conn: asyncpg.Pool | asyncpg.Connection, *, now_ms: int) -> int | None:
    """When the next section may be leased (None: nothing planned): the earliest due time, a section another
    daemon is slotting now counted from the end of its hold (it is settled, and due later, or free again then)."""
    value = await conn.fetchval(
        "SELECT min(CASE WHEN leased_until_ms >= $1 THEN GREATEST(due_ms, leased_until_ms) ELSE due_ms END) "
        "FROM seatwatch_adaptive_plan",
        now_ms,
    )
    return None if value is None else int(value)
