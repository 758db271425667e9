"""Redis clients that count their own commands, by purpose, the way Upstash bills them; the outage boundary.

Upstash bills every command it executes (each command of a pipeline too, and each command a script runs,
besides the script call itself) except a few connection-level ones. Top-level commands are counted here;
what a script runs inside Redis is added by ``Scripts.call`` from the count the script returns. The daemon
makes one counting client per purpose over a shared connection pool, so every command is attributed without
context variables.

This is also where a Redis outage gets its name: a connection refused, reset or timed out leaves
``CountingRedis`` as ``errors.StoreUnavailable`` (the driver's error as its cause).
"""

from __future__ import annotations

import collections
from typing import Any, Final

import redis.asyncio as aioredis
import redis.exceptions

from daemon.errors import StoreUnavailable

# Connection-level commands Upstash does not bill.
FREE_COMMANDS: Final = frozenset({"PING", "AUTH", "HELLO", "SELECT", "INFO", "CONFIG", "COMMAND", "RESET", "QUIT"})


class Usage:
    """Commands counted in this process: since start, and not yet flushed to Redis."""

    def __init__(self) -> None:
        self.total: collections.Counter[str] = collections.Counter()
        self.unflushed: collections.Counter[str] = collections.Counter()

    def add(self, purpose: str, n: int = 1) -> None:
        """Count ``n`` commands for ``purpose``."""
        self.total[purpose] += n
        self.unflushed[purpose] += n

    def take_unflushed(self) -> dict[str, int]:
        """The counts not yet flushed, now cleared."""
        taken = dict(self.unflushed)
        self.unflushed.clear()
        return taken

    def give_back(self, counts: dict[str, int]) -> None:
        """A flush failed: keep the counts for the next one."""
        self.unflushed.update(counts)

    def forget(self, purpose: str, n: int) -> None:
        """Take back ``n`` commands counted in advance that the client counted again (or never sent)."""
        self.total[purpose] -= n
        self.unflushed[purpose] -= n
        if self.unflushed[purpose] <= 0:
            del self.unflushed[purpose]


class CountingRedis(aioredis.Redis):
    """A redis-py asyncio client that adds every billable command it sends to ``usage`` under ``purpose``.

    Scripts registered with ``register_script`` go through ``evalsha`` (and ``script_load`` on NOSCRIPT),
    so they are counted here too. Pipelines are not used by seatwatch; ``pipeline()`` is refused so a future
    one cannot slip past the count.
    """

    usage: Usage
    purpose: str

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        """Count the command, send it; a connection failure leaves as ``StoreUnavailable``."""
        name = str(args[0]).upper() if args else ""
        if name not in FREE_COMMANDS:
            self.usage.add(self.purpose)
        try:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise StoreUnavailable("redis", f"{exc.__class__.__name__}: {exc}") from exc

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        """Refused: a pipeline would bill every command (a script bills one)."""
        raise NotImplementedError("seatwatch does not use pipelines: use a script (one billed command)")


class RedisClients:
    """Connection pools and the per-purpose counting clients over them.

    Two pools: ``blocking`` serves the one long blocking stream read, has no socket timeout (its caller
    bounds it) and does not decode replies; ``pool`` serves everything else, decoded, with a short socket
    timeout so a dead network is noticed.
    """

    def __init__(self, url: str, usage: Usage | None = None, *, socket_timeout_s: float = 15) -> None:
        self.usage = usage or Usage()
        common: dict[str, Any] = {
            "protocol": 2,  # redis-py 8 would negotiate RESP3 and send an (unbilled here, billed there) CLIENT command
            "driver_info": None,  # no CLIENT SETINFO on connect: it would be billed
            "socket_keepalive": True,
            "socket_connect_timeout": 10,
        }
        # Callers beyond the pool's size wait for a free connection instead of failing.
        self.pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=16, timeout=30, socket_timeout=socket_timeout_s, decode_responses=True, **common
        )
        # The stream read returns raw bytes: whatever someone wrote into the stream must not crash the reader.
        self.blocking_pool = aioredis.ConnectionPool.from_url(
            url, max_connections=2, socket_timeout=None, decode_responses=False, **common
        )
        self._clients: dict[tuple[str, bool], CountingRedis] = {}

    def client(self, purpose: str, *, blocking: bool = False) -> CountingRedis:
        """The counting client for ``purpose`` (``blocking``: on the pool of the long stream read)."""
        key = (purpose, blocking)
        if key not in self._clients:
            client = CountingRedis(connection_pool=self.blocking_pool if blocking else self.pool)
            client.usage = self.usage
            client.purpose = purpose
            self._clients[key] = client
        return self._clients[key]

    async def ping(self) -> None:
        """Liveness, free of charge on Upstash."""
        await self.client("health").ping()

    async def aclose(self) -> None:
        """Close both pools."""
        await self.pool.aclose()
        await self.blocking_pool.aclose()


# What a loop that talks to Redis waits out and retries: an outage, or a command the server refused (out of
# memory, read-only during a failover, a request limit) that may succeed later.
REDIS_ERRORS: Final = (StoreUnavailable, redis.exceptions.RedisError)
