"""The monitor: probes Postgres and Redis, keeps systemd's STATUS= current, feeds the watchdog, flushes usage.

Health answers from what the monitor last saw (``Probe``), so a health request costs no Redis command.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Final

import anyio

from daemon.errors import error_name
from daemon.primitives.clients import REDIS_ERRORS
from daemon.runtime.report import Probe
from daemon.settings import logs
from daemon.store import db
from daemon.store.pool import ping

if TYPE_CHECKING:
    from collections.abc import Callable

    import asyncpg

    from daemon.primitives.clients import RedisClients
    from daemon.primitives.usage import UsageLedger
    from daemon.runtime.systemd import Notifier, Progress

logger = logging.getLogger(__name__)

MONITOR_INTERVAL_S: Final = 5.0
OUTBOX_COUNTS_EVERY_S: Final = 30.0
USAGE_FLUSH_S: Final = 1800.0


class Monitor:
    """Liveness probes and the outbox counts (for health), STATUS= and the watchdog (for systemd)."""

    def __init__(self, clients: RedisClients, ledger: UsageLedger, notifier: Notifier, progress: Progress) -> None:
        self.clients = clients
        self.ledger = ledger
        self.notifier = notifier
        self.progress = progress
        self.redis_probe = Probe()
        self.db_probe = Probe()
        self.outbox_counts: dict[str, int] | None = None
        self._counts_due = 0.0
        self._status_line = ""

    async def run(self, pool: asyncpg.Pool, status: Callable[[], str], stopping: anyio.Event) -> None:
        """Probe Postgres and Redis, refresh STATUS=, feed the watchdog while every loop keeps its promise."""
        watchdog_every = (self.notifier.watchdog_s or 30.0) / 3
        last_watchdog = 0.0
        while not stopping.is_set():
            await self.probe(pool)
            line = status()
            if line != self._status_line:
                self._status_line = line
                self.notifier.status(line)
            overdue = self.progress.overdue()
            if overdue:
                logger.error("loops not making progress: %s; the watchdog is not fed", ", ".join(overdue))
            elif time.monotonic() - last_watchdog >= watchdog_every:
                self.notifier.watchdog()
                last_watchdog = time.monotonic()
            with anyio.move_on_after(min(MONITOR_INTERVAL_S, watchdog_every)):
                await stopping.wait()

    async def probe(self, pool: asyncpg.Pool) -> None:
        """Liveness of Redis (PING, free on Upstash) and Postgres (SELECT 1); the outbox counts every 30 s."""
        started = time.perf_counter()
        try:
            with anyio.fail_after(3):
                await self.clients.ping()
        except Exception as exc:
            self._set(self.redis_probe, False, started, exc)
        else:
            self._set(self.redis_probe, True, started)
        started = time.perf_counter()
        try:
            with anyio.fail_after(3):
                await ping(pool)
                if time.monotonic() >= self._counts_due:
                    self.outbox_counts = await db.outbox_counts(pool)
                    self._counts_due = time.monotonic() + OUTBOX_COUNTS_EVERY_S
        except Exception as exc:
            self._set(self.db_probe, False, started, exc)
        else:
            self._set(self.db_probe, True, started)

    def record(self, what: str, exc: BaseException | None = None) -> None:
        """What start-up learnt of ``what`` ("Redis" or "Postgres") while waiting for it: answered, or ``exc``."""
        probe = self.redis_probe if what == "Redis" else self.db_probe
        self._set(probe, exc is None, time.perf_counter(), exc)

    def _set(self, probe: Probe, ok: bool, started: float, exc: BaseException | None = None) -> None:
        if probe.ok and not ok:
            logger.warning(
                "health: %s unreachable (%s)",
                "Redis" if probe is self.redis_probe else "Postgres",
                error_name(exc) if exc else "",
            )
        if ok and not probe.ok and probe is self.db_probe:
            logs.postgres_back()
        probe.ok = ok
        probe.latency_ms = (time.perf_counter() - started) * 1000
        probe.error = None if ok or exc is None else (error_name(exc) or "error")
        probe.at = time.monotonic()

    async def flush_usage(self, stopping: anyio.Event) -> None:
        """Flush this process's Redis command counts every half hour (one script call)."""
        while not stopping.is_set():
            with anyio.move_on_after(USAGE_FLUSH_S):
                await stopping.wait()
            if stopping.is_set():
                return
            with contextlib.suppress(*REDIS_ERRORS, OSError):
                await self.ledger.flush()
