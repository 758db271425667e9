"""What the shared circuit breaker costs per batch, on a private redis-server.

Run with ``.venv/bin/python bench/breaker.py``. For batch sizes 1, 4, 16 and 64 it runs ``allow(n)`` then
``record([...n outcomes])`` rounds in two states (CLOSED, and HALF_OPEN with ``half_open_max`` = the batch so
every call is a trial) and prints, per batch:

- billed commands, as the daemon's own counter sees them (``RedisClients.usage``: all-in, the commands the
  script ran included, as Upstash bills them) and the top-level commands MONITOR shows (the script call;
  what it runs appears in MONITOR as ``lua``);
- Redis calls per allow and per record from ``INFO commandstats``, which counts the commands inside the
  scripts too (the all-in count again, from the server's side);
- mean latency of one ``allow`` and one ``record`` call, timed in a separate pass without MONITOR attached.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder would come first on sys.path, and bench/queue.py would shadow the
# standard library's queue module; the project root goes there instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import asyncio
import itertools
import re
import statistics
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from daemon.commands.embedded import RedisServer
from daemon.keys import Keys
from daemon.primitives.breaker import BreakerConfig, CircuitBreaker, OutcomeKind
from daemon.primitives.clients import RedisClients
from daemon.primitives.scripts import Scripts

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

BATCH_SIZES = (1, 4, 16, 64)
TIMED_ROUNDS = 300
COUNTED_ROUNDS = 50
NOT_BREAKER = frozenset({"info", "echo", "ping", "monitor", "config"})  # the bench's own probes

_LINE = re.compile(r"^\+\d+\.\d+ \[\d+ ([^\]]+)\] (.*)$")
_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')


class Monitor:
    """MONITOR on the private server; ``until_mark`` returns (source, command) seen since the last mark."""

    def __init__(self, server: RedisServer, marker: aioredis.Redis) -> None:
        self.server = server
        self.marker = marker
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> Monitor:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.server.port, limit=1 << 24)
        self.writer.write(b"MONITOR\r\n")
        await self.writer.drain()
        if await self.reader.readline() != b"+OK\r\n":
            raise RuntimeError("MONITOR refused")
        return self

    async def until_mark(self) -> list[tuple[str, str]]:
        assert self.reader is not None
        token = f"mark-{uuid.uuid4().hex}"
        await self.marker.echo(token)
        seen: list[tuple[str, str]] = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 30)).decode()
            match = _LINE.match(line.rstrip("\r\n"))
            if match is None:
                raise RuntimeError(f"unexpected MONITOR line {line!r}")
            args = _ARG.findall(match.group(2))
            if args[:2] == ["echo", token] or args[:2] == ["ECHO", token]:
                return seen
            seen.append((match.group(1), args[0].lower()))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def command_calls(admin: aioredis.Redis) -> int:
    """Commands Redis has executed (script internals included), leaving out the bench's own probes."""
    stats: dict[str, Any] = await admin.info("commandstats")
    return sum(
        int(fields["calls"])
        for name, fields in stats.items()
        if name.removeprefix("cmdstat_").split("|")[0] not in NOT_BREAKER
    )


async def prepare(breaker: CircuitBreaker, state: str) -> None:
    await breaker.reset()
    if state == "HALF_OPEN":
        await breaker.record([("f", "")] * breaker.config.failures)
        await asyncio.sleep(breaker.config.recovery_s + 0.01)


async def round_trip(
    breaker: CircuitBreaker, n: int, between: Callable[[], Awaitable[Any]] | None = None
) -> list[float]:
    """allow(n) then the record of its n outcomes; ``between`` runs after each. Returns both latencies in s."""
    started = time.perf_counter()
    admission = await breaker.allow(n)
    allowed = time.perf_counter()
    if admission.admitted != n:
        raise RuntimeError(f"allow({n}) admitted {admission.admitted} in {admission.breaker.state}")
    if between is not None:
        await between()
    outcomes: list[tuple[OutcomeKind, str]] = [("s", admission.trial(i)) for i in range(n)]
    recording = time.perf_counter()
    await breaker.record(outcomes)
    recorded = time.perf_counter()
    if between is not None:
        await between()
    return [allowed - started, recorded - recording]


async def measure(
    server: RedisServer, clients: RedisClients, admin: aioredis.Redis, scripts: Scripts, state: str, n: int
) -> dict[str, Any]:
    """One table row: the timed pass, then the counted pass under MONITOR."""
    # successes far above any run: HALF_OPEN stays half-open, and every admitted call is a trial with an id.
    config = BreakerConfig(failures=1, recovery_s=0.001, successes=10**9, half_open_max=n, trial_ttl_s=60)
    breaker = CircuitBreaker(clients.client("breaker"), Keys(f"bench:{state}:{n}"), scripts, config)
    usage = clients.usage.total

    await prepare(breaker, state)
    latencies = [await round_trip(breaker, n) for _ in range(TIMED_ROUNDS)]

    await prepare(breaker, state)
    monitor = await Monitor(server, admin).open()
    top_level = 0
    calls: list[int] = []  # commandstats total: at start, after allow, after record, after allow, ...

    async def observe() -> None:
        nonlocal top_level
        calls.append(await command_calls(admin))
        seen = await monitor.until_mark()
        top_level += sum(1 for source, name in seen if source != "lua" and name not in NOT_BREAKER)

    try:
        await monitor.until_mark()
        billed_before = usage["breaker"]
        calls.append(await command_calls(admin))
        for _ in range(COUNTED_ROUNDS):
            await round_trip(breaker, n, observe)
        billed = usage["breaker"] - billed_before
    finally:
        await monitor.close()
    state_after = (await breaker.status()).state
    if state_after != state:
        raise RuntimeError(f"breaker drifted from {state} to {state_after}")
    steps = [after - before for before, after in itertools.pairwise(calls)]
    return {
        "state": state,
        "batch": n,
        "counter": billed / (2 * COUNTED_ROUNDS),
        "monitor": top_level / (2 * COUNTED_ROUNDS),
        "allow_calls": statistics.fmean(steps[0::2]),
        "record_calls": statistics.fmean(steps[1::2]),
        "allow_ms": statistics.fmean(a for a, _ in latencies) * 1000,
        "record_ms": statistics.fmean(r for _, r in latencies) * 1000,
    }


async def bench(server: RedisServer) -> list[dict[str, Any]]:
    clients = RedisClients(server.url)
    admin = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        scripts = Scripts(clients.client("startup"))
        await scripts.load(clients.client("startup"))
        return [
            await measure(server, clients, admin, scripts, state, n)
            for state in ("CLOSED", "HALF_OPEN")
            for n in BATCH_SIZES
        ]
    finally:
        await admin.aclose()
        await clients.aclose()


def table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'state':<10}{'batch':>6}{'billed/call':>13}{'MONITOR/call':>14}{'calls: allow':>14}{'record':>8}"
        f"{'allow ms':>10}{'record ms':>11}{'ms/item':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        per_item = (r["allow_ms"] + r["record_ms"]) / r["batch"]
        lines.append(
            f"{r['state']:<10}{r['batch']:>6}{r['counter']:>13.2f}{r['monitor']:>14.2f}"
            f"{r['allow_calls']:>14.1f}{r['record_calls']:>8.1f}"
            f"{r['allow_ms']:>10.3f}{r['record_ms']:>11.3f}{per_item:>9.3f}"
        )
    return "\n".join(lines)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="seatwatch-bench-") as workdir:
        server = RedisServer(Path(workdir) / "redis").start()
        try:
            rows = asyncio.run(bench(server))
        finally:
            server.stop()
    print(f"circuit breaker, private redis-server on loopback; {TIMED_ROUNDS} timed rounds, {COUNTED_ROUNDS} counted")
    print("billed/call: the daemon's counter per allow or record call, all-in; MONITOR/call: top-level commands")
    print("calls: INFO commandstats per call, commands inside the script included; ms/item: (allow+record)/batch")
    print(table(rows))


if __name__ == "__main__":
    main()
