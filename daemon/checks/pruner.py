"""The daily retention run inside the daemon (``SEATWATCH_RETENTION=on``): ``seatwatch prune`` once a day.

Off by default: deleting the web app's rows is the operator's choice. Every daemon sharing the database may
run it; the rules are idempotent, so two runs delete nothing twice. A Postgres outage skips a run (logged)
and it is tried again an hour later.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import anyio

from daemon.errors import StoreUnavailable, error_name
from daemon.store import prune_queries

if TYPE_CHECKING:
    from daemon.store.pool import Pool

logger = logging.getLogger(__name__)

EVERY_S: Final = 86400.0
RETRY_S: Final = 3600.0
FIRST_AFTER_S: Final = 300.0  # not in the busy first minutes after a start


class Pruner:
    """Runs the retention rules every ``every_s`` until ``stopping``."""

    def __init__(self, pool: Pool, *, every_s: float = EVERY_S, first_after_s: float = FIRST_AFTER_S) -> None:
        self.pool = pool
        self.every_s = every_s
        self.first_after_s = first_after_s
        self.last_run: list[tuple[str, int]] | None = None

    async def run(self, stopping: anyio.Event) -> None:
        """Prune now and then, until ``stopping``."""
        wait_s = self.first_after_s
        while True:
            with anyio.move_on_after(wait_s):
                await stopping.wait()
            if stopping.is_set():
                return
            try:
                await self.prune_once()
                wait_s = self.every_s
            except (StoreUnavailable, OSError) as exc:
                logger.warning("retention: Postgres unavailable (%s); trying again in an hour", error_name(exc))
                wait_s = RETRY_S

    async def prune_once(self) -> list[tuple[str, int]]:
        """One run of every rule; (table, rows deleted) per rule."""
        async with self.pool.acquire() as conn:
            deleted = await prune_queries.delete(conn)
        self.last_run = [(rule.table, n) for rule, n in deleted]
        logger.info("retention: deleted %s", ", ".join(f"{table} {n}" for table, n in self.last_run))
        return self.last_run
