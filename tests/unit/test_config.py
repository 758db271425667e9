"""Settings.from_env: every variable of SPEC §2, its default, its error, secrets, aliases and cross-checks."""

from __future__ import annotations

import re
import string
import zoneinfo
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from daemon.cron.slots import shortest_cron_gap_s
from daemon.errors import ConfigError
from daemon.secret import redact_url
from daemon.settings.config import (
    NEEDS_ALL,
    NEEDS_DATABASE,
    NEEDS_REDIS,
    NEEDS_STORES,
    Settings,
    secret_values,
)
from daemon.upstream.scraper import scrape_url

DB_PASSWORD = "pg-pass-5e1f"
REDIS_PASSWORD = "redis-pass-77aa"
TOKEN = "scraper-token-0c9d"
RESEND = "re_resend_key_31b4"
SIGNING = "service-role-key-a8e2"
SECRETS = (DB_PASSWORD, REDIS_PASSWORD, TOKEN, RESEND, SIGNING)


def full_env(**overrides: str) -> dict[str, str]:
    """A complete, valid environment; ``overrides`` replace (or with "" remove) entries."""
    env = {
        "DATABASE_URL": f"postgresql://seatwatch:{DB_PASSWORD}@db.example.com:5432/postgres",
        "REDIS_URL": f"rediss://default:{REDIS_PASSWORD}@redis.example.com:6379",
        "SCRAPER_URL": "https://scraper.example.com",
        "SCRAPER_SECRET_TOKEN": TOKEN,
        "RESEND_API_KEY": RESEND,
        "NOTIFICATION_FROM_EMAIL": "notify@pickmyclass.app",
        "SUPABASE_SERVICE_ROLE_KEY": SIGNING,
    }
    for name, value in overrides.items():
        if value == "":
            env.pop(name, None)
        else:
            env[name] = value
    return env


def parse(env: dict[str, str], **kwargs: Any) -> Settings:
    return Settings.from_env(env, hostname=lambda: "vps-1", **kwargs)


def problems_of(env: dict[str, str], **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(env, **kwargs)
    return info.value.problems


# -- defaults and values ---------------------------------------------------------------------------------------


def test_defaults() -> None:
    """Every optional variable of SPEC §2 takes its documented default."""
    s = parse(full_env())
    assert s.resend_api_url == "https://api.resend.com"
    assert s.site_url == "https://pickmyclass.app"
    assert s.email_transport == "resend"
    assert s.outbox_dir is None
    assert s.cron == "0,30 * * * *"
    assert s.timezone == "America/Phoenix"
    assert s.tz == zoneinfo.ZoneInfo("America/Phoenix")
    assert s.stagger == "parity"
    assert s.concurrency == 4
    assert (s.health_host, s.health_port) == ("127.0.0.1", 8080)
    assert s.redis_prefix == "seatwatch"
    assert s.consumer == "vps-1"
    assert s.scraper_timeout_s == 90
    assert s.visibility_timeout_s == 300
    assert s.max_attempts == 3
    assert (s.breaker_failures, s.breaker_recovery_s, s.breaker_successes, s.breaker_half_open_max) == (10, 120, 3, 3)
    assert s.lock_ttl_s == 1500
    assert s.misfire_grace_s == 600
    assert s.shutdown_grace_s == 60
    assert s.redis_budget_per_day == 16000
    assert s.log_format == "text"
    assert s.needs == NEEDS_ALL


def test_required_values_are_read() -> None:
    """The required variables end up in the settings, secrets revealed only on request."""
    s = parse(full_env())
    assert s.database_url.reveal() == f"postgresql://seatwatch:{DB_PASSWORD}@db.example.com:5432/postgres"
    assert s.redis_url.reveal() == f"rediss://default:{REDIS_PASSWORD}@redis.example.com:6379"
    assert s.scraper_url == "https://scraper.example.com"
    assert s.scraper_token.reveal() == TOKEN
    assert s.resend_api_key.reveal() == RESEND
    assert s.from_email == "notify@pickmyclass.app"
    assert s.unsubscribe_key.reveal() == SIGNING


def test_every_variable_is_read() -> None:
    """Set values replace every default, with whitespace trimmed and choices case-insensitive."""
    s = parse(
        full_env(
            RESEND_API_URL="http://127.0.0.1:9999/",
            NEXT_PUBLIC_SITE_URL="https://example.edu/",
            SEATWATCH_CRON="*/15 * * * *",
            SEATWATCH_TIMEZONE="America/New_York",
            SEATWATCH_STAGGER="NONE",
            SEATWATCH_CONCURRENCY=" 8 ",
            SEATWATCH_HEALTH_LISTEN="0.0.0.0:9090",
            SEATWATCH_REDIS_PREFIX="sw:staging",
            SEATWATCH_CONSUMER="worker-2",
            SEATWATCH_SCRAPER_TIMEOUT_S="2.5",
            SEATWATCH_VISIBILITY_TIMEOUT_S="30",
            SEATWATCH_MAX_ATTEMPTS="5",
            SEATWATCH_BREAKER_FAILURES="7",
            SEATWATCH_BREAKER_RECOVERY_S="45",
            SEATWATCH_BREAKER_SUCCESSES="2",
            SEATWATCH_BREAKER_HALF_OPEN_MAX="1",
            SEATWATCH_LOCK_TTL_S="600",
            SEATWATCH_MISFIRE_GRACE_S="0",
            SEATWATCH_SHUTDOWN_GRACE_S="15",
            SEATWATCH_REDIS_BUDGET_PER_DAY="500000",
            SEATWATCH_LOG_FORMAT="json",
        )
    )
    assert s.resend_api_url == "http://127.0.0.1:9999"
    assert s.site_url == "https://example.edu"
    assert s.cron == "*/15 * * * *"
    assert s.timezone == "America/New_York"
    assert s.stagger == "none"
    assert s.concurrency == 8
    assert (s.health_host, s.health_port) == ("0.0.0.0", 9090)
    assert s.redis_prefix == "sw:staging"
    assert s.consumer == "worker-2"
    assert s.scraper_timeout_s == 2.5
    assert s.visibility_timeout_s == 30
    assert s.max_attempts == 5
    assert (s.breaker_failures, s.breaker_recovery_s, s.breaker_successes, s.breaker_half_open_max) == (7, 45, 2, 1)
    assert s.lock_ttl_s == 600
    assert s.misfire_grace_s == 0
    assert s.shutdown_grace_s == 15
    assert s.redis_budget_per_day == 500000
    assert s.log_format == "json"


def test_missing_required_variables_are_all_named() -> None:
    """An empty environment names every required variable in one ConfigError."""
    problems = problems_of({})
    for name in (
        "DATABASE_URL",
        "REDIS_URL",
        "SCRAPER_URL",
        "SCRAPER_SECRET_TOKEN",
        "RESEND_API_KEY",
        "NOTIFICATION_FROM_EMAIL",
        "SUPABASE_SERVICE_ROLE_KEY",
    ):
        assert any(p.startswith(f"{name} is required") for p in problems), (name, problems)
    assert len(problems) == 7


def test_blank_variable_counts_as_unset() -> None:
    """A variable set to whitespace only is reported as missing, not accepted as empty."""
    problems = problems_of(full_env(SCRAPER_URL="   "))
    assert problems == ["SCRAPER_URL is required"]


def test_blank_secret_counts_as_unset() -> None:
    """A secret set to whitespace only is reported as missing, never accepted as an empty token."""
    problems = problems_of(full_env(SCRAPER_SECRET_TOKEN="   "))
    assert problems == ["SCRAPER_SECRET_TOKEN is required"]


BAD_VALUES = [
    ("SEATWATCH_CONCURRENCY", "four", "SEATWATCH_CONCURRENCY must be a whole number (got 'four')"),
    ("SEATWATCH_CONCURRENCY", "0", "SEATWATCH_CONCURRENCY must be between 1 and 256 (got 0)"),
    ("SEATWATCH_CONCURRENCY", "1000", "SEATWATCH_CONCURRENCY must be between 1 and 256 (got 1000)"),
    ("SEATWATCH_MAX_ATTEMPTS", "2.5", "SEATWATCH_MAX_ATTEMPTS must be a whole number (got '2.5')"),
    ("SEATWATCH_BREAKER_FAILURES", "-1", "SEATWATCH_BREAKER_FAILURES must be between 1 and"),
    ("SEATWATCH_BREAKER_SUCCESSES", "x", "SEATWATCH_BREAKER_SUCCESSES must be a whole number"),
    ("SEATWATCH_BREAKER_HALF_OPEN_MAX", "0", "SEATWATCH_BREAKER_HALF_OPEN_MAX must be between 1 and"),
    ("SEATWATCH_REDIS_BUDGET_PER_DAY", "lots", "SEATWATCH_REDIS_BUDGET_PER_DAY must be a whole number"),
    ("SEATWATCH_SCRAPER_TIMEOUT_S", "fast", "SEATWATCH_SCRAPER_TIMEOUT_S must be a number of seconds (got 'fast')"),
    ("SEATWATCH_SCRAPER_TIMEOUT_S", "-5", "SEATWATCH_SCRAPER_TIMEOUT_S must be between"),
    ("SEATWATCH_SCRAPER_TIMEOUT_S", "nan", "SEATWATCH_SCRAPER_TIMEOUT_S must be between"),
    ("SEATWATCH_BREAKER_RECOVERY_S", "inf", "SEATWATCH_BREAKER_RECOVERY_S must be between"),
    ("SEATWATCH_LOCK_TTL_S", "0", "SEATWATCH_LOCK_TTL_S must be between"),
    ("SEATWATCH_MISFIRE_GRACE_S", "-1", "SEATWATCH_MISFIRE_GRACE_S must be between 0"),
    ("SEATWATCH_SHUTDOWN_GRACE_S", "soon", "SEATWATCH_SHUTDOWN_GRACE_S must be a number of seconds"),
    ("SEATWATCH_STAGGER", "random", "SEATWATCH_STAGGER must be one of parity, none (got 'random')"),
    ("SEATWATCH_LOG_FORMAT", "xml", "SEATWATCH_LOG_FORMAT must be one of text, json (got 'xml')"),
    ("SEATWATCH_EMAIL_TRANSPORT", "smtp", "SEATWATCH_EMAIL_TRANSPORT must be one of resend, file (got 'smtp')"),
    ("SEATWATCH_CRON", "61 * * * *", "SEATWATCH_CRON is not a valid cron expression: '61 * * * *'"),
    ("SEATWATCH_CRON", "every hour", "SEATWATCH_CRON is not a valid cron expression"),
    ("SEATWATCH_TIMEZONE", "Mars/Olympus_Mons", "SEATWATCH_TIMEZONE is not a known time zone"),
    ("SEATWATCH_HEALTH_LISTEN", "8080", "SEATWATCH_HEALTH_LISTEN must be host:port or [v6]:port (got '8080')"),
    ("SEATWATCH_HEALTH_LISTEN", "::1:8080", "SEATWATCH_HEALTH_LISTEN must be host:port or [v6]:port"),
    ("SEATWATCH_HEALTH_LISTEN", "localhost:http", "SEATWATCH_HEALTH_LISTEN must be host:port or [v6]:port"),
    ("SEATWATCH_HEALTH_LISTEN", "127.0.0.1:70000", "SEATWATCH_HEALTH_LISTEN port must be 0..65535 (got 70000)"),
    ("SEATWATCH_REDIS_PREFIX", "has space", "SEATWATCH_REDIS_PREFIX may hold only"),
    ("SEATWATCH_CONSUMER", "me/you", "SEATWATCH_CONSUMER may hold only"),
    ("NOTIFICATION_FROM_EMAIL", "nobody", "NOTIFICATION_FROM_EMAIL is not an email address: 'nobody'"),
    ("REDIS_URL", "http://redis.example.com", "REDIS_URL must start with redis://, rediss://, unix://"),
    ("REDIS_URL", "redis://", "REDIS_URL has no host"),
    ("REDIS_URL", "unix://", "REDIS_URL has no socket path"),
    ("REDIS_URL", "redis://redis.example.com:port", "REDIS_URL has an invalid port"),
    ("DATABASE_URL", "mysql://db.example.com/x", "DATABASE_URL must start with postgres://, postgresql://"),
    ("DATABASE_URL", "postgresql:///postgres", "DATABASE_URL has no host"),
    ("DATABASE_URL", "postgresql://db.example.com:99999/x", "DATABASE_URL has an invalid port"),
    ("DATABASE_URL", "postgresql://h:6432/x?statement_cache_size=off", "DATABASE_URL statement_cache_size must be"),
    ("SCRAPER_URL", "ftp://scraper.example.com", "SCRAPER_URL must start with http://, https://"),
    ("SCRAPER_URL", "https://", "SCRAPER_URL has no host"),
    ("SCRAPER_URL", "http://[::1", "SCRAPER_URL is not a valid URL"),
    ("RESEND_API_URL", "api.resend.com", "RESEND_API_URL must start with http://, https://"),
    ("NEXT_PUBLIC_SITE_URL", "pickmyclass.app", "NEXT_PUBLIC_SITE_URL must start with http://, https://"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_VALUES)
def test_bad_value_is_reported(name: str, value: str, message: str) -> None:
    """A bad value is one problem, naming the variable and what is wrong with it."""
    problems = problems_of(full_env(**{name: value}))
    assert len(problems) == 1, problems
    assert problems[0].startswith(message), problems


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REDIS_URL", "redis://localhost:6379/0"),
        ("REDIS_URL", "rediss://default:pw@eu1-quiet-owl.upstash.io:6379"),
        ("REDIS_URL", "unix:///run/redis/redis.sock"),
        ("REDIS_URL", "unix:///run/redis/redis.sock?db=2"),
        ("DATABASE_URL", "postgres://u:p@localhost/db"),
        ("DATABASE_URL", "postgresql://postgres.abc:pw@aws-0-us-west-1.pooler.supabase.com:5432/postgres"),
        ("DATABASE_URL", "postgresql:///seatwatch?host=/run/postgresql"),
        ("DATABASE_URL", "postgresql://app@127.0.0.1:6432/seatwatch?statement_cache_size=0"),
        ("DATABASE_URL", "postgresql://app:pw@/seatwatch?host=/var/run/postgresql&port=5433"),
        ("SCRAPER_URL", "http://127.0.0.1:3000/"),
        ("SCRAPER_URL", "https://scraper.example.com/api"),
    ],
)
def test_accepted_urls(name: str, value: str) -> None:
    """Every documented URL form parses: redis, rediss, unix sockets, Postgres DSNs with a host= query."""
    s = parse(full_env(**{name: value}))
    parsed = {"REDIS_URL": s.redis_url.reveal(), "DATABASE_URL": s.database_url.reveal(), "SCRAPER_URL": s.scraper_url}
    assert parsed[name] == value


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:8081", "127.0.0.1", 8081),
        ("localhost:0", "localhost", 0),
        ("[::1]:9000", "::1", 9000),
        ("[::]:8080", "::", 8080),
        ("0.0.0.0:65535", "0.0.0.0", 65535),
    ],
)
def test_health_listen_forms(listen: str, host: str, port: int) -> None:
    """SEATWATCH_HEALTH_LISTEN takes host:port and [v6]:port."""
    s = parse(full_env(SEATWATCH_HEALTH_LISTEN=listen))
    assert (s.health_host, s.health_port) == (host, port)


def test_consumer_defaults_to_host_name() -> None:
    """Without SEATWATCH_CONSUMER the consumer name is the host name; an explicit one wins."""
    assert Settings.from_env(full_env(), hostname=lambda: "oracle-arm-7").consumer == "oracle-arm-7"
    explicit = Settings.from_env(full_env(SEATWATCH_CONSUMER="blue"), hostname=lambda: "oracle-arm-7")
    assert explicit.consumer == "blue"


# -- secrets from files --------------------------------------------------------------------------------------


def test_secret_from_name_file(tmp_path: Path) -> None:
    """NAME_FILE supplies a secret, trailing newline trimmed."""
    path = tmp_path / "token"
    path.write_text("file-token-123\n")
    s = parse(full_env(SCRAPER_SECRET_TOKEN="", SCRAPER_SECRET_TOKEN_FILE=str(path)))
    assert s.scraper_token.reveal() == "file-token-123"


def test_secret_from_credentials_directory(tmp_path: Path) -> None:
    """A lower-case file in $CREDENTIALS_DIRECTORY supplies a secret (systemd LoadCredential=)."""
    (tmp_path / "resend_api_key").write_text("re_from_credential\n")
    (tmp_path / "database_url").write_text("postgresql://app:credpw@db.example.com/postgres\n")
    s = parse(full_env(RESEND_API_KEY="", DATABASE_URL="", CREDENTIALS_DIRECTORY=str(tmp_path)))
    assert s.resend_api_key.reveal() == "re_from_credential"
    assert s.database_url.reveal() == "postgresql://app:credpw@db.example.com/postgres"


def test_secret_from_the_units_credential_folder(tmp_path: Path) -> None:
    """LoadCredential=seatwatch:/etc/seatwatch/credentials hands each file over as seatwatch_<name>."""
    (tmp_path / "seatwatch_database_url").write_text("postgresql://app:folderpw@db.example.com/postgres\n")
    (tmp_path / "seatwatch_scraper_secret_token").write_text("tok-from-folder")
    s = parse(full_env(DATABASE_URL="", SCRAPER_SECRET_TOKEN="", CREDENTIALS_DIRECTORY=str(tmp_path)))
    assert s.database_url.reveal() == "postgresql://app:folderpw@db.example.com/postgres"
    assert s.scraper_token.reveal() == "tok-from-folder"


def test_alias_secret_from_credentials_directory(tmp_path: Path) -> None:
    """The UNSUBSCRIBE_SIGNING_SECRET alias is found as a credential file too."""
    (tmp_path / "unsubscribe_signing_secret").write_text("signing-from-cred")
    s = parse(full_env(SUPABASE_SERVICE_ROLE_KEY="", CREDENTIALS_DIRECTORY=str(tmp_path)))
    assert s.unsubscribe_key.reveal() == "signing-from-cred"


def test_secret_and_secret_file_both_set(tmp_path: Path) -> None:
    """NAME and NAME_FILE both set is one problem saying so, not also a claim that the secret is missing."""
    path = tmp_path / "token"
    path.write_text("other")
    problems = problems_of(full_env(SCRAPER_SECRET_TOKEN_FILE=str(path)))
    assert problems == ["SCRAPER_SECRET_TOKEN and SCRAPER_SECRET_TOKEN_FILE are both set; set only one"]


def test_secret_file_missing(tmp_path: Path) -> None:
    """A NAME_FILE that cannot be read is a problem naming the file."""
    path = tmp_path / "absent"
    problems = problems_of(full_env(RESEND_API_KEY="", RESEND_API_KEY_FILE=str(path)))
    assert any(p.startswith(f"RESEND_API_KEY_FILE: cannot read {path}") for p in problems), problems


def test_secret_file_is_a_directory(tmp_path: Path) -> None:
    """A NAME_FILE pointing at a directory is unreadable, and reported."""
    problems = problems_of(full_env(RESEND_API_KEY="", RESEND_API_KEY_FILE=str(tmp_path)))
    assert any(p.startswith(f"RESEND_API_KEY_FILE: cannot read {tmp_path}") for p in problems), problems


@pytest.mark.parametrize("content", ["", "\n", "   \n\t"])
def test_secret_file_empty(tmp_path: Path, content: str) -> None:
    """An empty (or blank) secret file is a problem, never an empty secret."""
    path = tmp_path / "key"
    path.write_text(content)
    problems = problems_of(full_env(RESEND_API_KEY="", RESEND_API_KEY_FILE=str(path)))
    assert f"RESEND_API_KEY_FILE: {path} is empty" in problems


def test_empty_credential_file(tmp_path: Path) -> None:
    """An empty file in $CREDENTIALS_DIRECTORY is a problem too."""
    (tmp_path / "scraper_secret_token").write_text("")
    problems = problems_of(full_env(SCRAPER_SECRET_TOKEN="", CREDENTIALS_DIRECTORY=str(tmp_path)))
    assert any("scraper_secret_token" in p and "is empty" in p for p in problems), problems


# -- aliases -------------------------------------------------------------------------------------------------


def test_site_url_alias() -> None:
    """SITE_URL stands in for NEXT_PUBLIC_SITE_URL, trailing slash dropped."""
    assert parse(full_env(SITE_URL="https://staging.pickmyclass.app/")).site_url == "https://staging.pickmyclass.app"


def test_site_url_both_set_and_equal() -> None:
    """NEXT_PUBLIC_SITE_URL and SITE_URL may both be set when they agree (trailing slash aside)."""
    s = parse(full_env(NEXT_PUBLIC_SITE_URL="https://a.example/", SITE_URL="https://a.example"))
    assert s.site_url == "https://a.example"


def test_site_url_conflict() -> None:
    """NEXT_PUBLIC_SITE_URL and SITE_URL that differ are a problem."""
    problems = problems_of(full_env(NEXT_PUBLIC_SITE_URL="https://a.example", SITE_URL="https://b.example"))
    assert problems == ["NEXT_PUBLIC_SITE_URL and SITE_URL are both set and differ; set one"]


def test_signing_secret_alias() -> None:
    """UNSUBSCRIBE_SIGNING_SECRET stands in for SUPABASE_SERVICE_ROLE_KEY."""
    s = parse(full_env(SUPABASE_SERVICE_ROLE_KEY="", UNSUBSCRIBE_SIGNING_SECRET="alias-signing-key"))
    assert s.unsubscribe_key.reveal() == "alias-signing-key"


def test_signing_secret_required_names_alias() -> None:
    """The missing signing key problem mentions its alias, so an operator knows either works."""
    problems = problems_of(full_env(SUPABASE_SERVICE_ROLE_KEY=""))
    assert len(problems) == 1
    assert problems[0].startswith("SUPABASE_SERVICE_ROLE_KEY is required")
    assert "UNSUBSCRIBE_SIGNING_SECRET" in problems[0]


# -- transports ----------------------------------------------------------------------------------------------


def test_file_transport_needs_outbox_dir() -> None:
    """transport=file without SEATWATCH_OUTBOX_DIR is a problem."""
    problems = problems_of(full_env(SEATWATCH_EMAIL_TRANSPORT="file"))
    assert problems == ["SEATWATCH_OUTBOX_DIR is required when SEATWATCH_EMAIL_TRANSPORT is file"]


def test_file_transport_needs_no_resend_variables(tmp_path: Path) -> None:
    """transport=file needs neither the Resend key, the From address nor the signing key."""
    env = full_env(
        SEATWATCH_EMAIL_TRANSPORT="file",
        SEATWATCH_OUTBOX_DIR=str(tmp_path),
        RESEND_API_KEY="",
        NOTIFICATION_FROM_EMAIL="",
        SUPABASE_SERVICE_ROLE_KEY="",
    )
    s = parse(env)
    assert s.email_transport == "file"
    assert s.outbox_dir == tmp_path


def test_resend_transport_needs_resend_variables() -> None:
    """transport=resend requires the key, the From address and the signing key, saying why."""
    problems = problems_of(full_env(RESEND_API_KEY="", NOTIFICATION_FROM_EMAIL="", SUPABASE_SERVICE_ROLE_KEY=""))
    assert len(problems) == 3
    assert all("when SEATWATCH_EMAIL_TRANSPORT is resend" in p for p in problems)


# -- needs ------------------------------------------------------------------------------------------------------


def test_needs_database_requires_only_database_url() -> None:
    """needs=database (migrate) accepts an environment holding only DATABASE_URL."""
    s = parse({"DATABASE_URL": "postgresql://localhost/postgres"}, needs=NEEDS_DATABASE)
    assert s.needs == NEEDS_DATABASE
    assert s.database_url.reveal() == "postgresql://localhost/postgres"


def test_needs_database_reports_missing_database_url_only() -> None:
    """needs=database with nothing set names DATABASE_URL and nothing else."""
    assert problems_of({}, needs=NEEDS_DATABASE) == ["DATABASE_URL is required"]


def test_needs_redis_reports_missing_redis_url_only() -> None:
    """needs=redis with nothing set names REDIS_URL and nothing else."""
    assert problems_of({}, needs=NEEDS_REDIS) == ["REDIS_URL is required"]
    assert parse({"REDIS_URL": "redis://localhost"}, needs=NEEDS_REDIS).redis_url.reveal() == "redis://localhost"


def test_needs_stores_requires_both_stores() -> None:
    """needs=stores (tick, status) requires Postgres and Redis, not the HTTP services."""
    assert sorted(problems_of({}, needs=NEEDS_STORES)) == ["DATABASE_URL is required", "REDIS_URL is required"]
    s = parse({"DATABASE_URL": "postgresql://localhost/x", "REDIS_URL": "redis://localhost"}, needs=NEEDS_STORES)
    assert s.scraper_url == ""


def test_needs_narrowing_still_validates_given_values() -> None:
    """A narrowed command still refuses a malformed value it was given."""
    problems = problems_of({"DATABASE_URL": "postgresql://db:notaport/x"}, needs=NEEDS_DATABASE)
    assert problems == ["DATABASE_URL has an invalid port: 'postgresql://db:notaport/x'"]


def test_needs_database_skips_outbox_dir_requirement() -> None:
    """migrate with transport=file does not ask for SEATWATCH_OUTBOX_DIR."""
    s = parse({"DATABASE_URL": "postgresql://localhost/x", "SEATWATCH_EMAIL_TRANSPORT": "file"}, needs=NEEDS_DATABASE)
    assert s.email_transport == "file"


# -- cross-checks --------------------------------------------------------------------------------------------


def test_visibility_equal_to_scraper_timeout_refused() -> None:
    """The visibility timeout must exceed the scraper timeout (equal is refused)."""
    problems = problems_of(full_env(SEATWATCH_SCRAPER_TIMEOUT_S="120", SEATWATCH_VISIBILITY_TIMEOUT_S="120"))
    assert len(problems) == 1
    assert problems[0].startswith("SEATWATCH_VISIBILITY_TIMEOUT_S (120) must be greater than")


def test_visibility_just_above_scraper_timeout_accepted() -> None:
    """A visibility timeout one second above the scraper timeout is fine."""
    s = parse(full_env(SEATWATCH_SCRAPER_TIMEOUT_S="120", SEATWATCH_VISIBILITY_TIMEOUT_S="121"))
    assert s.visibility_timeout_s == 121


def test_lock_ttl_not_below_cron_period_refused() -> None:
    """A lock TTL of 1500 s with ticks every 10 minutes is refused, naming the 600 s period."""
    problems = problems_of(full_env(SEATWATCH_CRON="*/10 * * * *"))
    assert len(problems) == 1
    assert problems[0].startswith("SEATWATCH_LOCK_TTL_S (1500) must be less than the cron period (600s")


def test_lock_ttl_equal_to_cron_period_refused() -> None:
    """A lock TTL exactly the cron period is refused too."""
    problems = problems_of(full_env(SEATWATCH_CRON="*/10 * * * *", SEATWATCH_LOCK_TTL_S="600"))
    assert len(problems) == 1
    assert "SEATWATCH_LOCK_TTL_S (600)" in problems[0]


def test_lock_ttl_uses_shortest_gap() -> None:
    """The cron period is the shortest gap: '0,45' has gaps of 45 and 15 minutes, so TTL 1000 is refused."""
    problems = problems_of(full_env(SEATWATCH_CRON="0,45 * * * *", SEATWATCH_LOCK_TTL_S="1000"))
    assert len(problems) == 1
    assert "(900s" in problems[0]
    assert parse(full_env(SEATWATCH_CRON="0,45 * * * *", SEATWATCH_LOCK_TTL_S="899")).lock_ttl_s == 899


def test_invalid_cron_skips_lock_check() -> None:
    """An invalid cron is reported once, without a lock TTL cross-check on top."""
    problems = problems_of(full_env(SEATWATCH_CRON="* * *"))
    assert len(problems) == 1
    assert problems[0].startswith("SEATWATCH_CRON")


def test_shutdown_grace_against_systemd_stop_timeout() -> None:
    """The shutdown grace must be below systemd's stop timeout when that is known."""
    problems = problems_of(full_env(), timeout_stop_s=60.0)
    assert len(problems) == 1
    assert problems[0].startswith("SEATWATCH_SHUTDOWN_GRACE_S (60) must be less than systemd's TimeoutStopSec (60)")
    assert parse(full_env(), timeout_stop_s=90.0).shutdown_grace_s == 60
    assert parse(full_env(SEATWATCH_SHUTDOWN_GRACE_S="600")).shutdown_grace_s == 600


def test_all_problems_reported_together() -> None:
    """Several problems at once all appear in ConfigError.problems and in its message."""
    env = full_env(
        SEATWATCH_CONCURRENCY="many",
        SEATWATCH_CRON="not a cron",
        SCRAPER_URL="",
        SEATWATCH_VISIBILITY_TIMEOUT_S="60",
        SEATWATCH_STAGGER="sometimes",
    )
    with pytest.raises(ConfigError) as info:
        parse(env, timeout_stop_s=30.0)
    problems = info.value.problems
    starts = (
        "SEATWATCH_CONCURRENCY must be a whole number",
        "SEATWATCH_CRON is not a valid cron expression",
        "SCRAPER_URL is required",
        "SEATWATCH_VISIBILITY_TIMEOUT_S (60) must be greater than",
        "SEATWATCH_STAGGER must be one of",
        "SEATWATCH_SHUTDOWN_GRACE_S (60) must be less than",
    )
    for start in starts:
        assert any(p.startswith(start) for p in problems), (start, problems)
    assert len(problems) == len(starts)
    message = str(info.value)
    assert all(f"  - {p}" in message for p in problems)


# -- no secret shown -----------------------------------------------------------------------------------------


def assert_no_secret(text: str, secrets: tuple[str, ...] = SECRETS) -> None:
    for secret in secrets:
        assert secret not in text, f"secret {secret!r} shown in {text!r}"


def test_problems_never_show_secrets() -> None:
    """Problems about bad URLs and other values never repeat a password or token."""
    env = full_env(
        DATABASE_URL=f"postgresql://seatwatch:{DB_PASSWORD}@db.example.com:notaport/postgres",
        REDIS_URL=f"http://default:{REDIS_PASSWORD}@redis.example.com",
        SCRAPER_URL=f"ftp://user:{TOKEN}@scraper.example.com",
        SEATWATCH_CONCURRENCY="x",
    )
    with pytest.raises(ConfigError) as info:
        parse(env)
    assert len(info.value.problems) == 4
    assert_no_secret(str(info.value))
    assert_no_secret("\n".join(info.value.problems))


def test_keyword_dsn_password_never_shown() -> None:
    """A libpq keyword DSN ("host=... password=...") is refused without printing its password."""
    problems = problems_of(full_env(DATABASE_URL=f"host=db.example.com user=app password={DB_PASSWORD} dbname=x"))
    assert any(p.startswith("DATABASE_URL") for p in problems), problems
    assert_no_secret("\n".join(problems))


def test_password_query_parameter_never_shown() -> None:
    """A password given as the DSN's ?password= parameter appears in neither summary nor repr."""
    s = parse(full_env(DATABASE_URL=f"postgresql://app@db.example.com:5432/postgres?password={DB_PASSWORD}"))
    assert_no_secret(repr(s))
    assert_no_secret(str(s.summary()))


def test_repr_str_and_summary_hide_secrets() -> None:
    """repr, str and summary() of settings show no secret value, URLs keep their shape."""
    s = parse(full_env())
    for text in (repr(s), str(s), str(s.summary()), repr(s.scraper_token), f"{s.resend_api_key}"):
        assert_no_secret(text)
    assert "postgresql://seatwatch:***@db.example.com:5432/postgres" in repr(s)
    assert s.summary()["redis_url"] == "rediss://default:***@redis.example.com:6379"


def test_settings_are_frozen() -> None:
    """Settings cannot be changed after parsing."""
    s = parse(full_env())
    with pytest.raises(AttributeError):
        s.concurrency = 9  # type: ignore[misc]


_PASSWORD_CHARS = string.ascii_letters + string.digits + "-._~!$&'()*+,;="
_secret_text = st.text(
    st.characters(exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp")),
    min_size=4,
    max_size=40,
)


@given(
    token=_secret_text,
    resend=_secret_text,
    signing=_secret_text,
    password=st.text(_PASSWORD_CHARS, min_size=4, max_size=30),
)
def test_arbitrary_secrets_never_shown(token: str, resend: str, signing: str, password: str) -> None:
    """For any secret strings, repr(settings), str(settings) and summary() never contain them."""

    def texts(t: str, r: str, k: str, pw: str) -> str:
        s = parse(
            full_env(
                SCRAPER_SECRET_TOKEN=t,
                RESEND_API_KEY=r,
                SUPABASE_SERVICE_ROLE_KEY=k,
                DATABASE_URL=f"postgresql://app:{pw}@db.example.com:5432/postgres",
                REDIS_URL=f"redis://default:{pw}@redis.example.com:6379",
            )
        )
        return "\n".join((repr(s), str(s), str(s.summary())))

    # A secret that is a substring of the output anyway (say "5432") proves nothing either way.
    baseline = texts("PLACEHOLDER-A", "PLACEHOLDER-B", "PLACEHOLDER-C", "PLACEHOLDERPW")
    for secret in (token, resend, signing, password):
        assume(secret not in baseline)
    shown = texts(token, resend, signing, password)
    for secret in (token, resend, signing, password):
        assert secret not in shown


# -- helpers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://default:hunter2@host:6379", "redis://default:***@host:6379"),
        ("rediss://:hunter2@host", "rediss://:***@host"),
        ("postgresql://u:p%40ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("https://example.com/path", "https://example.com/path"),
        ("cannot reach redis://a:b@c:1 now", "cannot reach redis://a:***@c:1 now"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    """redact_url replaces the password of a URL (anywhere in a text) and leaves the rest."""
    assert redact_url(url) == redacted


@pytest.mark.parametrize(
    ("base", "joined"),
    [
        ("https://scraper.example.com", "https://scraper.example.com/scrape"),
        ("https://scraper.example.com/", "https://scraper.example.com/scrape"),
        ("https://scraper.example.com//", "https://scraper.example.com/scrape"),
        ("http://127.0.0.1:3000/api/", "http://127.0.0.1:3000/api/scrape"),
        ("http://127.0.0.1:3000/api", "http://127.0.0.1:3000/api/scrape"),
    ],
)
def test_scrape_url(base: str, joined: str) -> None:
    """{SCRAPER_URL}/scrape is joined without a double slash."""
    assert scrape_url(base) == joined


@given(path=st.lists(st.sampled_from(["api", "v1", "x-y"]), max_size=3), slashes=st.integers(0, 3))
def test_scrape_url_never_doubles_slash(path: list[str], slashes: int) -> None:
    """Whatever the base path and trailing slashes, /scrape is appended with exactly one slash."""
    base = "https://s.example.com" + "".join(f"/{p}" for p in path) + "/" * slashes
    joined = scrape_url(base)
    assert joined == "https://s.example.com" + "".join(f"/{p}" for p in path) + "/scrape"


@pytest.mark.parametrize(
    ("cron", "zone", "gap_s"),
    [
        ("0,30 * * * *", "America/Phoenix", 1800),
        ("*/10 * * * *", "America/Phoenix", 600),
        ("0,45 * * * *", "America/New_York", 900),
        ("0 * * * *", "Europe/London", 3600),
        ("0 9 * * 1-5", "America/Phoenix", 86400),
    ],
)
def test_shortest_cron_gap(cron: str, zone: str, gap_s: float) -> None:
    """shortest_cron_gap_s is the smallest distance between consecutive fire times."""
    assert shortest_cron_gap_s(cron, zoneinfo.ZoneInfo(zone)) == gap_s


def test_secret_values() -> None:
    """secret_values lists every secret and the passwords inside the store URLs."""
    values = secret_values(parse(full_env()))
    for secret in SECRETS:
        assert secret in values
    assert f"postgresql://seatwatch:{DB_PASSWORD}@db.example.com:5432/postgres" in values


def test_secret_values_skip_empty_and_short() -> None:
    """Unset secrets and values under four characters are not listed (they would scrub ordinary text)."""
    env = full_env(
        SEATWATCH_EMAIL_TRANSPORT="file",
        SEATWATCH_OUTBOX_DIR="/tmp/outbox",
        RESEND_API_KEY="",
        NOTIFICATION_FROM_EMAIL="",
        SUPABASE_SERVICE_ROLE_KEY="",
        REDIS_URL="redis://:abc@localhost:6379",
    )
    values = secret_values(parse(env))
    assert "" not in values
    assert "abc" not in values
    assert all(len(v) >= 4 for v in values)
    assert TOKEN in values


@pytest.mark.parametrize(
    ("url", "password"),
    [
        ("redis://default:ab/cd@host:6379/0", "ab/cd"),
        ("redis://default:p@ss@host", "p@ss"),
        ("rediss://:tok3n@up.example.io:6379", "tok3n"),
        ("postgresql://app:se'cret@db:5432/x", "se'cret"),
        ("postgresql://app@db/x?password=hunter22", "hunter22"),
    ],
)
def test_passwords_with_slashes_ats_and_quotes_are_redacted(url: str, password: str) -> None:
    """A password holding '/', '@' or a quote is redacted whole and handed to the log scrubber."""
    from daemon.secret import url_passwords

    assert password not in redact_url(url)
    assert url_passwords(url) == [password]


def test_adaptive_settings_default_to_cron_and_the_old_promise() -> None:
    """SPEC §11 defaults: cron schedule, 3600/120 s intervals, 3,600 scrapes/h, fixed concurrency, max 32."""
    s = parse(full_env())
    assert (s.schedule, s.max_check_interval_s, s.min_check_interval_s) == ("cron", 3600, 120)
    assert (s.scrapes_per_hour, s.concurrency_auto, s.concurrency_max) == (3600, False, 32)


def test_adaptive_settings_accept_compressed_time_and_auto_concurrency() -> None:
    """Any whole number of seconds >= 1 (min <= max) and SEATWATCH_CONCURRENCY=auto up to the ceiling."""
    s = parse(
        full_env(
            SEATWATCH_SCHEDULE="adaptive",
            SEATWATCH_MIN_CHECK_INTERVAL_S="1",
            SEATWATCH_MAX_CHECK_INTERVAL_S="1",
            SEATWATCH_CONCURRENCY="auto",
            SEATWATCH_CONCURRENCY_MAX="12",
        )
    )
    assert (s.schedule, s.min_check_interval_s, s.max_check_interval_s) == ("adaptive", 1, 1)
    assert s.concurrency_auto
    assert s.concurrency == 12  # the ceiling sizes pools and connections


def test_adaptive_settings_are_checked_together() -> None:
    """A min above the max, a zero interval, a fractional one and an unknown schedule are all reported."""
    found = problems_of(
        full_env(
            SEATWATCH_SCHEDULE="sometimes",
            SEATWATCH_MIN_CHECK_INTERVAL_S="600",
            SEATWATCH_MAX_CHECK_INTERVAL_S="300",
            SEATWATCH_SCRAPES_PER_HOUR="0",
            SEATWATCH_CONCURRENCY_MAX="1.5",
        )
    )
    text = "\n".join(found)
    assert "SEATWATCH_SCHEDULE" in text
    assert "SEATWATCH_MIN_CHECK_INTERVAL_S (600) must not exceed SEATWATCH_MAX_CHECK_INTERVAL_S (300)" in text
    assert "SEATWATCH_SCRAPES_PER_HOUR" in text
    assert "SEATWATCH_CONCURRENCY_MAX" in text
    assert problems_of(full_env(SEATWATCH_MIN_CHECK_INTERVAL_S="0"))


def test_email_quotas_and_retention() -> None:
    """Quotas default to Resend's free tier (100 / 3,000), 0 means none; retention is off unless 'on'."""
    defaults = parse(full_env())
    assert (defaults.email_quota_per_day, defaults.email_quota_per_month, defaults.retention) == (100, 3000, False)
    set_ = parse(
        full_env(SEATWATCH_EMAIL_QUOTA_PER_DAY="0", SEATWATCH_EMAIL_QUOTA_PER_MONTH="50000", SEATWATCH_RETENTION="ON")
    )
    assert (set_.email_quota_per_day, set_.email_quota_per_month, set_.retention) == (0, 50000, True)
    problems = problems_of(full_env(SEATWATCH_EMAIL_QUOTA_PER_DAY="-1", SEATWATCH_RETENTION="yes"))
    assert any("SEATWATCH_EMAIL_QUOTA_PER_DAY" in p for p in problems)
    assert any("SEATWATCH_RETENTION must be one of on, off" in p for p in problems)


def test_supabase_pooler_dsns_as_the_readme_gives_them_parse() -> None:
    """The README's session (5432) and transaction (6543) pooler DSNs with sslmode=require are valid settings."""
    from daemon.store.pool import connect_options

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    dsns = re.findall(r"postgresql://postgres\.[^\s`]+", readme)
    assert len(dsns) >= 2, "the README gives no Supabase pooler DSN"
    ports = set()
    for dsn in dsns:
        settings = parse(full_env(DATABASE_URL=dsn))
        options = connect_options(settings.database_url.reveal())
        assert "sslmode=require" in options["dsn"]
        ports.add(urlsplit(dsn).port)
        if urlsplit(dsn).port == 6543:
            assert options["statement_cache_size"] == 0
    assert ports == {5432, 6543}


def test_a_dsn_naming_supabases_ipv6_only_direct_host_is_warned_about() -> None:
    """db.<ref>.supabase.co gets a warning that points at the pooler; the pooler and other hosts get none."""
    from daemon.store.pool import dsn_warnings

    (warning,) = dsn_warnings("postgresql://postgres:pw@db.abcdefghijkl.supabase.co:5432/postgres")
    assert "IPv6" in warning
    assert "pooler.supabase.com" in warning
    assert "pw" not in warning
    assert dsn_warnings("postgresql://postgres.abcdefghijkl:pw@aws-0-us-west-1.pooler.supabase.com:5432/postgres") == []
    assert dsn_warnings("postgresql://postgres@127.0.0.1/postgres") == []
