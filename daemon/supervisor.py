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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import anyio
import httpx
import redis.exceptions

from daemon import db
from daemon.breaker import BreakerConfig, CircuitBreaker
from daemon.dispatcher import CronWatch, Dispatcher, make_limit
from daemon.gate import Gate, MeteredScraper
from daemon.health import HealthReport, HealthServer, Probe, iso, overall
from daemon.keys import Keys
from daemon.lock import CronLock
from daemon.mailer import FileTransport, Renderer, ResendTransport
from daemon.metrics import Metrics
from daemon.outbox import OutboxSender
from daemon.pipeline import Pipeline
from daemon.queue import Consumer, Queue
from daemon.scheduler import Scheduler
from daemon.scraper import Scraper
from daemon.scripts import Scripts
from daemon.systemd import Notifier, Progress
from daemon.usage import RedisClients, UsageLedger

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import asyncpg

    from daemon.config import Settings
    from daemon.mailer import Transport

logger = logging.getLogger(__name__)

MONITOR_INTERVAL_S: Final = 5.0
OUTBOX_COUNTS_EVERY_S: Final = 30.0
USAGE_FLUSH_S: Final = 1800.0
EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1


class FatalStartError(Exception):
    """Start cannot succeed by waiting (a script Redis refuses, an unmigrated database)."""


@dataclass
class Parts:
    """Everything built from the settings; shared by the daemon, the admin commands and the demo."""

    settings: Settings
    keys: Keys
    clients: RedisClients
    scripts: Scripts
    lock: CronLock
    breaker: CircuitBreaker
    queue: Queue
    ledger: UsageLedger
    metrics: Metrics


def build_parts(settings: Settings) -> Parts:
    """Redis-side parts; nothing connects until used."""
    keys = Keys(settings.redis_prefix)
    clients = RedisClients(settings.redis_url.reveal())
    scripts = Scripts(clients.client("startup"))
    breaker_config = BreakerConfig.from_settings(settings)
    return Parts(
        settings=settings,
        keys=keys,
        clients=clients,
        scripts=scripts,
        lock=CronLock(clients.client("lock"), keys, scripts, ttl_s=settings.lock_ttl_s, holder=settings.consumer),
        breaker=CircuitBreaker(clients.client("breaker"), keys, scripts, breaker_config),
        queue=Queue(
            clients.client("queue"),
            clients.client("queue", blocking=True),
            keys,
            scripts,
            consumer=settings.consumer,
            visibility_timeout_s=settings.visibility_timeout_s,
            max_attempts=settings.max_attempts,
            breaker=breaker_config,
        ),
        ledger=UsageLedger(clients, keys, scripts, time.time),
        metrics=Metrics(),
    )


def make_transport(settings: Settings, http: httpx.AsyncClient) -> Transport:
    if settings.email_transport == "file":
        assert settings.outbox_dir is not None
        return FileTransport(settings.outbox_dir)
    return ResendTransport(http, settings.resend_api_url, settings.resend_api_key.reveal())


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        notifier: Notifier | None = None,
        retry_base_s: float = 30.0,
        idle_block_s: float = 900.0,
        idle_maintenance_s: float = 900.0,
    ) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.parts = build_parts(settings)
        self.progress = Progress()
        self.stopping = anyio.Event()
        self.redis_probe = Probe()
        self.db_probe = Probe()
        self.outbox_counts: dict[str, int] | None = None
        self._counts_due = 0.0
        self.retry_base_s = retry_base_s
        self.idle_block_s = idle_block_s
        self.idle_maintenance_s = idle_maintenance_s
        self.health = HealthServer(self.report, self.metrics_exposition)
        self.consumer: Consumer | None = None
        self.scheduler: Scheduler | None = None
        self.outbox: OutboxSender | None = None
        self.dispatcher: Dispatcher | None = None  # SEATWATCH_SCHEDULE=adaptive
        self.cron_watch: CronWatch | None = None
        self.started_at = time.time()
        self._work_scope: anyio.CancelScope | None = None
        self._status_line = ""
        self._started = False  # READY=1 was sent

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def run(self) -> int:
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
            if isinstance(cause, (FatalStartError, OSError)) and not self._started:
                logger.critical("cannot start: %s", cause)
            else:
                logger.critical("daemon stopped by an unexpected error; exiting for a restart", exc_info=exc)
            return EXIT_FAILURE
        logger.info("stopped")
        return EXIT_OK

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
        startup = self.parts.clients.client("startup")
        await self._until_ready("Redis", lambda: self._load_scripts(startup))
        pool: asyncpg.Pool | None = await self._until_ready("Postgres", self._open_pool)
        if pool is None:
            return None
        stack.push_async_callback(pool.close)
        async with pool.acquire() as conn:
            pending = await db.pending_migrations(conn)
        if pending:
            raise FatalStartError(f"the database lacks migrations {', '.join(pending)}: run `seatwatch migrate`")
        return pool

    async def _load_scripts(self, client: Any) -> bool:
        try:
            await self.parts.scripts.load(client)
        except redis.exceptions.ResponseError as exc:
            raise FatalStartError(f"Redis refused a Lua script: {exc}") from exc
        return True

    async def _open_pool(self) -> asyncpg.Pool:
        return await db.create_pool(
            self.settings.database_url.reveal(), min_size=1, max_size=self.settings.concurrency + 3
        )

    async def _until_ready(self, what: str, attempt: Callable[[], Awaitable[Any]]) -> Any:
        delay = 1.0
        while not self.stopping.is_set():
            try:
                return await attempt()
            except (
                *db.CONNECTION_ERRORS,
                redis.exceptions.ConnectionError,
                redis.exceptions.TimeoutError,
            ) as exc:
                logger.warning("waiting for %s: %s (retry in %.0fs)", what, exc.__class__.__name__, delay)
            with anyio.move_on_after(delay):
                await self.stopping.wait()
            delay = min(30.0, delay * 2)
        return None

    async def _work(self, pool: asyncpg.Pool, stack: contextlib.AsyncExitStack) -> None:
        settings, parts = self.settings, self.parts
        http = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=settings.concurrency + 4, max_keepalive_connections=settings.concurrency + 4
            )
        )
        stack.push_async_callback(http.aclose)
        self.outbox = OutboxSender(
            pool, make_transport(settings, http), parts.metrics, owner=settings.consumer, progress=self.progress
        )
        renderer = Renderer(settings.site_url, settings.from_email, settings.unsubscribe_key.reveal())
        scraper = Scraper(http, settings.scraper_url, settings.scraper_token.reveal(), settings.scraper_timeout_s)
        limit = make_limit(settings)
        gate = Gate(limit)
        adaptive = settings.schedule == "adaptive"
        # Adaptive checking holds the gate itself; the queue consumers wait for it inside the scraper call.
        metered = MeteredScraper(scraper, limit, None if adaptive else gate)
        pipeline = Pipeline(pool, metered, renderer, parts.metrics, on_emails=self.outbox.wake)
        self.consumer = Consumer(
            parts.queue,
            pipeline,
            concurrency=settings.concurrency,
            retry_base_s=self.retry_base_s,
            idle_block_s=self.idle_block_s,
            idle_maintenance_s=self.idle_maintenance_s,
            progress=self.progress,
        )
        self.scheduler = Scheduler(
            cron=settings.cron,
            tz=settings.tz,
            stagger=settings.stagger,
            grace_s=settings.misfire_grace_s,
            lock=parts.lock,
            queue=parts.queue,
            pool=pool,
            metrics=parts.metrics,
            progress=self.progress,
        )
        if adaptive:
            self.dispatcher = Dispatcher(
                settings=settings,
                clients=parts.clients,
                keys=parts.keys,
                scripts=parts.scripts,
                breaker=BreakerConfig.from_settings(settings),
                pool=pool,
                pipeline=pipeline,
                gate=gate,
                progress=self.progress,
            )
        else:
            self.cron_watch = CronWatch(self.scheduler)
        await self._probe(pool)
        logger.info("configuration: %s", settings.summary())
        self.notifier.ready(self._status())
        self._started = True
        logger.info(
            "ready: consumer %s, concurrency %d, cron %r in %s (%s), email via %s",
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
                if self.dispatcher is not None:
                    work.start_soon(self._essential, "dispatcher", self.dispatcher.run)
                else:
                    work.start_soon(self._essential, "scheduler", self.scheduler.run)
                work.start_soon(self._essential, "outbox", self.outbox.run)
                work.start_soon(self._essential, "monitor", lambda stopping: self._monitor(pool, stopping))
                work.start_soon(self._essential, "usage", self._flush_usage)
        if self._work_scope.cancelled_caught:
            logger.warning("shutdown grace ran out; unfinished jobs were returned to the queue")
        with anyio.move_on_after(5, shield=True):
            with contextlib.suppress(*db.CONNECTION_ERRORS, redis.exceptions.RedisError):
                await parts.ledger.flush()

    async def _essential(self, name: str, loop: Callable[[anyio.Event], Awaitable[None]]) -> None:
        await loop(self.stopping)
        if not self.stopping.is_set():
            raise RuntimeError(f"the {name} loop ended while the daemon was running")

    # -- monitor, usage ----------------------------------------------------------------------------------------

    async def _monitor(self, pool: asyncpg.Pool, stopping: anyio.Event) -> None:
        """Probe Postgres and Redis, refresh STATUS=, feed the watchdog while every loop keeps its promise."""
        watchdog_every = (self.notifier.watchdog_s or 30.0) / 3
        last_watchdog = 0.0
        while not stopping.is_set():
            await self._probe(pool)
            self._schedule_check()  # its hourly falling-behind warning, whether or not anyone probes health
            status = self._status()
            if status != self._status_line:
                self._status_line = status
                self.notifier.status(status)
            overdue = self.progress.overdue()
            if overdue:
                logger.error("loops not making progress: %s; the watchdog is not fed", ", ".join(overdue))
            elif time.monotonic() - last_watchdog >= watchdog_every:
                self.notifier.watchdog()
                last_watchdog = time.monotonic()
            with anyio.move_on_after(min(MONITOR_INTERVAL_S, watchdog_every)):
                await stopping.wait()

    async def _probe(self, pool: asyncpg.Pool) -> None:
        """Liveness of Redis (PING, free on Upstash) and Postgres (SELECT 1); the outbox counts every 30 s."""
        started = time.perf_counter()
        try:
            with anyio.fail_after(3):
                await self.parts.clients.ping()
        except Exception as exc:
            self._set_probe(self.redis_probe, False, started, exc)
        else:
            self._set_probe(self.redis_probe, True, started)
        started = time.perf_counter()
        try:
            with anyio.fail_after(3):
                await pool.fetchval("SELECT 1")
                if time.monotonic() >= self._counts_due:
                    self.outbox_counts = await db.outbox_counts(pool)
                    self._counts_due = time.monotonic() + OUTBOX_COUNTS_EVERY_S
        except Exception as exc:
            self._set_probe(self.db_probe, False, started, exc)
        else:
            self._set_probe(self.db_probe, True, started)

    def _set_probe(self, probe: Probe, ok: bool, started: float, exc: BaseException | None = None) -> None:
        if probe.ok and not ok:
            logger.warning(
                "health: %s unreachable (%s)",
                "Redis" if probe is self.redis_probe else "Postgres",
                exc.__class__.__name__ if exc else "",
            )
        probe.ok = ok
        probe.latency_ms = (time.perf_counter() - started) * 1000
        probe.error = None if ok or exc is None else (exc.__class__.__name__ or "error")
        probe.at = time.monotonic()

    async def _flush_usage(self, stopping: anyio.Event) -> None:
        while not stopping.is_set():
            with anyio.move_on_after(USAGE_FLUSH_S):
                await stopping.wait()
            if stopping.is_set():
                return
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await self.parts.ledger.flush()

    # -- reporting -------------------------------------------------------------------------------------------

    def _status(self) -> str:
        state = self.consumer.state if self.consumer else None
        stats = state.stats if state else None
        breaker = state.breaker.state if state and state.breaker else "CLOSED"
        last = self.scheduler.last_tick if self.scheduler else None
        parts = [
            "draining" if self.stopping.is_set() else "running",
            f"breaker {breaker}",
            f"jobs running {state.running if state else 0}",
        ]
        if stats:
            parts.append(f"waiting {stats.waiting} delayed {stats.delayed} dead {stats.dead_letters}")
        if last:
            parts.append(f"last tick {last.slot or 'manual'} +{last.enqueued}")
        if not (self.redis_probe.ok and self.db_probe.ok):
            parts.append(
                "redis "
                + ("up" if self.redis_probe.ok else "DOWN")
                + ", postgres "
                + ("up" if self.db_probe.ok else "DOWN")
            )
        return "; ".join(parts)

    def report(self) -> HealthReport:
        now = time.monotonic()
        state = self.consumer.state if self.consumer else None
        checks: dict[str, dict[str, Any]] = {
            "database": self.db_probe.check(now),
            "redis": self.redis_probe.check(now),
        }
        breaker = state.breaker if state else None
        breaker_check: dict[str, Any] = {
            "status": "healthy",
            "state": "CLOSED",
            "failure_count": 0,
            "success_count": 0,
            "last_failure": None,
            "last_state_change": None,
        }
        if breaker is not None:
            breaker_check = {
                "status": "healthy" if breaker.state == "CLOSED" else "degraded",
                "state": breaker.state,
                "failure_count": breaker.failures,
                "success_count": breaker.successes,
                "last_failure": iso(breaker.last_failure_ms / 1000) if breaker.last_failure_ms else None,
                "last_state_change": iso(breaker.last_change_ms / 1000) if breaker.last_change_ms else None,
            }
        breaker_check["age_s"] = round(now - state.breaker_at, 1) if state and state.breaker_at else None
        checks["circuit_breaker"] = breaker_check
        checks["cron_lock"] = self._lock_check()
        stats = state.stats if state else None
        checks["queue"] = {
            "status": "healthy",
            **(stats.as_dict() if stats else {"waiting": None, "pending": None, "delayed": None, "dead_letters": None}),
            "running_here": state.running if state else 0,
            "age_s": round(now - state.stats_at, 1) if state and state.stats_at else None,
        }
        sched = self.scheduler
        last = sched.last_tick if sched else None
        checks["scheduler"] = {
            "status": "degraded" if sched and sched.overdue() else "healthy",
            "schedule": self.settings.cron,
            "timezone": self.settings.timezone,
            "stagger": self.settings.stagger,
            "last_tick": last.as_dict() if last else None,
            "next_tick": sched.next_tick.isoformat() if sched and sched.next_tick else None,
        }
        counts = self.outbox_counts or {}
        failing = bool(self.outbox and self.outbox.failing) or counts.get("failed_24h", 0) > 0
        checks["outbox"] = {
            "status": "degraded" if failing else "healthy",
            "pending": counts.get("pending"),
            "failed": counts.get("failed"),
            "failed_24h": counts.get("failed_24h"),
            "last_error": self.outbox.last_error if self.outbox else None,
        }
        configured = self.settings.email_transport == "file" or bool(self.settings.resend_api_key)
        checks["email"] = {
            "status": "healthy" if configured else "unhealthy",
            "configured": configured,
            "transport": self.settings.email_transport,
        }
        checks["schedule"] = self._schedule_check()
        checks["configuration"] = {
            "status": "healthy",
            "consumer": self.settings.consumer,
            "concurrency": self.settings.concurrency,
            "stagger": self.settings.stagger,
        }
        status = overall(checks)
        return HealthReport(
            status,
            {
                "timestamp": iso(time.time()),
                "status": status,
                "checks": checks,
                "uptime_s": round(time.time() - self.started_at),
            },
        )

    def _schedule_check(self) -> dict[str, Any]:
        if self.dispatcher is not None:
            return self.dispatcher.check()
        if self.cron_watch is not None:
            return self.cron_watch.check()
        return {"status": "healthy", "mode": self.settings.schedule}

    def _lock_check(self) -> dict[str, Any]:
        held = self.scheduler.holding if self.scheduler else None
        seen = self.scheduler.last_busy if self.scheduler else None
        now_ms = int(time.time() * 1000)
        if held is not None:
            return {
                "status": "healthy",
                "locked": True,
                "lock_holder": self.settings.consumer,
                "lock_acquired_at": iso(held.acquired_at_ms / 1000),
                "time_held_ms": now_ms - held.acquired_at_ms,
                "expires_at": iso(held.expires_at_ms / 1000),
            }
        if seen is not None and seen.expires_at_ms > now_ms:
            return {
                "status": "healthy",
                "locked": True,
                "lock_holder": seen.holder,
                "lock_acquired_at": iso(seen.acquired_at_ms / 1000),
                "time_held_ms": now_ms - seen.acquired_at_ms,
                "expires_at": iso(seen.expires_at_ms / 1000),
            }
        return {
            "status": "healthy",
            "locked": False,
            "lock_holder": None,
            "lock_acquired_at": None,
            "time_held_ms": None,
            "expires_at": None,
        }

    def metrics_exposition(self) -> bytes:
        state = self.consumer.state if self.consumer else None
        now = time.monotonic()
        self.parts.metrics.refresh(
            queue=state.stats if state else None,
            breaker=state.breaker if state else None,
            outbox=self.outbox_counts,
            redis_commands=dict(self.parts.clients.usage.total),
            schedule=self._schedule_check(),
            jobs={
                "completed": state.completed,
                "retried": state.retried,
                "deferred": state.deferred,
                "dead_lettered": state.dead_lettered,
            }
            if state
            else None,
            ages={
                "queue": now - state.stats_at if state and state.stats_at else None,
                "breaker": now - state.breaker_at if state and state.breaker_at else None,
                "database": now - self.db_probe.at if self.db_probe.at else None,
            },
        )
        return self.parts.metrics.exposition()


def _single_cause(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member ExceptionGroups, or ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def run_daemon(settings: Settings) -> int:
    """``seatwatch run``: the exit status systemd sees."""
    return anyio.run(Daemon(settings).run)
