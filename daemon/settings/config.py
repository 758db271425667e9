"""Settings: parsed once from the environment into a frozen object.

Every problem is collected and reported together (``ConfigError.problems``); the CLI turns that into exit
status 78. No secret value is ever part of a message or a ``repr``: secrets are wrapped in ``Secret``, and
URLs that may carry a password are shown through ``redact_url`` (both in ``daemon.secret``).
Choices are ``Literal`` types, so a misspelt one is a type error, not a silent branch.

A secret may come from the variable itself, from ``NAME_FILE=/path``, or from a file named ``name`` (lower
case) or ``seatwatch_name`` in ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``).
"""

from __future__ import annotations

import os
import re
import socket
import zoneinfo
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, TypedDict
from urllib.parse import parse_qsl, urlsplit

from croniter import croniter

from daemon.cron.slots import shortest_cron_gap_s
from daemon.errors import ConfigError
from daemon.secret import Secret, redact_url, url_passwords
from daemon.settings.envreader import EnvReader

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping


EmailTransport = Literal["resend", "file"]
Stagger = Literal["parity", "none"]  # parity: :00 checks even class numbers, :30 odd
Schedule = Literal["cron", "adaptive"]  # SPEC §4 ticks, or §11 due times
LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
OnOff = Literal["on", "off"]
Needs = Literal["all", "database", "redis", "stores"]

EMAIL_TRANSPORTS: Final[tuple[EmailTransport, ...]] = ("resend", "file")
STAGGERS: Final[tuple[Stagger, ...]] = ("parity", "none")
SCHEDULES: Final[tuple[Schedule, ...]] = ("cron", "adaptive")
LOG_FORMATS: Final[tuple[LogFormat, ...]] = ("text", "json")
LOG_LEVELS: Final[tuple[LogLevel, ...]] = ("debug", "info", "warning", "error")
ON_OFF: Final[tuple[OnOff, ...]] = ("on", "off")

# The sets of variables each command needs; anything else may be absent for that command.
NEEDS_ALL: Final = "all"
NEEDS_DATABASE: Final = "database"
NEEDS_REDIS: Final = "redis"
NEEDS_STORES: Final = "stores"  # Redis and Postgres, not the HTTP services

_STORE_VARS = {
    NEEDS_DATABASE: {"DATABASE_URL"},
    NEEDS_REDIS: {"REDIS_URL"},
    NEEDS_STORES: {"DATABASE_URL", "REDIS_URL"},
}


@dataclass(frozen=True, repr=False)
class Settings:
    """Everything the daemon reads from its environment, validated."""

    database_url: Secret
    redis_url: Secret
    scraper_url: str
    scraper_token: Secret
    resend_api_key: Secret
    resend_api_url: str
    from_email: str
    site_url: str
    unsubscribe_key: Secret
    email_transport: EmailTransport
    outbox_dir: Path | None
    cron: str
    timezone: str
    stagger: Stagger
    concurrency: int
    health_host: str
    health_port: int
    redis_prefix: str
    consumer: str
    scraper_timeout_s: float
    visibility_timeout_s: float
    max_attempts: int
    breaker_failures: int
    breaker_recovery_s: float
    breaker_successes: int
    breaker_half_open_max: int
    lock_ttl_s: float
    misfire_grace_s: float
    shutdown_grace_s: float
    redis_budget_per_day: int
    log_format: LogFormat
    log_level: LogLevel
    # SPEC §11. With ``concurrency_auto`` the in-flight scrapes adapt between 1 and ``concurrency_max``, and
    # ``concurrency`` holds that ceiling (what pools and the queue size themselves for).
    schedule: Schedule = "cron"
    max_check_interval_s: int = 3600
    min_check_interval_s: int = 120
    scrapes_per_hour: int = 3600
    concurrency_auto: bool = False
    concurrency_max: int = 32
    # SPEC §7.4: Resend's quotas (0 = none), counted from the outbox's sent rows; and the opt-in retention.
    email_quota_per_day: int = 100
    email_quota_per_month: int = 3000
    retention: bool = False
    # Which variables were validated as required (see ``from_env(needs=...)``).
    needs: Needs = field(default=NEEDS_ALL)

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("database_url", "redis_url"):
                value = redact_url(value.reveal())
            parts.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(parts)})"

    @property
    def tz(self) -> zoneinfo.ZoneInfo:
        """The cron's time zone."""
        return zoneinfo.ZoneInfo(self.timezone)

    def summary(self) -> dict[str, object]:
        """A secret-free view for logs, `check` and the health endpoint's `configuration` check."""
        return {
            "database_url": redact_url(self.database_url.reveal()),
            "redis_url": redact_url(self.redis_url.reveal()),
            "scraper_url": redact_url(self.scraper_url),
            "email_transport": self.email_transport,
            "cron": self.cron,
            "timezone": self.timezone,
            "stagger": self.stagger,
            "concurrency": "auto" if self.concurrency_auto else self.concurrency,
            "schedule": self.schedule,
            "redis_prefix": self.redis_prefix,
            "consumer": self.consumer,
        }

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        needs: Needs = NEEDS_ALL,
        timeout_stop_s: float | None = None,
        hostname: Callable[[], str] = socket.gethostname,
    ) -> Settings:
        """Parse and validate; raise ``ConfigError`` listing every problem.

        ``needs`` narrows which variables are required (``migrate`` needs only the database, say).
        ``timeout_stop_s`` is systemd's ``TimeoutStopUSec`` for this unit when known.
        """
        return _Parser(os.environ if env is None else env, needs, hostname).parse(timeout_stop_s)


# The groups ``_Parser`` reads, each unpacked into ``Settings`` (mypy checks every key and type).
class _Services(TypedDict):
    database_url: Secret
    redis_url: Secret
    scraper_url: str
    scraper_token: Secret
    resend_api_key: Secret
    resend_api_url: str
    from_email: str
    site_url: str
    unsubscribe_key: Secret


class _Schedule(TypedDict):
    cron: str
    timezone: str
    stagger: Stagger
    concurrency: int
    concurrency_auto: bool
    concurrency_max: int
    schedule: Schedule
    max_check_interval_s: int
    min_check_interval_s: int
    scrapes_per_hour: int


class _Identity(TypedDict):
    health_host: str
    health_port: int
    redis_prefix: str
    consumer: str


class _Limits(TypedDict):
    scraper_timeout_s: float
    visibility_timeout_s: float
    max_attempts: int
    breaker_failures: int
    breaker_recovery_s: float
    breaker_successes: int
    breaker_half_open_max: int
    lock_ttl_s: float
    misfire_grace_s: float
    shutdown_grace_s: float
    redis_budget_per_day: int
    log_format: LogFormat
    log_level: LogLevel
    email_quota_per_day: int
    email_quota_per_month: int
    retention: bool


class _Parser(EnvReader):
    """Reads seatwatch's variables into ``Settings``, collecting every problem (``EnvReader``)."""

    def __init__(self, env: Mapping[str, str], needs: Needs, hostname: Callable[[], str]) -> None:
        super().__init__(env)
        self.needs = needs
        self.hostname = hostname

    # -- readers ---------------------------------------------------------------------------------

    def _required(self, name: str) -> bool:
        return self.needs == NEEDS_ALL or name in _STORE_VARS.get(self.needs, set())

    def need(self, name: str, value: str | None, *, when: bool = True, why: str = "") -> str:
        if value is None and when and self._required(name) and name not in self._reported:
            self.problems.append(f"{name} is required{why}")
        return value or ""

    def _statement_cache(self, database_url: str) -> None:
        """``?statement_cache_size=N`` in DATABASE_URL (0 behind a transaction-mode pooler) is a count."""
        try:
            query = parse_qsl(urlsplit(database_url).query, keep_blank_values=True)
        except ValueError:
            return
        for name, value in query:
            if name == "statement_cache_size" and not value.isdigit():
                self.problems.append(f"DATABASE_URL statement_cache_size must be a whole number (got {value!r})")

    # -- the whole thing, one group of variables at a time -------------------------------------------

    def parse(self, timeout_stop_s: float | None) -> Settings:
        transport = self.choice("SEATWATCH_EMAIL_TRANSPORT", "resend", EMAIL_TRANSPORTS)
        services = self._services(resend=transport == "resend")
        outbox_dir = self._outbox_dir(transport)
        schedule = self._schedule()
        identity = self._identity()
        limits = self._limits()
        self._cross_check(schedule, limits, timeout_stop_s)
        if self.problems:
            raise ConfigError(self.problems)
        return Settings(
            **services,
            **schedule,
            **identity,
            **limits,
            email_transport=transport,
            outbox_dir=outbox_dir,
            needs=self.needs,
        )

    def _services(self, *, resend: bool) -> _Services:
        """Where the stores, the scraper and Resend are, and the secrets that open them."""
        why_resend = " when SEATWATCH_EMAIL_TRANSPORT is resend"
        database_url = self.url(
            "DATABASE_URL",
            self.need("DATABASE_URL", self.secret("DATABASE_URL")),
            ("postgres", "postgresql"),
        )
        self._statement_cache(database_url)
        redis_url = self.url("REDIS_URL", self.need("REDIS_URL", self.secret("REDIS_URL")), ("redis", "rediss", "unix"))
        scraper_url = self.url("SCRAPER_URL", self.need("SCRAPER_URL", self.raw("SCRAPER_URL")), ("http", "https"))
        scraper_token = self.need("SCRAPER_SECRET_TOKEN", self.secret("SCRAPER_SECRET_TOKEN"))
        resend_api_key = self.need("RESEND_API_KEY", self.secret("RESEND_API_KEY"), when=resend, why=why_resend)
        resend_api_url = self.url(
            "RESEND_API_URL", self.raw("RESEND_API_URL") or "https://api.resend.com", ("http", "https")
        )
        from_email = self.need(
            "NOTIFICATION_FROM_EMAIL", self.raw("NOTIFICATION_FROM_EMAIL"), when=resend, why=why_resend
        )
        if from_email and "@" not in from_email:
            self.problems.append(f"NOTIFICATION_FROM_EMAIL is not an email address: {from_email!r}")
        unsubscribe_key = self.need(
            "SUPABASE_SERVICE_ROLE_KEY",
            self.secret("SUPABASE_SERVICE_ROLE_KEY", "UNSUBSCRIBE_SIGNING_SECRET"),
            when=resend,
            why=f"{why_resend} (it signs unsubscribe links; alias UNSUBSCRIBE_SIGNING_SECRET)",
        )
        site_primary, site_alias = self.raw("NEXT_PUBLIC_SITE_URL"), self.raw("SITE_URL")
        if site_primary and site_alias and site_primary.rstrip("/") != site_alias.rstrip("/"):
            self.problems.append("NEXT_PUBLIC_SITE_URL and SITE_URL are both set and differ; set one")
        site_url = self.url(
            "NEXT_PUBLIC_SITE_URL",
            (site_primary or site_alias or "https://pickmyclass.app").rstrip("/"),
            ("http", "https"),
        )
        return _Services(
            database_url=Secret(database_url),
            redis_url=Secret(redis_url),
            scraper_url=scraper_url,
            scraper_token=Secret(scraper_token),
            resend_api_key=Secret(resend_api_key),
            resend_api_url=resend_api_url.rstrip("/"),
            from_email=from_email,
            site_url=site_url,
            unsubscribe_key=Secret(unsubscribe_key),
        )

    def _outbox_dir(self, transport: EmailTransport) -> Path | None:
        text = self.raw("SEATWATCH_OUTBOX_DIR")
        outbox_dir = Path(text) if text else None
        if transport == "file" and outbox_dir is None and self.needs == NEEDS_ALL:
            self.problems.append("SEATWATCH_OUTBOX_DIR is required when SEATWATCH_EMAIL_TRANSPORT is file")
        return outbox_dir

    def _schedule(self) -> _Schedule:
        """When sections are checked (the cron, or adaptive intervals) and how many at once."""
        cron = self.raw("SEATWATCH_CRON") or "0,30 * * * *"
        timezone = self.raw("SEATWATCH_TIMEZONE") or "America/Phoenix"
        self._zone(timezone)
        if not croniter.is_valid(cron):
            self.problems.append(f"SEATWATCH_CRON is not a valid cron expression: {cron!r}")
        stagger = self.choice("SEATWATCH_STAGGER", "parity", STAGGERS)
        concurrency_max = self.integer("SEATWATCH_CONCURRENCY_MAX", 32, high=256)
        concurrency_auto = (self.raw("SEATWATCH_CONCURRENCY") or "").strip().lower() == "auto"
        concurrency = concurrency_max if concurrency_auto else self.integer("SEATWATCH_CONCURRENCY", 4, high=256)
        return _Schedule(
            cron=cron,
            timezone=timezone,
            stagger=stagger,
            concurrency=concurrency,
            concurrency_auto=concurrency_auto,
            concurrency_max=concurrency_max,
            schedule=self.choice("SEATWATCH_SCHEDULE", "cron", SCHEDULES),
            max_check_interval_s=self.integer("SEATWATCH_MAX_CHECK_INTERVAL_S", 3600, high=86400 * 7),
            min_check_interval_s=self.integer("SEATWATCH_MIN_CHECK_INTERVAL_S", 120, high=86400 * 7),
            scrapes_per_hour=self.integer("SEATWATCH_SCRAPES_PER_HOUR", 3600, high=10**7),
        )

    def _identity(self) -> _Identity:
        """Where health listens, and the names this daemon goes by in Redis."""
        health_host, health_port = self._listen(self.raw("SEATWATCH_HEALTH_LISTEN") or "127.0.0.1:8080")
        prefix = self.raw("SEATWATCH_REDIS_PREFIX") or "seatwatch"
        if not re.fullmatch(r"[A-Za-z0-9_.:\-]{1,64}", prefix):
            self.problems.append(
                "SEATWATCH_REDIS_PREFIX may hold only letters, digits and _ . : - (1 to 64 characters)"
            )
        consumer = self.raw("SEATWATCH_CONSUMER") or self.hostname() or "seatwatch"
        if not re.fullmatch(r"[A-Za-z0-9_.:\-]{1,128}", consumer):
            self.problems.append("SEATWATCH_CONSUMER may hold only letters, digits and _ . : - (1 to 128 characters)")
        return _Identity(health_host=health_host, health_port=health_port, redis_prefix=prefix, consumer=consumer)

    def _limits(self) -> _Limits:
        """Timeouts, retries, the breaker, the lock, the Redis budget, the logs, email quotas and retention."""
        return _Limits(
            scraper_timeout_s=self.seconds("SEATWATCH_SCRAPER_TIMEOUT_S", 90),
            visibility_timeout_s=self.seconds("SEATWATCH_VISIBILITY_TIMEOUT_S", 300),
            max_attempts=self.integer("SEATWATCH_MAX_ATTEMPTS", 3, high=100),
            breaker_failures=self.integer("SEATWATCH_BREAKER_FAILURES", 10, high=10_000),
            breaker_recovery_s=self.seconds("SEATWATCH_BREAKER_RECOVERY_S", 120),
            breaker_successes=self.integer("SEATWATCH_BREAKER_SUCCESSES", 3, high=10_000),
            breaker_half_open_max=self.integer("SEATWATCH_BREAKER_HALF_OPEN_MAX", 3, high=10_000),
            lock_ttl_s=self.seconds("SEATWATCH_LOCK_TTL_S", 1500),
            misfire_grace_s=self.seconds("SEATWATCH_MISFIRE_GRACE_S", 600, low=0),
            shutdown_grace_s=self.seconds("SEATWATCH_SHUTDOWN_GRACE_S", 60, low=0),
            redis_budget_per_day=self.integer("SEATWATCH_REDIS_BUDGET_PER_DAY", 16000, high=10**9),
            log_format=self.choice("SEATWATCH_LOG_FORMAT", "text", LOG_FORMATS),
            log_level=self.choice("SEATWATCH_LOG_LEVEL", "info", LOG_LEVELS),
            email_quota_per_day=self.integer("SEATWATCH_EMAIL_QUOTA_PER_DAY", 100, low=0, high=10**9),
            email_quota_per_month=self.integer("SEATWATCH_EMAIL_QUOTA_PER_MONTH", 3000, low=0, high=10**9),
            retention=self.choice("SEATWATCH_RETENTION", "off", ON_OFF) == "on",
        )

    def _cross_check(self, schedule: _Schedule, limits: _Limits, timeout_stop_s: float | None) -> None:
        """Relationships between values that are each fine alone."""
        visibility_s, scraper_s = limits["visibility_timeout_s"], limits["scraper_timeout_s"]
        if visibility_s <= scraper_s:
            self.problems.append(
                f"SEATWATCH_VISIBILITY_TIMEOUT_S ({visibility_s:g}) must be greater than "
                f"SEATWATCH_SCRAPER_TIMEOUT_S ({scraper_s:g}), or running jobs get taken over"
            )
        cron, lock_ttl_s = schedule["cron"], limits["lock_ttl_s"]
        tz = self._zone(schedule["timezone"], report=False)
        if croniter.is_valid(cron) and tz is not None:
            period_s = shortest_cron_gap_s(cron, tz)
            if lock_ttl_s >= period_s:
                self.problems.append(
                    f"SEATWATCH_LOCK_TTL_S ({lock_ttl_s:g}) must be less than the cron period "
                    f"({period_s:g}s, the shortest gap between ticks of {cron!r})"
                )
        min_s, max_s = schedule["min_check_interval_s"], schedule["max_check_interval_s"]
        if min_s > max_s:
            self.problems.append(
                f"SEATWATCH_MIN_CHECK_INTERVAL_S ({min_s}) must not exceed SEATWATCH_MAX_CHECK_INTERVAL_S ({max_s})"
            )
        grace_s = limits["shutdown_grace_s"]
        if timeout_stop_s is not None and grace_s >= timeout_stop_s:
            self.problems.append(
                f"SEATWATCH_SHUTDOWN_GRACE_S ({grace_s:g}) must be less than systemd's "
                f"TimeoutStopSec ({timeout_stop_s:g}), or systemd kills the drain"
            )

    def _zone(self, name: str, *, report: bool = True) -> zoneinfo.ZoneInfo | None:
        try:
            return zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            if report:
                self.problems.append(f"SEATWATCH_TIMEZONE is not a known time zone: {name!r}")
            return None

    def _listen(self, text: str) -> tuple[str, int]:
        match = re.fullmatch(r"\[(?P<v6>[0-9a-fA-F:.]+)\]:(?P<p6>\d+)|(?P<host>[^:\[\]]+):(?P<port>\d+)", text)
        if match is None:
            self.problems.append(f"SEATWATCH_HEALTH_LISTEN must be host:port or [v6]:port (got {text!r})")
            return "127.0.0.1", 8080
        host = match["v6"] or match["host"]
        port = int(match["p6"] or match["port"])
        if not 0 <= port <= 65535:
            self.problems.append(f"SEATWATCH_HEALTH_LISTEN port must be 0..65535 (got {port})")
            return host, 8080
        return host, port


def secret_values(settings: Settings) -> list[str]:
    """Every secret string in ``settings``, for the log redaction filter (defence in depth)."""
    found: list[str] = []
    for f in fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, Secret) and value:
            found.append(value.reveal())
    # The password inside a URL is a secret too, even when the URL itself is shown redacted.
    for url in (settings.database_url.reveal(), settings.redis_url.reveal()):
        found += url_passwords(url)
    return [s for s in found if len(s) >= 4]
