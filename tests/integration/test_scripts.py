"""Lua scripts: loaded at start (a bad one fails start), called by SHA, reloaded when Redis forgets them."""

from __future__ import annotations

from typing import TYPE_CHECKING

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
    """After SCRIPT FLUSH (Upstash drops its cache) a call reloads the script and succeeds: 3 commands once."""
    server = RedisServer(tmp_path).start()
    clients = RedisClients(server.url)
    try:
        startup = clients.client("startup")
        scripts = Scripts(startup)
        await scripts.load(startup)
        lock = CronLock(clients.client("lock"), Keys("flush"), scripts, ttl_s=30, holder="me")
        await startup.script_flush()
        before = clients.usage.total["lock"]
        grant = await lock.acquire()
        assert clients.usage.total["lock"] - before == 3  # EVALSHA (NOSCRIPT), SCRIPT LOAD, EVALSHA
        assert await lock.release(grant)  # its own script was flushed too: reloaded the same way
        before = clients.usage.total["lock"]
        assert await lock.release(await lock.acquire())
        assert clients.usage.total["lock"] - before == 2  # once reloaded, one command per call again
    finally:
        await clients.aclose()
        server.stop()
