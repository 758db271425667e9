"""Wiring: every part built from the settings; shared by the daemon, the admin commands and the demo."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from daemon.keys import Keys
from daemon.primitives.breaker import BreakerConfig, CircuitBreaker
from daemon.primitives.clients import RedisClients
from daemon.primitives.lock import CronLock
from daemon.primitives.queue import Queue
from daemon.primitives.scripts import Scripts
from daemon.primitives.usage import UsageLedger
from daemon.runtime.metrics import Metrics
from daemon.upstream.files import FileTransport
from daemon.upstream.resend import ResendTransport

if TYPE_CHECKING:
    import httpx

    from daemon.settings.config import Settings
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


def make_transport(settings: Settings, http: httpx.AsyncClient) -> Transport:
    """The email transport the settings name: Resend, or one file per email."""
    if settings.email_transport == "file":
        assert settings.outbox_dir is not None
        return FileTransport(settings.outbox_dir)
    return ResendTransport(http, settings.resend_api_url, settings.resend_api_key.reveal())
