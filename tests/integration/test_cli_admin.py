"""The operator commands as real processes: check, tick, status, breaker reset, lock release, dlq."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
import pytest

from daemon.primitives.breaker import BreakerConfig, CircuitBreaker
from daemon.primitives.lock import CronLock
from daemon.runtime.report import breaker_view, iso
from tests.support.procs import daemon_env, run_cli
from tests.support.queued import stream_sections
from tests.support.seed import add_user, add_watch, clear

if TYPE_CHECKING:
    import asyncpg

    from daemon.keys import Keys
    from daemon.primitives.clients import RedisClients
    from daemon.primitives.scripts import Scripts
    from tests.support.stubs import ScraperStub


@pytest.fixture
def env(redis_url: str, database_url: str, prefix: str, scraper: ScraperStub) -> dict[str, str]:
    return daemon_env(redis_url=redis_url, database_url=database_url, prefix=prefix, scraper_url=scraper.url)


def test_check_reaches_every_dependency(env: dict[str, str]) -> None:
    """`check` exits 0 and reports configuration, postgres, redis, scraper and email as ok."""
    result = run_cli("check", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("configuration", "postgres", "redis", "scraper", "email"):
        assert f"ok   {name}" in result.stdout


def test_check_fails_with_reasons_when_the_scraper_is_down(env: dict[str, str]) -> None:
    """`check` exits 1 and names the scraper when its /health cannot be reached."""
    result = run_cli("check", env={**env, "SCRAPER_URL": "http://127.0.0.1:9"})
    assert result.returncode == 1
    assert "FAIL scraper" in result.stdout
    assert "ok   postgres" in result.stdout


async def test_tick_enqueues_its_group_and_reports_exit_3_when_locked(
    env: dict[str, str], pool: asyncpg.Pool, redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """`tick --group odd` enqueues only odd sections; with the lock held elsewhere it exits 3 and adds nothing."""
    await clear(pool)
    user = await add_user(pool, "t@example.edu")
    for class_nbr in ("10000", "10001", "10003"):
        await add_watch(pool, user, "2261", class_nbr)
    result = run_cli("tick", "--group", "odd", env=env)
    assert result.returncode == 0, result.stderr
    assert "2 sections, 2 enqueued" in result.stdout
    again = run_cli("tick", "--group", "odd", env=env)
    assert "0 enqueued, 2 already queued" in again.stdout

    lock = CronLock(redis_clients.client("lock"), keys, scripts, ttl_s=60, holder="elsewhere")
    grant = await lock.acquire()
    try:
        locked = run_cli("tick", "--group", "all", env=env)
    finally:
        await lock.release(grant)
    assert locked.returncode == 3
    assert "held by elsewhere" in locked.stderr
    assert len(await stream_sections(redis_clients.client("admin"), keys)) == 2


async def test_status_json_has_the_documented_keys(env: dict[str, str], pool: asyncpg.Pool) -> None:
    """`status --json` carries breaker, lock, queue, outbox, ticks and redis_commands with their fields."""
    await clear(pool)
    run_cli("tick", "--group", "all", env=env)
    result = run_cli("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)
    assert report["breaker"]["state"] == "CLOSED"
    assert {"locked", "lock_holder", "expires_at"} <= set(report["lock"])
    assert set(report["queue"]) == {"waiting", "pending", "delayed", "dead_letters"}
    assert {"pending", "failed"} <= set(report["outbox"])
    assert {"last", "next"} <= set(report["ticks"])
    usage = report["redis_commands"]
    assert {"today", "by_purpose", "projected_month", "budget_per_day"} <= set(usage)
    assert usage["today"] > 0  # the tick above flushed its own commands
    assert usage["budget_per_day"] == 16000
    text = run_cli("status", env=env)
    assert text.returncode == 0
    assert "breaker   CLOSED" in text.stdout
    assert "against a budget of 16000/day" in text.stdout


async def test_breaker_reset_and_lock_release(
    env: dict[str, str], redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """`breaker reset` closes an open breaker; `lock release --force` frees a lock held by anyone."""
    breaker = CircuitBreaker(redis_clients.client("breaker"), keys, scripts, BreakerConfig(failures=1))
    await breaker.record([("f", "")])
    assert (await breaker.status()).state == "OPEN"
    result = run_cli("breaker", "reset", env=env)
    assert result.returncode == 0
    assert "was OPEN" in result.stdout
    assert (await breaker.status()).state == "CLOSED"

    lock = CronLock(redis_clients.client("lock"), keys, scripts, ttl_s=600, holder="stuck-host")
    await lock.acquire()
    result = run_cli("lock", "release", "--force", env=env)
    assert result.returncode == 0
    assert "was held by stuck-host" in result.stdout
    assert not (await lock.status()).locked
    assert run_cli("lock", "release", env=env).returncode == 2  # --force is required


async def test_dlq_list_requeue_purge(env: dict[str, str], redis_clients: RedisClients, keys: Keys) -> None:
    """Dead letters are listed, requeued as fresh jobs (by id or all), and purged."""
    redis = redis_clients.client("admin")
    first = await redis.xadd(
        keys.dead_letters,
        {
            "id": "2261-10005",
            "term": "2261",
            "class_nbr": "10005",
            "attempts": "3",
            "error": "scraper answered 502",
            "failed_ms": "0",
        },
    )
    await redis.xadd(
        keys.dead_letters,
        {"id": "2261-10007", "term": "2261", "class_nbr": "10007", "attempts": "3", "error": "boom", "failed_ms": "0"},
    )
    listed = run_cli("dlq", "list", env=env)
    assert "2261-10005" in listed.stdout
    assert "scraper answered 502" in listed.stdout
    as_json = orjson.loads(run_cli("dlq", "list", "--json", env=env).stdout)
    assert (as_json[0]["entry_id"], as_json[0]["id"]) == (first, "2261-10005")
    assert [e["id"] for e in as_json] == ["2261-10005", "2261-10007"]

    requeued = run_cli("dlq", "requeue", str(first), env=env)
    assert requeued.returncode == 0
    assert "requeued 1" in requeued.stdout
    assert [(job, a) for _, job, a in await stream_sections(redis, keys)] == [("2261-10005", 0)]
    assert await redis.xlen(keys.dead_letters) == 1

    assert "purged 1" in run_cli("dlq", "purge", env=env).stdout
    assert await redis.xlen(keys.dead_letters) == 0
    missing = run_cli("dlq", "requeue", "0-1", env=env)
    assert missing.returncode == 1
    assert "not found 1" in missing.stdout


async def test_status_shows_breaker_times_as_health_does(
    env: dict[str, str], redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """`status --json` gives the breaker's last_failure and last_state_change as ISO time, the view health uses."""
    breaker = CircuitBreaker(redis_clients.client("breaker"), keys, scripts, BreakerConfig(failures=1))
    opened = await breaker.record([("f", "")])
    result = run_cli("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    shown = orjson.loads(result.stdout)["breaker"]
    assert shown == {**breaker_view(opened), "retry_after_s": shown["retry_after_s"]}
    assert shown["state"] == "OPEN"
    assert opened.last_failure_ms is not None
    assert shown["last_failure"] == iso(opened.last_failure_ms / 1000)
    assert str(shown["last_state_change"]).endswith("Z")


async def test_status_shows_the_postgres_clients_each_daemon_and_command_holds(env: dict[str, str]) -> None:
    """`status` says how many Postgres connections a daemon (a fixed 5) and a command (1) hold, for Supavisor."""
    result = run_cli("status", "--json", env={**env, "SEATWATCH_CONCURRENCY": "auto"})
    assert result.returncode == 0, result.stderr
    postgres = orjson.loads(result.stdout)["postgres"]
    assert postgres["connections_per_daemon"] == 5
    assert postgres["connections_per_command"] == 1
    assert postgres["warnings"] == []
    text = run_cli("status", env=env)
    assert "postgres  5 connections per daemon (a fixed pool), 1 per command like this one" in text.stdout


async def test_the_daemons_pool_is_fixed_whatever_the_concurrency(env: dict[str, str]) -> None:
    """With SEATWATCH_CONCURRENCY=auto (32 in flight) the daemon's pool still holds at most 5 connections."""
    from daemon.runtime.supervisor import Daemon
    from daemon.settings.config import Settings

    settings = Settings.from_env({**env, "SEATWATCH_CONCURRENCY": "auto"})
    daemon = Daemon(settings)
    pool = await daemon._open_pool()
    try:
        assert pool.get_max_size() == 5
    finally:
        await pool.close()
        await daemon.parts.clients.aclose()
