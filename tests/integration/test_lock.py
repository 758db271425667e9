"""The cron lock on a real Redis: one holder, owner-checked release, expiry, fencing, status, slot markers."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest

from daemon.errors import LockBusy, SlotDone
from daemon.primitives.clients import RedisClients
from daemon.primitives.lock import SLOT_MARKER_TTL_MS, CronLock, Grant

if TYPE_CHECKING:
    from daemon.keys import Keys
    from daemon.primitives.clients import CountingRedis
    from daemon.primitives.scripts import Scripts

ROOT = Path(__file__).resolve().parents[2]


def make_lock(clients: RedisClients, keys: Keys, scripts: Scripts, holder: str, ttl_s: float = 10) -> CronLock:
    return CronLock(clients.client("lock"), keys, scripts, ttl_s=ttl_s, holder=holder)


async def redis_now_ms(redis: CountingRedis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def start_worker(redis_url: str, prefix: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.primitive_worker",
        redis_url,
        prefix,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )


async def read_json(proc: asyncio.subprocess.Process, timeout_s: float = 30) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
    assert line, f"worker {proc.pid} exited with {await proc.wait()} before answering"
    result: dict[str, Any] = orjson.loads(line)
    return result


async def finish(proc: asyncio.subprocess.Process, timeout_s: float = 30) -> list[dict[str, Any]]:
    """Every remaining JSON line of a worker, once it exited successfully."""
    out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode == 0, f"worker {proc.pid} exited with {proc.returncode}"
    return [orjson.loads(line) for line in out.splitlines() if line.strip()]


# -- mutual exclusion ----------------------------------------------------------------------------------


async def test_fifty_concurrent_acquirers_in_three_processes_get_one_holder(
    redis_url: str, prefix: str, redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """50 racing acquirers (30 tasks here, 10 in each of two other processes) yield exactly one grant."""
    # Three client sets of 10 tasks here, like three daemons: one pool's 16 connections cannot carry 30 at once.
    pools = [RedisClients(redis_url) for _ in range(3)]
    workers = [
        await start_worker(redis_url, prefix, "lock-acquire", "--tasks", "10", "--holder", name, "--ttl-s", "30")
        for name in ("proc-a", "proc-b")
    ]
    try:
        for proc in workers:
            assert await read_json(proc) == {"ready": True}
        local = [CronLock(pools[i % 3].client("lock"), keys, scripts, ttl_s=30, holder=f"local-{i}") for i in range(30)]
        await asyncio.gather(*(pool.client("lock").ping() for pool in pools))

        async def attempt(lock: CronLock) -> dict[str, Any]:
            try:
                grant = await lock.acquire()
            except LockBusy as busy:
                return {"holder": lock.holder, "acquired": False, "busy_holder": busy.holder}
            return {"holder": lock.holder, "acquired": True, "fence": grant.fence}

        for proc in workers:  # the start gun: both processes and the local tasks race from here
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
        results = list(await asyncio.gather(*(attempt(lock) for lock in local)))
        for proc in workers:
            results += await finish(proc)
    finally:
        for proc in workers:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        for pool in pools:
            await pool.aclose()

    assert len(results) == 50
    assert len({r["holder"] for r in results}) == 50
    winners = [r for r in results if r["acquired"]]
    assert len(winners) == 1, winners
    winner = winners[0]["holder"]
    assert all(r["busy_holder"] == winner for r in results if not r["acquired"])
    status = await make_lock(redis_clients, keys, scripts, "observer").status()
    assert status.locked
    assert status.holder == winner
    assert status.fence == winners[0]["fence"] == 1


async def test_busy_lock_reports_the_holder_and_its_times(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """A second acquirer gets LockBusy naming the holder with its acquired-at and expiry."""
    first = make_lock(redis_clients, keys, scripts, "first")
    grant = await first.acquire()
    with pytest.raises(LockBusy) as busy:
        await make_lock(redis_clients, keys, scripts, "second").acquire()
    assert busy.value.holder == "first"
    assert busy.value.acquired_at_ms == grant.acquired_at_ms
    assert abs(busy.value.expires_at_ms - grant.expires_at_ms) <= 5


async def test_wrong_owner_cannot_release(redis_clients: RedisClients, keys: Keys, scripts: Scripts) -> None:
    """Release with another owner token (even the same holder name) returns False and leaves the lock held."""
    lock = make_lock(redis_clients, keys, scripts, "owner")
    grant = await lock.acquire()
    impostor = Grant("owner:0000000000000000", grant.fence, grant.acquired_at_ms, grant.expires_at_ms)
    assert await lock.release(impostor) is False
    assert await make_lock(redis_clients, keys, scripts, "other").release(impostor) is False
    status = await lock.status()
    assert status.locked
    assert status.holder == "owner"
    assert await redis_clients.client("lock").exists(keys.lock_meta) == 1
    assert await lock.release(grant) is True
    assert not (await lock.status()).locked


async def test_expiry_frees_the_lock_and_its_metadata(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """Past its TTL the lock and its metadata hash are gone, another holder gets it, the old owner cannot release."""
    redis = redis_clients.client("lock")
    lock = make_lock(redis_clients, keys, scripts, "slow", ttl_s=0.3)
    old = await lock.acquire()
    assert 0 < await redis.pttl(keys.lock_meta) <= 300
    assert 0 < await redis.pttl(keys.lock) <= 300
    await asyncio.sleep(0.4)
    assert await redis.exists(keys.lock, keys.lock_meta) == 0
    assert not (await lock.status()).locked
    successor = make_lock(redis_clients, keys, scripts, "successor")
    new = await successor.acquire()
    assert await lock.release(old) is False  # the expired owner must not free the successor's lock
    status = await lock.status()
    assert status.locked
    assert status.holder == "successor"
    assert status.fence == new.fence > old.fence


async def test_fencing_tokens_strictly_increase_across_grants(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """Each grant's fence exceeds the previous one: after release, after expiry, and after force release."""
    a = make_lock(redis_clients, keys, scripts, "a", ttl_s=0.2)
    b = make_lock(redis_clients, keys, scripts, "b")
    fences = []
    grant = await a.acquire()
    fences.append(grant.fence)
    assert await a.release(grant)
    fences.append((await b.acquire()).fence)
    assert await b.force_release()
    fences.append((await a.acquire()).fence)
    await asyncio.sleep(0.3)  # expires
    fences.append((await b.acquire()).fence)
    assert fences == sorted(set(fences))
    assert fences == [1, 2, 3, 4]
    assert (await a.status()).fence == 4


async def test_fencing_tokens_are_unique_and_increasing_across_processes(
    redis_url: str, prefix: str, redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """Two processes taking the lock turn about get distinct fences, each increasing, with none skipped."""
    workers = [
        await start_worker(redis_url, prefix, "lock-cycle", "--count", "40", "--holder", name, "--ttl-s", "10")
        for name in ("proc-a", "proc-b")
    ]
    try:
        per_process = [await finish(proc) for proc in workers]
    finally:
        for proc in workers:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    all_fences: list[int] = []
    for lines in per_process:
        assert len(lines) == 40
        assert all(line["released"] for line in lines)
        fences = [line["fence"] for line in lines]
        assert fences == sorted(set(fences)), fences  # strictly increasing within a process
        all_fences += fences
    assert sorted(all_fences) == list(range(1, 81))  # unique across processes, one INCR per grant
    assert (await make_lock(redis_clients, keys, scripts, "observer").status()).fence == 80


# -- status and operator overrides ---------------------------------------------------------------------


async def test_status_of_a_free_lock(redis_clients: RedisClients, keys: Keys, scripts: Scripts) -> None:
    """A never-taken lock reads unlocked with no holder or times and fence 0."""
    status = await make_lock(redis_clients, keys, scripts, "x").status()
    assert status.as_dict() == {
        "locked": False,
        "lock_holder": None,
        "lock_acquired_at": None,
        "time_held_ms": None,
        "expires_at": None,
        "fence": 0,
    }


async def test_status_fields_of_a_held_lock_follow_redis_time(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """Status shows holder, acquired_at, a growing time_held_ms and expires_at, all on the Redis clock."""
    redis = redis_clients.client("lock")
    lock = make_lock(redis_clients, keys, scripts, "worker-1", ttl_s=5)
    before = await redis_now_ms(redis)
    grant = await lock.acquire()
    after = await redis_now_ms(redis)
    assert before <= grant.acquired_at_ms <= after
    assert grant.expires_at_ms == grant.acquired_at_ms + 5000

    await asyncio.sleep(0.15)
    t0 = await redis_now_ms(redis)
    status = await lock.status()
    t1 = await redis_now_ms(redis)
    assert status.locked
    assert status.holder == "worker-1"
    assert status.acquired_at_ms == grant.acquired_at_ms
    assert status.time_held_ms is not None
    assert t0 - grant.acquired_at_ms <= status.time_held_ms <= t1 - grant.acquired_at_ms
    assert status.time_held_ms >= 150
    assert status.expires_at_ms is not None
    assert abs(status.expires_at_ms - grant.expires_at_ms) <= 5
    assert status.fence == grant.fence
    assert set(status.as_dict()) == {"locked", "lock_holder", "lock_acquired_at", "time_held_ms", "expires_at", "fence"}

    await asyncio.sleep(0.05)
    later = await lock.status()
    assert later.time_held_ms is not None
    assert later.time_held_ms >= status.time_held_ms + 50


async def test_force_release_frees_a_lock_held_by_anyone(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """force_release frees another holder's lock and metadata (True), is False when free, and the owner then fails."""
    owner = make_lock(redis_clients, keys, scripts, "stuck")
    grant = await owner.acquire()
    operator = make_lock(redis_clients, keys, scripts, "operator")
    assert await operator.force_release() is True
    assert await redis_clients.client("lock").exists(keys.lock, keys.lock_meta) == 0
    assert not (await operator.status()).locked
    assert await operator.force_release() is False
    assert await owner.release(grant) is False
    assert (await operator.acquire()).fence == grant.fence + 1


async def test_held_releases_on_exception(redis_clients: RedisClients, keys: Keys, scripts: Scripts) -> None:
    """An exception inside ``async with lock.held()`` propagates and the lock is released."""
    lock = make_lock(redis_clients, keys, scripts, "ctx")

    class Boom(Exception):
        pass

    inside: list[str | None] = []

    async def fail_while_holding() -> None:
        async with lock.held():
            inside.append((await lock.status()).holder)
            raise Boom

    with pytest.raises(Boom):
        await fail_while_holding()
    assert inside == ["ctx"]
    assert not (await lock.status()).locked
    assert await redis_clients.client("lock").exists(keys.lock_meta) == 0


async def test_held_releases_on_cancellation(redis_clients: RedisClients, keys: Keys, scripts: Scripts) -> None:
    """A task cancelled inside ``lock.held()`` still releases the lock."""
    lock = make_lock(redis_clients, keys, scripts, "ctx")
    entered = asyncio.Event()

    async def hold_forever() -> None:
        async with lock.held():
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hold_forever())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not (await lock.status()).locked


async def test_held_raises_lock_busy_without_touching_the_holder(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """``held()`` on a busy lock raises LockBusy and the holder keeps the lock."""
    await make_lock(redis_clients, keys, scripts, "first").acquire()
    lock = make_lock(redis_clients, keys, scripts, "second")
    with pytest.raises(LockBusy):
        async with lock.held():
            pytest.fail("entered a busy lock")
    assert (await lock.status()).holder == "first"


# -- cron slot markers ---------------------------------------------------------------------------------


async def test_slot_done_refuses_the_slot_again(redis_clients: RedisClients, keys: Keys, scripts: Scripts) -> None:
    """After a release with slot_outcome 'done', acquiring that slot (anywhere) raises SlotDone; other slots run."""
    redis = redis_clients.client("lock")
    lock = make_lock(redis_clients, keys, scripts, "a")
    grant = await lock.acquire(slot="2024-01-01T10:00")
    assert await redis.get(keys.slot("2024-01-01T10:00")) == "running"
    assert await lock.release(grant, slot="2024-01-01T10:00", slot_outcome="done", tick='{"n": 1}')
    assert await redis.get(keys.slot("2024-01-01T10:00")) == "done"
    assert SLOT_MARKER_TTL_MS - 5000 < await redis.pttl(keys.slot("2024-01-01T10:00")) <= SLOT_MARKER_TTL_MS
    assert (await lock.status()).last_tick == '{"n": 1}'
    with pytest.raises(SlotDone):
        await lock.acquire(slot="2024-01-01T10:00")
    with pytest.raises(SlotDone):
        await make_lock(redis_clients, keys, scripts, "b").acquire(slot="2024-01-01T10:00")
    assert not (await lock.status()).locked  # SlotDone took nothing
    other = await lock.acquire(slot="2024-01-01T10:05")
    assert await lock.release(other, slot="2024-01-01T10:05", slot_outcome="done")


async def test_slot_abort_lets_the_slot_run_again(redis_clients: RedisClients, keys: Keys, scripts: Scripts) -> None:
    """A release with slot_outcome 'abort' clears the marker, so the same slot can be acquired again."""
    lock = make_lock(redis_clients, keys, scripts, "a")
    grant = await lock.acquire(slot="s1")
    assert await lock.release(grant, slot="s1", slot_outcome="abort")
    assert await redis_clients.client("lock").exists(keys.slot("s1")) == 0
    again = await make_lock(redis_clients, keys, scripts, "b").acquire(slot="s1")
    assert again.fence == grant.fence + 1


async def test_stale_abort_does_not_reopen_a_slot_another_holder_runs(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """An expired holder's 'abort' leaves the marker of the successor running the slot, whose 'done' then sticks."""
    redis = redis_clients.client("lock")
    slow = make_lock(redis_clients, keys, scripts, "slow", ttl_s=0.2)
    stale = await slow.acquire(slot="s1")
    await asyncio.sleep(0.3)
    successor = make_lock(redis_clients, keys, scripts, "successor")
    current = await successor.acquire(slot="s1")  # a crashed/slow holder's slot may be retried
    assert await slow.release(stale, slot="s1", slot_outcome="abort") is False
    assert await redis.get(keys.slot("s1")) == "running"
    assert (await successor.status()).holder == "successor"
    assert await successor.release(current, slot="s1", slot_outcome="done")
    with pytest.raises(SlotDone):
        await slow.acquire(slot="s1")


async def test_slot_done_sticks_even_if_the_lock_expired(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """Work finished after the lock expired still marks the slot done (release returns False)."""
    lock = make_lock(redis_clients, keys, scripts, "slow", ttl_s=0.2)
    grant = await lock.acquire(slot="s1")
    await asyncio.sleep(0.3)
    assert await lock.release(grant, slot="s1", slot_outcome="done") is False
    with pytest.raises(SlotDone):
        await lock.acquire(slot="s1")


async def test_lock_commands_are_one_script_call_each(
    redis_clients: RedisClients, keys: Keys, scripts: Scripts
) -> None:
    """acquire, a busy acquire, status and release each cost exactly one billed command under 'lock'."""
    lock = make_lock(redis_clients, keys, scripts, "counted")
    usage = redis_clients.usage.total
    start = usage["lock"]
    grant = await lock.acquire(slot="s1")
    assert usage["lock"] - start == 1
    with pytest.raises(LockBusy):
        await make_lock(redis_clients, keys, scripts, "other").acquire()
    assert usage["lock"] - start == 2
    await lock.status()
    assert usage["lock"] - start == 3
    assert await lock.release(grant, slot="s1", slot_outcome="done", tick="{}")
    assert usage["lock"] - start == 4
