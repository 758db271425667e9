"""What the fault tests read back: every owed email delivered, the outbox sent, nothing left in the queue."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncpg

    from daemon.primitives.queue import Queue
    from tests.support.stubs import ResendStub


async def settled(pool: asyncpg.Pool, queue: Queue, resend: ResendStub, owed: int, *, delayed: bool = True) -> bool:
    """At least ``owed`` emails delivered, every outbox row sent, no job waiting or running (with ``delayed``,
    none waiting for a retry either)."""
    if len(resend.deliveries) < owed:
        return False
    unsent = await pool.fetchval("SELECT count(*) FROM seatwatch_outbox WHERE status <> 'sent'")
    stats = await queue.stats()
    done = unsent == 0 and stats.waiting == 0 and stats.pending == 0
    return bool(done and (stats.delayed == 0 or not delayed))
