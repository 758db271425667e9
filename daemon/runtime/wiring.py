"""Wiring: every part built from the settings (shared by the daemon, the admin commands and the demo), and
the daemon's work loops built from them (``build_work``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from daemon.adaptive.gate import Gate, MeteredScraper
from daemon.adaptive.taker import Taker, make_limit
from daemon.checks.consumer import Consumer
from daemon.checks.outbox import OutboxSender
from daemon.checks.pipeline import Pipeline
from daemon.cron.scheduler import Scheduler
from daemon.keys import Keys
from daemon.primitives.breaker import BreakerConfig, CircuitBreaker
from daemon.primitives.clients import RedisClients
from daemon.primitives.lock import CronLock
from daemon.primitives.queue import Queue
from daemon.primitives.scripts import Scripts
from daemon.primitives.usage import UsageLedger
from daemon.runtime.metrics import Metrics
from daemon.runtime.schedule import CronWatch
from daemon.upstream.files import FileTransport
from daemon.upstream.render import Renderer
from daemon.upstream.resend import ResendTransport
from daemon.upstream.scraper import Scraper

if TYPE_CHECKING:
    import httpx

    from daemon.runtime.systemd import Progress
    from daemon.settings.config import Settings
    from daemon.store.pool import Pool
    from daemon.upstream.resend import Transport


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


@dataclass
class Work:
    """The work loops of one daemon, built from the settings and the parts (the supervisor runs them)."""

    outbox: OutboxSender
    consumer: Consumer
    scheduler: Scheduler
    taker: Taker | None  # SEATWATCH_SCHEDULE=adaptive
    cron_watch: CronWatch | None  # cron mode


def build_work(
    settings: Settings,
    parts: Parts,
    pool: Pool,
    http: httpx.AsyncClient,
    progress: Progress,
    *,
    retry_base_s: float,
    idle_block_s: float,
    idle_maintenance_s: float,
) -> Work:
    """The scraper, the gate, the pipeline and every work loop, wired; nothing runs until the supervisor starts them."""
    resend = settings.email_transport == "resend"  # the quotas are Resend's
    outbox = OutboxSender(
        pool,
        make_transport(settings, http),
        parts.metrics,
        owner=settings.consumer,
        progress=progress,
        quota_per_day=settings.email_quota_per_day if resend else 0,
        quota_per_month=settings.email_quota_per_month if resend else 0,
    )
    renderer = Renderer(settings.site_url, settings.from_email, settings.unsubscribe_key.reveal())
    scraper = Scraper(http, settings.scraper_url, settings.scraper_token.reveal(), settings.scraper_timeout_s)
    limit = make_limit(settings)
    gate = Gate(limit)
    adaptive = settings.schedule == "adaptive"
    # Adaptive checking holds the gate itself; the queue consumers wait for it inside the scraper call.
    metered = MeteredScraper(scraper, limit, None if adaptive else gate)
    pipeline = Pipeline(pool, metered, renderer, parts.metrics, on_emails=outbox.wake)
    consumer = Consumer(
        parts.queue,
        pipeline,
        concurrency=settings.concurrency,
        retry_base_s=retry_base_s,
        idle_block_s=idle_block_s,
        idle_maintenance_s=idle_maintenance_s,
        progress=progress,
    )
    scheduler = Scheduler(
        cron=settings.cron,
        tz=settings.tz,
        stagger=settings.stagger,
        grace_s=settings.misfire_grace_s,
        lock=parts.lock,
        queue=parts.queue,
        pool=pool,
        metrics=parts.metrics,
        progress=progress,
    )
    taker, cron_watch = None, None
    if adaptive:
        taker = Taker(
            settings=settings,
            clients=parts.clients,
            keys=parts.keys,
            scripts=parts.scripts,
            breaker=BreakerConfig.from_settings(settings),
            pool=pool,
            pipeline=pipeline,
            gate=gate,
            progress=progress,
        )
    else:
        cron_watch = CronWatch(scheduler)
    return Work(outbox, consumer, scheduler, taker, cron_watch)


def make_transport(settings: Settings, http: httpx.AsyncClient) -> Transport:
    """The email transport the settings name: Resend, or one file per email."""
    if settings.email_transport == "file":
        assert settings.outbox_dir is not None
        return FileTransport(settings.outbox_dir)
    return ResendTransport(http, settings.resend_api_url, settings.resend_api_key.reveal())
