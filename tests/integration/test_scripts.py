"""Lua scripts: loaded at start (a bad one fails start), called by SHA, reloaded when Redis forgets them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import redis.exceptions

from daemon.commands.embedded import RedisServer
from daemon.keys import Keys
from daemon.primitives.clients import RedisClients
from daemon.primitives.lock import CronLock
from daemon.primitives.scripts import SCRIPTS, Scripts

if TYPE_CHECKING:
    from pathlib import Path


async def test_every_script_compiles_and_is_cached_by_sha(redis_clients: RedisClients) -> None:
    """load() sends every script once; afterwards Redis knows each one by its SHA."""
    client = redis_clients.client("startup")
    scripts = Scripts(client)
    await scripts.load(client)
    shas = [scripts._scripts[name].sha for name in SCRIPTS]
    assert await client.script_exists(*shas) == [True] * len(SCRIPTS)
    assert redis_clients.usage.total["startup"] == len(SCRIPTS) + 1  # a SCRIPT LOAD each, and the EXISTS


async def test_a_script_redis_cannot_compile_fails_load(redis_clients: RedisClients) -> None:
    """A syntax error surfaces at load (start), not at the first tick."""
    client = redis_clients.client("startup")
    scripts = Scripts(client)
    scripts._scripts["lock_acquire"] = client.register_script("return this is not lua")
    with pytest.raises(redis.exceptions.ResponseError, match=r"(?i)error compiling script|user_script"):
        await scripts.load(client)


async def test_calls_survive_redis_forgetting_its_scripts(tmp_path: Path) -> None:
    """After SCRIPT FLUSH (Upstash drops its cache) a call reloads the script and succeeds: two top-level
    commands more than a cached call (EVALSHA answered NOSCRIPT, SCRIPT LOAD), once."""
    server = RedisServer(tmp_path).start()
    clients = RedisClients(server.url)
    try:
        startup = clients.client("startup")
        scripts = Scripts(startup)
        await scripts.load(startup)
        lock = CronLock(clients.client("lock"), Keys("flush"), scripts, ttl_s=30, holder="me")
        await startup.script_flush()
        spent = clients.usage.total

        async def cost(call: Any) -> tuple[int, Any]:
            before = spent["lock"]
            result = await call
            return spent["lock"] - before, result

        acquire_flushed, grant = await cost(lock.acquire())
        release_flushed, released = await cost(lock.release(grant))  # its own script was flushed too
        assert released
        acquire_cached, grant = await cost(lock.acquire())
        release_cached, released = await cost(lock.release(grant))
        assert released
        # EVALSHA answered NOSCRIPT and SCRIPT LOAD, once; what the script runs is the same either way.
        assert (acquire_flushed - acquire_cached, release_flushed - release_cached) == (2, 2)
    finally:
        await clients.aclose()
        server.stop()
