"""The daemon: opens resources, runs every part under one task group, owns the signal policy.

Resources open in an ``AsyncExitStack``. The outer task group runs the signal watcher and the health
listener (started with ``tg.start`` so a port in use fails start); once Redis and Postgres answer, systemd
hears READY=1 and a work scope runs the stream consumer, the scheduler, the outbox sender, the monitor and
the usage flusher. The first SIGTERM/SIGINT sets ``stopping`` (every loop returns; running jobs get the
shutdown grace) and the second cancels the work scope at once.

A part that hits an outage recovers by itself with backoff; a part that ends while the daemon is not
stopping, or raises something unexpected, brings the process down non-zero so systemd restarts it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from typing import TYPE_CHECKING, Any

import anyio
import asyncpg
import httpx
import redis.exceptions

from daemon.backoff import Backoff
from daemon.checks.pruner import Pruner
from daemon.errors import Exit, FatalStartError, StoreUnavailable, error_name
from daemon.primitives.clients import REDIS_ERRORS
from daemon.runtime import report
from daemon.runtime.health import HealthServer
from daemon.runtime.monitor import Monitor
from daemon.runtime.systemd import Notifier, Progress
from daemon.runtime.wiring import build_parts, build_work
from daemon.store.migrations import migrate
from daemon.store.pool import DAEMON_POOL_SIZE, create_pool, dsn_warnings
from daemon.version import version

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from daemon.adaptive.taker import Taker
    from daemon.checks.consumer import Consumer
    from daemon.checks.outbox import OutboxSender
    from daemon.cron.scheduler import Scheduler
    from daemon.runtime.schedule import CronWatch
    from daemon.settings.config import Settings

logger = logging.getLogger(__name__)


class Daemon:
    """The ``seatwatch run`` process: builds the parts, waits for the stores, runs the loops, drains on signal."""

    def __init__(
        self,
        settings: Settings,
        *,
        notifier: Notifier | None = None,
        retry_base_s: float = 30.0,
        idle_block_s: float = 900.0,
        idle_maintenance_s: float = 3600.0,
    ) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.parts = build_parts(settings)
        self.progress = Progress()
        self.stopping = anyio.Event()
        self.monitor = Monitor(self.parts.clients, self.parts.ledger, self.notifier, self.progress)
        self.retry_base_s = retry_base_s
        self.idle_block_s = idle_block_s
        self.idle_maintenance_s = idle_maintenance_s
        self.health = HealthServer(lambda: report.health(self), lambda: report.metrics_exposition(self))
        self.consumer: Consumer | None = None
        self.scheduler: Scheduler | None = None
        self.outbox: OutboxSender | None = None
        self.taker: Taker | None = None  # SEATWATCH_SCHEDULE=adaptive
        self.cron_watch: CronWatch | None = None
        self.started_at = time.time()
        self._work_scope: anyio.CancelScope | None = None
        self._started = False  # READY=1 was sent
        self.starting = "starting"  # until READY=1: what start-up is doing (health and STATUS= show it)

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until stopped; the exit status (0 after a drain, 1 when something broke, 78 when start cannot work)."""
        try:
            async with contextlib.AsyncExitStack() as stack:
                stack.push_async_callback(self.parts.clients.aclose)
                stack.callback(self.notifier.close)
                async with anyio.create_task_group() as outer:
                    outer.start_soon(self._watch_signals)
                    port = await outer.start(self.health.serve, self.settings.health_host, self.settings.health_port)
                    logger.info("health listener on %s:%d", self.settings.health_host, port)
                    pool = await self._connect(stack)
                    if pool is not None:
                        await self._work(pool, stack)
                    outer.cancel_scope.cancel()
        except Exception as exc:  # task groups wrap what their tasks raise in ExceptionGroups
            cause = _single_cause(exc)
            if isinstance(cause, FatalStartError) and not self._started:
                logger.critical("cannot start: %s; restarting cannot fix this", cause)
                return Exit.CONFIG
            if isinstance(cause, OSError) and not self._started:
                logger.critical("cannot start: %s", cause)
            else:
                logger.critical("daemon stopped by an unexpected error; exiting for a restart", exc_info=exc)
            return Exit.FAILURE
        logger.info("stopped")
        return Exit.OK

    @property
    def ready(self) -> bool:
        """READY=1 was sent: the work loops run."""
        return self._started

    def _starting(self, what: str) -> None:
        self.starting = what
        self.notifier.status(f"starting: {what}")

    def stop(self) -> None:
        """Begin a graceful shutdown, as the first SIGTERM does: no new work, running jobs get the grace."""
        if self.stopping.is_set():
            return
        self.notifier.stopping()
        self.stopping.set()
        if self.outbox is not None:
            self.outbox.wake()  # it may be waiting for new rows; let it see `stopping` now
        if self._work_scope is not None:
            self._work_scope.deadline = anyio.current_time() + self.settings.shutdown_grace_s

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self.stopping.is_set():
                    logger.info(
                        "%s: draining (up to %.0fs); a second signal stops at once",
                        name,
                        self.settings.shutdown_grace_s,
                    )
                    self.stop()
                else:
                    logger.warning("%s again: stopping now", name)
                    if self._work_scope is not None:
                        self._work_scope.cancel()
                    return

    async def _connect(self, stack: contextlib.AsyncExitStack) -> asyncpg.Pool | None:
        """Wait (with backoff) until Redis and Postgres answer; None if asked to stop meanwhile."""
        for warning in dsn_warnings(self.settings.database_url.reveal()):
            logger.warning("%s", warning)
        startup = self.parts.clients.client("startup")
        await self._until_ready("Redis", lambda: self._load_scripts(startup))
        pool: asyncpg.Pool | None = await self._until_ready("Postgres", self._open_pool)
        if pool is None:
            return None
        stack.push_async_callback(pool.close)
        self._starting("applying migrations")
        # Migrations run here, in the main process, so a failing one ends `run` with Exit.CONFIG (78), which the
        # unit's RestartPreventExitStatus honours (an ExecStartPre's exit status it would not).
        try:
            async with pool.acquire() as conn:
                applied = await migrate(conn)
        except asyncpg.PostgresError as exc:
            raise FatalStartError(f"a migration failed: {error_name(exc)}: {exc}") from exc
        if applied:
            logger.info("migrations applied: %s", ", ".join(applied))
        return pool

    async def _load_scripts(self, client: Any) -> bool:
        try:
            await self.parts.scripts.load(client)
        except redis.exceptions.ResponseError as exc:
            raise FatalStartError(f"Redis refused a Lua script: {exc}") from exc
        return True

    async def _open_pool(self) -> asyncpg.Pool:
        return await create_pool(self.settings.database_url.reveal(), min_size=1, max_size=DAEMON_POOL_SIZE)

    async def _until_ready(self, what: str, attempt: Callable[[], Awaitable[Any]]) -> Any:
        backoff = Backoff(1.0, 30.0)
        while not self.stopping.is_set():
            try:
                result = await attempt()
            except StoreUnavailable as exc:
                wait_s = backoff.failed()
                # Every try is logged: start-up is when an operator is watching. Health and STATUS= say it too.
                logger.warning("waiting for %s: %s (retry in %.0fs)", what, error_name(exc), wait_s)
                self.monitor.record(what, exc)
                self._starting(f"waiting for {what}: {error_name(exc)} (retry in {wait_s:.0f}s)")
            else:
                self.monitor.record(what)
                return result
            with anyio.move_on_after(wait_s):
                await self.stopping.wait()
        return None

    async def _work(self, pool: asyncpg.Pool, stack: contextlib.AsyncExitStack) -> None:
        settings, parts = self.settings, self.parts
        http = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=settings.concurrency + 4, max_keepalive_connections=settings.concurrency + 4
            )
        )
        stack.push_async_callback(http.aclose)
        built = build_work(
            settings,
            parts,
            pool,
            http,
            self.progress,
            retry_base_s=self.retry_base_s,
            idle_block_s=self.idle_block_s,
            idle_maintenance_s=self.idle_maintenance_s,
        )
        self.outbox, self.consumer, self.scheduler = built.outbox, built.consumer, built.scheduler
        self.taker, self.cron_watch = built.taker, built.cron_watch
        await self.monitor.probe(pool)
        logger.info("configuration: %s", settings.summary())
        self.notifier.ready(report.status_line(self))
        self._started = True
        logger.info(
            "ready: seatwatch %s, consumer %s, concurrency %d, cron %r in %s (%s), email via %s",
            version(),
            settings.consumer,
            settings.concurrency,
            settings.cron,
            settings.timezone,
            settings.stagger,
            settings.email_transport,
        )
        with anyio.CancelScope() as self._work_scope:
            if self.stopping.is_set():
                self._work_scope.deadline = anyio.current_time() + settings.shutdown_grace_s
            async with anyio.create_task_group() as work:
                work.start_soon(self._essential, "consumer", self.consumer.run)
                if self.taker is not None:
                    work.start_soon(self._essential, "taker", self.taker.run)
                else:
                    work.start_soon(self._essential, "scheduler", self.scheduler.run)
                work.start_soon(self._essential, "outbox", self.outbox.run)
                work.start_soon(
                    self._essential, "monitor", lambda stopping: self.monitor.run(pool, self._status_line, stopping)
                )
                work.start_soon(self._essential, "usage", self.monitor.flush_usage)
                if settings.retention:
                    work.start_soon(self._essential, "retention", Pruner(pool).run)
        if self._work_scope.cancelled_caught:
            logger.warning("shutdown grace ran out; unfinished jobs were returned to the queue")
        with anyio.move_on_after(5, shield=True):
            with contextlib.suppress(*REDIS_ERRORS):  # StoreUnavailable is one of them
                await parts.ledger.flush()

    def _status_line(self) -> str:
        # The monitor asks every few seconds: the schedule check's hourly falling-behind warning rides along,
        # so it is logged whether or not anyone probes health.
        report.schedule_check(self)
        return report.status_line(self)

    async def _essential(self, name: str, loop: Callable[[anyio.Event], Awaitable[None]]) -> None:
        await loop(self.stopping)
        if not self.stopping.is_set():
            raise RuntimeError(f"the {name} loop ended while the daemon was running")


def _single_cause(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member ExceptionGroups, or ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def run_daemon(settings: Settings) -> int:
    """``seatwatch run``: the exit status systemd sees."""
    return anyio.run(Daemon(settings).run)
