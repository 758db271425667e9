"""The shared circuit breaker on a real Redis: every transition, concurrency, processes, cost and a model check."""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.commands.embedded import RedisServer
from daemon.keys import Keys
from daemon.primitives.breaker import BreakerConfig, BreakerState, CircuitBreaker, OutcomeKind
from daemon.primitives.clients import RedisClients
from daemon.primitives.scripts import Scripts

if TYPE_CHECKING:
    from collections.abc import Awaitable, Iterator, Sequence

ROOT = Path(__file__).resolve().parents[2]


def config(
    failures: int = 3,
    recovery_s: float = 0.5,
    successes: int = 2,
    half_open_max: int = 2,
    trial_ttl_s: float = 30,
) -> BreakerConfig:
    return BreakerConfig(
        failures=failures,
        recovery_s=recovery_s,
        successes=successes,
        half_open_max=half_open_max,
        trial_ttl_s=trial_ttl_s,
    )


def make(redis_clients: RedisClients, keys: Keys, scripts: Scripts, cfg: BreakerConfig) -> CircuitBreaker:
    return CircuitBreaker(redis_clients.client("breaker"), keys, scripts, cfg)


def kinds(text: str, trial: str = "") -> list[tuple[OutcomeKind, str]]:
    """``"ffs"`` -> [("f", ""), ("f", ""), ("s", "")]."""
    return [(cast("OutcomeKind", kind), trial) for kind in text]


async def redis_now_ms(redis: aioredis.Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def open_breaker(breaker: CircuitBreaker) -> BreakerState:
    state = await breaker.record(kinds("f" * breaker.config.failures))
    assert state.state == "OPEN"
    return state


async def half_open(breaker: CircuitBreaker) -> None:
    """Open the breaker and wait out its recovery time so the next call finds it HALF_OPEN."""
    await open_breaker(breaker)
    await asyncio.sleep(breaker.config.recovery_s + 0.05)


# -- CLOSED --------------------------------------------------------------------------------------------


async def test_closed_admits_every_call(redis_clients: RedisClients, keys: Keys, scripts: Scripts) -> None:
    """A fresh breaker is CLOSED and admits all n calls, without trial ids."""
    breaker = make(redis_clients, keys, scripts, config())
    admission = await breaker.allow(25)
    assert admission.admitted == 25
    assert admission.trials == []
    assert admission.trial(0) == ""
    assert admission.retry_after_s == 0
    assert admission.breaker.state == "CLOSED"


async def test_opens_at_n_consecutive_failures(redis_clients: RedisClients, keys: Keys, scripts: Scripts) -> None:
    """N-1 failures leave it CLOSED and counting; the N-th opens it and allow() then admits nothing."""
    breaker = make(redis_clients, keys, scripts, config(failures=3))
    state = await breaker.record(kinds("f"))
    assert (state.state, state.failures) == ("CLOSED", 1)
    state = await breaker.record(kinds("f"))
    assert (state.state, state.failures) == ("CLOSED", 2)
    assert (await breaker.allow(4)).admitted == 4
    state = await breaker.record(kinds("f"))
    assert (state.state, state.failures) == ("OPEN", 3)
    assert state.last_change_ms == state.last_failure_ms
    admission = await breaker.allow(4)
    assert admission.admitted == 0
    assert admission.breaker.state == "OPEN"


async def test_a_success_resets_the_failure_count(redis_clients: RedisClients, keys: Keys, scripts: Scripts) -> None:
    """Failures must be consecutive: a success zeroes the count, so N failures split by a success do not open."""
    breaker = make(redis_clients, keys, scripts, config(failures=3))
    state = await breaker.record(kinds("ffsff"))
    assert (state.state, state.failures) == ("CLOSED", 2)
    state = await breaker.record(kinds("s"))
    assert (state.state, state.failures) == ("CLOSED", 0)
    state = await breaker.record(kinds("nff"))  # neutral outcomes neither count nor reset
    assert (state.state, state.failures) == ("CLOSED", 2)
    state = await breaker.record(kinds("nf"))
    assert (state.state, state.failures) == ("OPEN", 3)


# -- OPEN ----------------------------------------------------------------------------------------------


async def test_open_denies_with_retry_after_until_recovery(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """OPEN denies with retry_after = recovery - (Redis now - last failure), then admits once recovery passed."""
    redis = redis_clients.client("admin")
    cfg = config(recovery_s=0.6)
    breaker = make(redis_clients, keys, scripts, cfg)
    opened = await open_breaker(breaker)
    assert opened.last_failure_ms is not None
    last_failure = opened.last_failure_ms
    await asyncio.sleep(0.2)
    t0 = await redis_now_ms(redis)
    admission = await breaker.allow(3)
    t1 = await redis_now_ms(redis)
    assert t1 - last_failure < 600, "the host stalled; the assertion below would not pin anything"
    assert admission.admitted == 0
    assert admission.breaker.state == "OPEN"
    retry_ms = round(admission.retry_after_s * 1000)
    assert 600 - (t1 - last_failure) <= retry_ms <= 600 - (t0 - last_failure)
    assert admission.breaker.retry_after_s == admission.retry_after_s
    await asyncio.sleep(admission.retry_after_s + 0.02)
    admission = await breaker.allow(1)
    assert admission.admitted == 1
    assert admission.breaker.state == "HALF_OPEN"


async def test_failures_while_open_extend_the_wait(redis_clients: RedisClients, keys: Keys, scripts: Scripts) -> None:
    """A late failure recorded while OPEN restarts the recovery time from that failure."""
    redis = redis_clients.client("admin")
    breaker = make(redis_clients, keys, scripts, config(recovery_s=0.6))
    opened = await open_breaker(breaker)
    await asyncio.sleep(0.4)
    late = await breaker.record(kinds("f"))  # an outcome of a call admitted before the breaker opened
    assert late.state == "OPEN"
    assert late.failures == 4
    assert late.last_failure_ms is not None
    assert opened.last_failure_ms is not None
    assert late.last_failure_ms >= opened.last_failure_ms + 400
    assert late.last_change_ms == opened.last_change_ms  # still the same OPEN period
    await asyncio.sleep(0.3)  # past the first failure's recovery, not the late one's
    t0 = await redis_now_ms(redis)
    admission = await breaker.allow(1)
    assert t0 - opened.last_failure_ms >= 600
    assert admission.admitted == 0
    assert admission.breaker.state == "OPEN"
    assert 0 < admission.retry_after_s * 1000 <= 600 - (t0 - late.last_failure_ms)
    await asyncio.sleep(admission.retry_after_s + 0.02)
    assert (await breaker.allow(1)).admitted == 1


# -- HALF_OPEN -----------------------------------------------------------------------------------------


async def test_open_becomes_half_open_after_recovery(redis_clients: RedisClients, keys: Keys, scripts: Scripts) -> None:
    """After recovery the next allow() moves OPEN to HALF_OPEN (stored) and admits a trial with an id."""
    redis = redis_clients.client("admin")
    breaker = make(redis_clients, keys, scripts, config(recovery_s=0.2))
    opened = await open_breaker(breaker)
    await asyncio.sleep(0.25)
    t0 = await redis_now_ms(redis)
    admission = await breaker.allow(1)
    t1 = await redis_now_ms(redis)
    assert admission.admitted == 1
    assert len(admission.trials) == 1
    assert admission.trial(0) == admission.trials[0] != ""
    assert admission.breaker.state == "HALF_OPEN"
    assert admission.breaker.successes == 0
    assert admission.breaker.in_flight == 1
    assert admission.breaker.last_change_ms is not None
    assert opened.last_failure_ms is not None
    # It became half-open when recovery ended, not whenever someone happened to look.
    assert admission.breaker.last_change_ms == opened.last_failure_ms + 200
    assert admission.breaker.last_change_ms <= t1
    assert t0 - admission.breaker.last_change_ms < 1000
    assert await redis.hget(keys.breaker, "state") == "HALF_OPEN"


async def test_half_open_admits_at_most_half_open_max_trials(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """HALF_OPEN admits min(n, free slots); with every slot taken it denies with a retry hint; an outcome frees one."""
    breaker = make(redis_clients, keys, scripts, config(recovery_s=0.2, half_open_max=2, successes=3, trial_ttl_s=30))
    await half_open(breaker)
    first = await breaker.allow(5)
    assert first.admitted == 2
    assert len(set(first.trials)) == 2
    assert first.breaker.in_flight == 2
    full = await breaker.allow(1)
    assert full.admitted == 0
    assert full.trials == []
    assert full.breaker.state == "HALF_OPEN"
    assert 0.1 <= full.retry_after_s <= 5
    state = await breaker.record([("s", first.trial(0))])
    assert (state.state, state.successes, state.in_flight) == ("HALF_OPEN", 1, 1)
    again = await breaker.allow(3)
    assert again.admitted == 1
    assert not set(again.trials) & set(first.trials)
    assert (await breaker.allow(1)).admitted == 0


async def test_successes_in_half_open_close_the_breaker(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """S trial successes close it: counts back to zero, and CLOSED admits everything again."""
    breaker = make(redis_clients, keys, scripts, config(recovery_s=0.2, half_open_max=3, successes=2))
    await half_open(breaker)
    admission = await breaker.allow(3)
    assert admission.admitted == 3
    state = await breaker.record([("s", admission.trial(0))])
    assert (state.state, state.successes, state.failures) == ("HALF_OPEN", 1, 0)
    state = await breaker.record([("s", admission.trial(1))])
    assert (state.state, state.successes, state.failures) == ("CLOSED", 0, 0)
    assert state.in_flight == 1  # the third trial is still running; closing does not forget it
    closed = await breaker.allow(50)
    assert closed.admitted == 50
    assert closed.trials == []


async def test_any_failure_in_half_open_reopens(redis_clients: RedisClients, keys: Keys, scripts: Scripts) -> None:
    """One trial failure re-opens the breaker even after successes, with a fresh full recovery wait."""
    breaker = make(redis_clients, keys, scripts, config(recovery_s=0.3, half_open_max=2, successes=3))
    await half_open(breaker)
    admission = await breaker.allow(2)
    state = await breaker.record([("s", admission.trial(0))])
    assert (state.state, state.successes) == ("HALF_OPEN", 1)
    state = await breaker.record([("f", admission.trial(1))])
    assert state.state == "OPEN"
    assert state.successes == 0
    assert state.in_flight == 0
    assert state.last_change_ms == state.last_failure_ms
    denied = await breaker.allow(1)
    assert denied.admitted == 0
    assert 0.25 < denied.retry_after_s <= 0.3


async def test_neutral_outcomes_free_trial_slots(redis_clients: RedisClients, keys: Keys, scripts: Scripts) -> None:
    """A neutral outcome frees its trial slot without counting as a success or a failure."""
    breaker = make(redis_clients, keys, scripts, config(recovery_s=0.2, half_open_max=1, successes=1))
    await half_open(breaker)
    first = await breaker.allow(1)
    assert first.admitted == 1
    assert (await breaker.allow(1)).admitted == 0
    state = await breaker.record([("n", first.trial(0))])
    assert (state.state, state.successes, state.failures, state.in_flight) == ("HALF_OPEN", 0, 3, 0)
    second = await breaker.allow(1)
    assert second.admitted == 1
    assert second.trial(0) != first.trial(0)
    assert (await breaker.record([("s", second.trial(0))])).state == "CLOSED"


async def test_two_hundred_concurrent_allows_in_half_open_admit_exactly_the_limit(
    redis_url: str, redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """200 concurrent allow(1) calls (from 20 client sets) while HALF_OPEN admit exactly half_open_max."""
    cfg = config(recovery_s=0.2, half_open_max=3)
    await half_open(make(redis_clients, keys, scripts, cfg))
    # 20 daemons' worth of pools with 10 callers each: one pool's 16 connections cannot carry 200 at once.
    pools = [RedisClients(redis_url) for _ in range(20)]
    try:
        breakers = [CircuitBreaker(pool.client("breaker"), keys, scripts, cfg) for pool in pools]
        await asyncio.gather(*(b.redis.ping() for b in breakers))
        admissions = await asyncio.gather(*(breakers[i % 20].allow(1) for i in range(200)))
    finally:
        for pool in pools:
            await pool.aclose()
    trials = [t for a in admissions for t in a.trials]
    assert sum(a.admitted for a in admissions) == 3
    assert len(set(trials)) == 3
    assert all(a.breaker.state == "HALF_OPEN" for a in admissions)
    assert all(a.retry_after_s > 0 for a in admissions if a.admitted == 0)
    assert (await make(redis_clients, keys, scripts, cfg).status()).in_flight == 3


# -- status and reset ----------------------------------------------------------------------------------


async def test_status_reads_half_open_after_recovery_without_changing_state(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """status() shows OPEN as HALF_OPEN once recovery passed, but the stored state stays OPEN until allow()."""
    redis = redis_clients.client("admin")
    breaker = make(redis_clients, keys, scripts, config(recovery_s=0.2))
    opened = await open_breaker(breaker)
    during = await breaker.status()
    assert during.state == "OPEN"
    assert 0 < during.retry_after_s <= 0.2
    await asyncio.sleep(0.25)
    before = await redis.hgetall(keys.breaker)
    status = await breaker.status()
    assert status.state == "HALF_OPEN"
    assert status.retry_after_s == 0
    assert status.failures == 3
    assert await redis.hgetall(keys.breaker) == before
    assert before["state"] == "OPEN"
    assert await redis.hget(keys.breaker, "last_change_ms") == str(opened.last_change_ms)
    await breaker.allow(1)
    assert await redis.hget(keys.breaker, "state") == "HALF_OPEN"


async def test_status_of_a_recovered_breaker_is_repeatable(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """Two status() reads of an unchanged, recovered breaker report the same last state change (not 'now')."""
    breaker = make(redis_clients, keys, scripts, config(recovery_s=0.2))
    opened = await open_breaker(breaker)
    await asyncio.sleep(0.25)
    first = await breaker.status()
    await asyncio.sleep(0.05)
    second = await breaker.status()
    assert first.state == second.state == "HALF_OPEN"
    assert first.last_change_ms is not None
    assert opened.last_change_ms is not None
    assert first.last_change_ms > opened.last_change_ms
    # Nothing was written between the reads, so the health endpoint's last_state_change must not move.
    assert second.last_change_ms == first.last_change_ms


async def test_reset_returns_to_closed_with_nothing_in_flight(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """reset() forgets counts, state and trials (CLOSED, zeros, everything admitted) but keeps trial ids growing."""
    redis = redis_clients.client("admin")
    breaker = make(redis_clients, keys, scripts, config(recovery_s=0.2, half_open_max=2))
    await half_open(breaker)
    before = await breaker.allow(2)
    assert before.admitted == 2
    await breaker.reset()
    assert await redis.exists(keys.breaker_trials) == 0
    assert set(await redis.hkeys(keys.breaker)) == {"seq"}
    status = await breaker.status()
    assert (status.state, status.failures, status.successes, status.in_flight) == ("CLOSED", 0, 0, 0)
    assert status.last_failure_ms is None
    assert status.last_change_ms is None
    assert status.as_dict()["retry_after_s"] == 0
    assert (await breaker.allow(7)).admitted == 7
    await half_open(breaker)
    after = await breaker.allow(1)
    # A trial admitted before the reset can never free a newer trial's slot by sharing its id.
    assert int(after.trials[0]) > max(int(t) for t in before.trials)


# -- processes -----------------------------------------------------------------------------------------


def cfg_json(cfg: BreakerConfig) -> str:
    return orjson.dumps(
        {
            "failures": cfg.failures,
            "recovery_s": cfg.recovery_s,
            "successes": cfg.successes,
            "half_open_max": cfg.half_open_max,
            "trial_ttl_s": cfg.trial_ttl_s,
        }
    ).decode()


async def start_worker(redis_url: str, prefix: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.primitive_worker",
        redis_url,
        prefix,
        *args,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )


async def run_worker(redis_url: str, prefix: str, *args: str) -> dict[str, Any]:
    """Run a worker to completion and return its one JSON line."""
    proc = await start_worker(redis_url, prefix, *args)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out
    result: dict[str, Any] = orjson.loads(out)
    return result


async def test_two_processes_share_one_breaker(
    redis_url: str, prefix: str, redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """Failures recorded by one process open the breaker that another process then sees OPEN and is denied by."""
    cfg = config(failures=3, recovery_s=30)
    args = ("--config", cfg_json(cfg))
    assert (await run_worker(redis_url, prefix, "breaker-allow", *args, "2"))["admitted"] == 2
    recorded = await run_worker(redis_url, prefix, "breaker-record", *args, "f", "f", "f")
    assert (recorded["state"], recorded["failures"]) == ("OPEN", 3)
    seen = await run_worker(redis_url, prefix, "breaker-allow", *args, "5")
    assert seen["admitted"] == 0
    assert seen["state"] == "OPEN"
    assert 29 < seen["retry_after_s"] <= 30
    assert (await make(redis_clients, keys, scripts, cfg).status()).state == "OPEN"


async def test_killed_probe_frees_its_trial_slot_after_trial_ttl(
    redis_url: str, prefix: str, redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """A half-open trial whose process is SIGKILLed holds its slot only until trial_ttl_s; then probing resumes."""
    cfg = config(failures=1, recovery_s=0.2, successes=1, half_open_max=1, trial_ttl_s=0.8)
    breaker = make(redis_clients, keys, scripts, cfg)
    await half_open(breaker)
    proc = await start_worker(redis_url, prefix, "breaker-hold", "--config", cfg_json(cfg))
    try:
        assert proc.stdout is not None
        held = orjson.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert held["admitted"] == 1
        assert held["state"] == "HALF_OPEN"
        taken_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGKILL
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    denied = await breaker.allow(1)
    assert denied.admitted == 0  # the dead probe's slot is still counted...
    assert denied.breaker.in_flight == 1
    assert 0.1 <= denied.retry_after_s <= 0.8  # ...and the hint points at its expiry
    await asyncio.sleep(max(0.0, taken_at + 0.85 - time.monotonic()))
    assert (await breaker.status()).in_flight == 0
    probe = await breaker.allow(1)
    assert probe.admitted == 1  # ...but only until trial_ttl_s: the breaker is not wedged
    assert probe.trial(0) != held["trials"][0]
    assert (await breaker.record([("s", probe.trial(0))])).state == "CLOSED"


# -- Redis commands and the Redis clock ----------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One command as MONITOR reports it: ``lua`` for commands run inside a script, else the client address."""

    source: str
    args: list[str]


_MONITOR_LINE = re.compile(r"^\+\d+\.\d+ \[\d+ ([^\]]+)\] (.*)$")
_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "a": "\a", "b": "\b", '"': '"', "\\": "\\"}


def _unescape(text: str) -> str:
    """Undo Redis's sdscatrepr quoting of one MONITOR argument."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "x":
                out.append(chr(int(text[i + 2 : i + 4], 16)))
                i += 4
                continue
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


class MonitorTap:
    """A MONITOR connection to a private server; ``until_mark`` returns what ran since the previous mark."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.marker = aioredis.Redis.from_url(url, decode_responses=True)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> MonitorTap:
        host, port = self.url.removeprefix("redis://").split("/")[0].split(":")
        self.reader, self.writer = await asyncio.open_connection(host, int(port), limit=1 << 22)
        self.writer.write(b"MONITOR\r\n")
        await self.writer.drain()
        assert await self.reader.readline() == b"+OK\r\n"
        await self.until_mark()
        return self

    async def until_mark(self) -> list[Seen]:
        assert self.reader is not None
        token = f"mark-{uuid.uuid4().hex}"
        await self.marker.echo(token)
        seen: list[Seen] = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 10)).decode().rstrip("\r\n")
            match = _MONITOR_LINE.match(line)
            assert match, line
            args = [_unescape(a) for a in _ARG.findall(match.group(2))]
            if args == ["echo", token] or args == ["ECHO", token]:
                return seen
            seen.append(Seen(match.group(1), args))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()
        await self.marker.aclose()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of our own, so MONITOR and INFO see only this test's commands."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


async def test_allow_and_record_cost_the_same_for_any_batch_size(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """allow(n) for any n and record(batch) of any length cost a few billed commands (the script call and
    what it runs, SPEC §5), all billed to the breaker; none grows with the batch: within a state the costs
    differ by at most one command (half-open: whether every trial slot was taken)."""
    total = redis_clients.usage.total
    breaker = make(redis_clients, keys, scripts, config(failures=3, recovery_s=0.2, half_open_max=4, successes=1000))
    costs: dict[str, tuple[int, int]] = {}

    async def measure(label: str, call: Awaitable[Any]) -> None:
        """(commands billed to 'breaker', commands billed in all) by one call."""
        breaker_before, all_before = total["breaker"], sum(total.values())
        await call
        costs[label] = (total["breaker"] - breaker_before, sum(total.values()) - all_before)

    for n in (1, 2, 17, 64, 1000):
        await measure(f"closed allow({n})", breaker.allow(n))
    for n in (1, 5, 64, 500):
        await measure(f"closed record x{n}", breaker.record(kinds("s" * n)))
    await measure("opening record x300", breaker.record(kinds("f" * 300)))
    for n in (1, 64):
        await measure(f"open allow({n})", breaker.allow(n))
    await measure("open record x100", breaker.record(kinds("fsn" * 33)))
    await measure("status", breaker.status())
    await asyncio.sleep(0.25)
    for n in (1, 2, 64):
        await measure(f"half-open allow({n})", breaker.allow(n))
    await measure("half-open record x200", breaker.record(kinds("s" * 200)))
    assert (await breaker.status()).state == "HALF_OPEN"
    for label, (billed_to_breaker, billed_in_all) in costs.items():
        assert billed_to_breaker == billed_in_all, label
        assert 2 <= billed_in_all <= 12, (label, billed_in_all)
    for group in ("closed allow", "closed record", "open allow", "half-open allow"):
        group_costs = [cost for label, (cost, _) in costs.items() if label.startswith(group)]
        assert max(group_costs) - min(group_costs) <= 1, (group, costs)
    assert costs["closed allow(1000)"] == costs["closed allow(1)"]
    assert costs["closed record x500"] == costs["closed record x1"]


async def test_monitor_sees_one_top_level_command_per_batch(private_redis: RedisServer) -> None:
    """On a private server MONITOR shows one top-level EVALSHA per allow/record call, the rest run inside Lua,
    and the ledger bills both (all-in, as Upstash does)."""
    clients = RedisClients(private_redis.url)
    tap = await MonitorTap(private_redis.url).open()
    try:
        scripts = Scripts(clients.client("startup"))
        await scripts.load(clients.client("startup"))
        breaker = CircuitBreaker(
            clients.client("breaker"), Keys("mon"), scripts, config(failures=1000, recovery_s=0.2, half_open_max=8)
        )
        await breaker.status()  # the connection is open before we count
        await tap.until_mark()
        for n in (1, 4, 16, 64):
            for label in ("allow", "record"):
                before = clients.usage.total["breaker"]
                if label == "allow":
                    await breaker.allow(n)
                else:
                    await breaker.record(kinds("s" * n))
                seen = await tap.until_mark()
                top = [s for s in seen if s.source != "lua"]
                assert [s.args[0].upper() for s in top] == ["EVALSHA"], (label, n, top)
                assert clients.usage.total["breaker"] - before == len(seen), (label, n, seen)
                assert [s for s in seen if s.source == "lua"], "the script's own commands are visible as lua"
    finally:
        await tap.close()
        await clients.aclose()


def _numbers(value: Any) -> Iterator[float]:
    """Every number in a script argument, looking inside JSON documents."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, str):
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            return
        if parsed != value:
            yield from _numbers(parsed)


async def test_breaker_time_comes_from_redis_not_the_callers_clock(private_redis: RedisServer) -> None:
    """Scripts get no wall-clock argument from Python, call TIME themselves, and their times match Redis TIME."""
    clients = RedisClients(private_redis.url)
    redis = clients.client("admin")
    tap = await MonitorTap(private_redis.url).open()
    try:
        scripts = Scripts(clients.client("startup"))
        await scripts.load(clients.client("startup"))
        cfg = config(failures=2, recovery_s=0.4, half_open_max=1)
        breaker = CircuitBreaker(clients.client("breaker"), Keys("clock"), scripts, cfg)
        await breaker.status()
        await tap.until_mark()

        t0 = await redis_now_ms(redis)
        opened = await breaker.record(kinds("ff"))
        t1 = await redis_now_ms(redis)
        denied = await breaker.allow(1)
        t2 = await redis_now_ms(redis)
        seen = await tap.until_mark()
        await asyncio.sleep(0.45)
        await tap.until_mark()
        admitted = await breaker.allow(3)
        t3 = await redis_now_ms(redis)
        seen += await tap.until_mark()
    finally:
        await tap.close()
        await clients.aclose()

    calls = [s for s in seen if s.source != "lua" and s.args[0].upper() == "EVALSHA"]
    assert len(calls) == 3
    wall_s, year_s = time.time(), 365 * 86400
    for call in calls:
        script_args = call.args[3 + int(call.args[2]) :]  # after sha, numkeys and the keys
        for number in _numbers(script_args):
            looks_like_a_clock = abs(number - wall_s) < year_s or abs(number - wall_s * 1000) < year_s * 1000
            assert not looks_like_a_clock, (call.args, number)
    assert [s.args[0].upper() for s in seen if s.source == "lua"].count("TIME") == 3

    assert opened.last_failure_ms is not None
    assert t0 <= opened.last_failure_ms <= t1
    retry_ms = round(denied.retry_after_s * 1000)
    assert 400 - (t2 - opened.last_failure_ms) <= retry_ms <= 400 - (t1 - opened.last_failure_ms)
    assert admitted.admitted == 1
    assert admitted.breaker.last_change_ms is not None
    assert opened.last_failure_ms + 400 <= admitted.breaker.last_change_ms <= t3


# -- the state machine against a reference model -------------------------------------------------------

F, S = 3, 2


@dataclass
class Model:
    """The breaker of SPEC §5 in a dozen lines, outcomes only (time is out of play, see the property test)."""

    recovered: bool  # whether OPEN has always waited out its recovery by the next outcome
    state: str = "CLOSED"
    failures: int = 0
    successes: int = 0

    def apply(self, outcome: str) -> None:
        if self.state == "OPEN" and self.recovered:
            self.state, self.successes = "HALF_OPEN", 0
        if outcome == "s":
            self.failures = 0
            if self.state == "HALF_OPEN":
                self.successes += 1
                if self.successes >= S:
                    self.state, self.successes = "CLOSED", 0
        elif outcome == "f":
            self.failures += 1
            if self.state == "HALF_OPEN" or (self.state == "CLOSED" and self.failures >= F):
                self.state, self.successes = "OPEN", 0

    def view(self) -> tuple[str, int, int]:
        return (self.state, self.failures, self.successes)


def observed(state: BreakerState) -> tuple[str, int, int]:
    return (state.state, state.failures, state.successes)


def chunks(items: Sequence[str], sizes: Sequence[int]) -> list[list[str]]:
    out: list[list[str]] = []
    start = 0
    for size in itertools.cycle(sizes):
        if start >= len(items):
            return out
        out.append(list(items[start : start + size]))
        start += size
    return out


_example = itertools.count()


@pytest.mark.parametrize(
    "recovery_s",
    [
        pytest.param(3600.0, id="never-recovers"),  # OPEN stays OPEN: CLOSED/OPEN paths
        pytest.param(0.0, id="recovers-at-once"),  # OPEN reads HALF_OPEN at the next outcome: every path
    ],
)
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    # Runs of one outcome (``fff``, ``ss``) reach the thresholds far more often than independent draws.
    runs=st.lists(st.tuples(st.sampled_from("sfn"), st.integers(min_value=1, max_value=4)), max_size=16),
    sizes=st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=8),
)
async def test_batched_and_single_recording_match_the_model(
    redis_url: str,
    prefix: str,
    redis_clients: RedisClients,
    scripts: Scripts,
    recovery_s: float,
    runs: list[tuple[str, int]],
    sizes: list[int],
) -> None:
    """Outcomes recorded one by one, in random batches, and fed to a reference model give the same states."""
    outcomes = [kind for kind, repeat in runs for _ in range(repeat)]
    cfg = config(failures=F, successes=S, recovery_s=recovery_s, half_open_max=2)
    n = next(_example)
    one_keys, batch_keys = Keys(f"{prefix}:ex{n}:one"), Keys(f"{prefix}:ex{n}:batch")
    one = make(redis_clients, one_keys, scripts, cfg)
    batched = make(redis_clients, batch_keys, scripts, cfg)
    try:
        model = Model(recovered=recovery_s == 0)
        for outcome in outcomes:
            model.apply(outcome)
            assert observed(await one.record(kinds(outcome))) == model.view(), outcomes
        final = model.view()

        model = Model(recovered=recovery_s == 0)
        for batch in chunks(outcomes, sizes):
            for outcome in batch:
                model.apply(outcome)
            assert observed(await batched.record(kinds("".join(batch)))) == model.view(), (outcomes, batch)
        assert model.view() == final
        model.apply("n")  # status() is what a neutral outcome would leave: time settled, counts untouched
        assert observed(await one.status()) == observed(await batched.status()) == model.view()
    finally:
        await redis_clients.client("admin").delete(
            one_keys.breaker, one_keys.breaker_trials, batch_keys.breaker, batch_keys.breaker_trials
        )
