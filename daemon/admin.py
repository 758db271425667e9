"""Operator commands that talk to Redis and Postgres: tick, status, breaker/lock overrides, dead letters."""

from __future__ import annotations

import contextlib
import re
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import redis.exceptions

from daemon import db
from daemon.dispatcher import schedule_status
from daemon.health import iso
from daemon.lock import LockBusy
from daemon.scheduler import enqueue_under, group_for, next_slot
from daemon.supervisor import Parts, build_parts
from daemon.usage import projection

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from daemon.config import Settings

EX_OK, EX_FAILURE, EX_USAGE, EX_LOCKED = 0, 1, 2, 3


@contextlib.asynccontextmanager
async def _parts(settings: Settings) -> AsyncIterator[Parts]:
    # No SCRIPT LOAD here: a running daemon has loaded them, and register_script loads one on NOSCRIPT.
    # An operator's command then costs only the calls it makes (status: five), not twelve loads more.
    parts = build_parts(settings)
    try:
        yield parts
    finally:
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            await parts.ledger.flush()
        await parts.clients.aclose()


def _fail(message: str) -> int:
    print(f"seatwatch: {message}", file=sys.stderr)
    return EX_FAILURE


async def tick_now(settings: Settings, group: str | None) -> int:
    """One enqueue tick now, under the cron lock; exit 3 when another holder has it."""
    if group is None:
        group = group_for(datetime.now(settings.tz), settings.stagger)
    try:
        async with _parts(settings) as parts:
            pool = await db.create_pool(settings.database_url.reveal(), min_size=1, max_size=2)
            try:
                try:
                    grant = await parts.lock.acquire()
                except LockBusy as busy:
                    since = iso(busy.acquired_at_ms / 1000)
                    print(f"cron lock held by {busy.holder} since {since}; nothing enqueued", file=sys.stderr)
                    return EX_LOCKED
                try:
                    result = await enqueue_under(grant, pool, parts.queue, group, None)
                finally:
                    await parts.lock.release(grant)
            finally:
                await pool.close()
    except (redis.exceptions.RedisError, OSError, *db.CONNECTION_ERRORS) as exc:
        return _fail(f"tick failed: {exc.__class__.__name__}: {exc}")
    if result.fenced:
        return _fail("the cron lock changed hands during the tick; nothing enqueued")
    print(
        f"tick ({group}): {result.sections} sections, {result.enqueued} enqueued, "
        f"{result.already_queued} already queued, {result.duration_ms} ms (fence {result.fence})"
    )
    return EX_OK


async def collect_status(settings: Settings) -> dict[str, Any]:
    async with _parts(settings) as parts:
        breaker = await parts.breaker.status()
        lock = await parts.lock.status()
        queue = await parts.queue.stats()
        today = await parts.ledger.today()
        outbox: dict[str, Any]
        schedule: dict[str, Any]
        try:
            conn = await db.connect(settings.database_url.reveal())
            try:
                outbox = await db.outbox_counts(conn)
                schedule = await schedule_status(settings, parts.clients.client("admin"), parts.keys, conn)
            finally:
                await conn.close()
        except (*db.CONNECTION_ERRORS, OSError) as exc:
            outbox = {"pending": None, "failed": None, "error": exc.__class__.__name__}
            schedule = await schedule_status(settings, parts.clients.client("admin"), parts.keys, None)
    now = time.time()
    last = orjson.loads(lock.last_tick) if lock.last_tick else None
    lock_view = lock.as_dict()
    for key in ("lock_acquired_at", "expires_at"):
        lock_view[key] = iso(lock_view[key] / 1000) if lock_view[key] else None
    return {
        "breaker": breaker.as_dict(),
        "lock": lock_view,
        "queue": queue.as_dict(),
        "outbox": outbox,
        "ticks": {
            "last": last,
            "next": next_slot(settings.cron, settings.tz, datetime.now(settings.tz)).isoformat(),
            "schedule": settings.cron,
            "timezone": settings.timezone,
        },
        "redis_commands": projection(today, now, settings.redis_budget_per_day),
        "schedule": schedule,
        "generated_at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
    }


async def status(settings: Settings, *, as_json: bool) -> int:
    try:
        report = await collect_status(settings)
    except (redis.exceptions.RedisError, OSError) as exc:
        return _fail(f"Redis unavailable: {exc.__class__.__name__}: {exc}")
    if as_json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return EX_OK
    b, lk, q, o, t, r = (report[k] for k in ("breaker", "lock", "queue", "outbox", "ticks", "redis_commands"))
    print(
        f"breaker   {b['state']}  failures={b['failure_count']} successes={b['success_count']}"
        + (f"  retry in {b['retry_after_s']:.0f}s" if b["retry_after_s"] else "")
    )
    held = f"held by {lk['lock_holder']} until {lk['expires_at']}" if lk["locked"] else "free"
    print(f"lock      {held}  (fence {lk['fence']})")
    print(
        f"queue     waiting={q['waiting']} pending={q['pending']} delayed={q['delayed']} "
        f"dead_letters={q['dead_letters']}"
    )
    print(
        f"outbox    pending={o.get('pending')} failed={o.get('failed')}" + (f"  ({o['error']})" if "error" in o else "")
    )
    last = t["last"]
    print(f"ticks     last={last['slot'] + ' +' + str(last['enqueued']) if last else 'none'}  next={t['next']}")
    print(_schedule_line(report["schedule"]))
    by = ", ".join(f"{k}={v}" for k, v in r["by_purpose"].items()) or "none yet"
    print(
        f"redis     today={r['today']} ({by}); projected {r['projected_day']}/day, {r['projected_month']}/month "
        f"against a budget of {r['budget_per_day']}/day"
    )
    return EX_OK


def _schedule_line(s: dict[str, Any]) -> str:
    line = f"schedule  {s['mode']}"
    if "coverage" in s:
        line += (
            f"  coverage={s['coverage']:.1%} behind={s['behind']} interval p50={s['interval_p50_s']}s "
            f"p95={s['interval_p95_s']}s binding={s['binding']} scrapes last hour={s['scrapes_last_hour']}"
        )
    p = s.get("projection")
    if p:
        reach = f"{p['reachable_interval_s']:.0f}s" if p["reachable_interval_s"] is not None else "never"
        line += (
            f"\n          adaptive can reach: {p['watched']} watched ({p['hot']} with someone waiting) checked "
            f"every {reach}; {p['binding']} binds" + (f" ({p['lift']} to go faster)" if p["lift"] else "")
        )
    return line


async def breaker_reset(settings: Settings) -> int:
    async with _parts(settings) as parts:
        before = await parts.breaker.status()
        await parts.breaker.reset()
    print(f"breaker reset to CLOSED (was {before.state}, {before.failures} failures)")
    return EX_OK


async def lock_release(settings: Settings) -> int:
    async with _parts(settings) as parts:
        was = await parts.lock.status()
        released = await parts.lock.force_release()
    if released:
        print(f"cron lock released (was held by {was.holder})")
    else:
        print("cron lock was not held")
    return EX_OK


async def dlq_list(settings: Settings, *, count: int, as_json: bool) -> int:
    async with _parts(settings) as parts:
        entries = await parts.queue.dead_letters(count)
    if as_json:
        print(
            orjson.dumps([{"entry_id": eid, **fields} for eid, fields in entries], option=orjson.OPT_INDENT_2).decode()
        )
        return EX_OK
    if not entries:
        print("no dead letters")
    for eid, f in entries:
        when = iso(int(f.get("failed_ms", "0")) / 1000)
        print(f"{eid}  {f.get('id') or '?'}  attempts={f.get('attempts')}  {when}  {f.get('error')}")
    return EX_OK


async def dlq_requeue(settings: Settings, ids: Sequence[str]) -> int:
    bad = [i for i in ids if not re.fullmatch(r"\d+-\d+", i)]
    if bad:
        print(f"seatwatch: not dead-letter entry ids: {', '.join(bad)} (see `seatwatch dlq list`)", file=sys.stderr)
        return EX_USAGE
    async with _parts(settings) as parts:
        result = await parts.queue.requeue_dead(ids)
    print(
        f"requeued {result['requeued']}, already queued {result['already_queued']}, "
        f"left (no term/class number) {result['invalid']}, not found {result['missing']}"
    )
    return EX_OK if not result["missing"] else EX_FAILURE


async def dlq_purge(settings: Settings) -> int:
    async with _parts(settings) as parts:
        count = await parts.queue.purge_dead()
    print(f"purged {count} dead letters")
    return EX_OK
