"""Operator commands that talk to Redis and Postgres: tick, status, breaker/lock overrides, dead letters."""

from __future__ import annotations

import contextlib
import re
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from daemon.cron.scheduler import enqueue_under
from daemon.cron.slots import group_for, next_slot
from daemon.errors import Exit, LockBusy, StoreUnavailable, driver_error, error_name
from daemon.primitives.clients import REDIS_ERRORS
from daemon.primitives.usage import projection
from daemon.runtime.report import breaker_view, email_quota_view, iso, lock_view, queue_view
from daemon.runtime.schedule import schedule_status
from daemon.runtime.wiring import Parts, build_parts
from daemon.store import db
from daemon.store.pool import (
    COMMAND_CONNECTIONS,
    DAEMON_POOL_SIZE,
    connect,
    connect_options,
    create_pool,
    dsn_warnings,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from daemon.settings.config import Settings


@contextlib.asynccontextmanager
async def _parts(settings: Settings) -> AsyncIterator[Parts]:
    # No SCRIPT LOAD here: a running daemon has loaded them, and register_script loads one on NOSCRIPT.
    # An operator's command then costs only the calls it makes (status: five), not twelve loads more.
    parts = build_parts(settings)
    try:
        yield parts
    finally:
        with contextlib.suppress(*REDIS_ERRORS, OSError):
            await parts.ledger.flush()
        await parts.clients.aclose()


def _fail(message: str) -> int:
    print(f"seatwatch: {message}", file=sys.stderr)
    return Exit.FAILURE


async def tick_now(settings: Settings, group: str | None) -> int:
    """One enqueue tick now, under the cron lock; exit 3 when another holder has it."""
    if group is None:
        group = group_for(datetime.now(settings.tz), settings.stagger)
    try:
        async with _parts(settings) as parts:
            pool = await create_pool(settings.database_url.reveal(), min_size=1, max_size=COMMAND_CONNECTIONS)
            try:
                try:
                    grant = await parts.lock.acquire()
                except LockBusy as busy:
                    since = iso(busy.acquired_at_ms / 1000)
                    print(f"cron lock held by {busy.holder} since {since}; nothing enqueued", file=sys.stderr)
                    return Exit.LOCKED
                try:
                    result = await enqueue_under(grant, pool, parts.queue, group, None)
                finally:
                    await parts.lock.release(grant)
            finally:
                await pool.close()
    except (StoreUnavailable, *REDIS_ERRORS, OSError) as exc:  # Postgres too: the tick reads the watched sections
        return _fail(f"tick failed: {error_name(exc)}: {driver_error(exc)}")
    if result.fenced:
        return _fail("the cron lock changed hands during the tick; nothing enqueued")
    print(
        f"tick ({group}): {result.sections} sections, {result.enqueued} enqueued, "
        f"{result.already_queued} already queued, {result.duration_ms} ms (fence {result.fence})"
    )
    return Exit.OK


async def collect_status(settings: Settings) -> dict[str, Any]:
    """What ``status`` shows, built from the same views as health (``runtime.report``); a few Redis calls."""
    async with _parts(settings) as parts:
        breaker = await parts.breaker.status()
        lock = await parts.lock.status()
        queue = await parts.queue.stats()
        today = await parts.ledger.today()
        outbox: dict[str, Any]
        schedule: dict[str, Any]
        try:
            conn = await connect(settings.database_url.reveal())
            try:
                outbox = dict(await db.outbox_counts(conn))
                paused_until = await db.quota_paused_until(conn)
                resend = settings.email_transport == "resend"
                outbox["quota"] = email_quota_view(
                    settings.email_quota_per_day if resend else 0,
                    settings.email_quota_per_month if resend else 0,
                    outbox,
                    paused_until=paused_until.timestamp() if paused_until else None,
                    paused_by="Resend's quota (see the outbox's last error)" if paused_until else None,
                )
                schedule = await schedule_status(settings, parts.clients.client("admin"), parts.keys, conn)
            finally:
                await conn.close()
        except (StoreUnavailable, OSError) as exc:
            outbox = {"pending": None, "failed": None, "error": error_name(exc)}
            schedule = await schedule_status(settings, parts.clients.client("admin"), parts.keys, None)
    now = time.time()
    last = orjson.loads(lock.last_tick) if lock.last_tick else None
    held = lock.holder if lock.locked else None
    return {
        "breaker": breaker_view(breaker),
        "lock": {
            **lock_view(held, lock.acquired_at_ms, lock.expires_at_ms, int(now * 1000), time_held_ms=lock.time_held_ms),
            "fence": lock.fence,
        },
        "queue": queue_view(queue),
        "outbox": outbox,
        "ticks": {
            "last": last,
            "next": next_slot(settings.cron, settings.tz, datetime.now(settings.tz)).isoformat(),
            "schedule": settings.cron,
            "timezone": settings.timezone,
        },
        "redis_commands": projection(today, now, settings.redis_budget_per_day),
        "schedule": schedule,
        "postgres": postgres_view(settings),
        "generated_at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
    }


def _quota_text(quota: dict[str, Any] | None) -> str:
    if not quota:
        return ""
    day, month = quota["per_day"], quota["per_month"]
    text = f"  sent today {quota['sent_today']}" + (f"/{day}" if day else "")
    text += f", this month {quota['sent_this_month']}" + (f"/{month}" if month else "")
    return text + (f"  PAUSED until {quota['paused_until']}" if quota["paused_until"] else "")


def postgres_view(settings: Settings) -> dict[str, Any]:
    """How many Postgres clients seatwatch holds, and through what (for status)."""
    dsn = settings.database_url.reveal()
    options = connect_options(dsn)
    return {
        "connections_per_daemon": DAEMON_POOL_SIZE,
        "connections_per_command": COMMAND_CONNECTIONS,
        "statement_cache": options.get("statement_cache_size", 100) != 0,
        "warnings": dsn_warnings(dsn),
    }


async def status(settings: Settings, *, as_json: bool) -> int:
    """``seatwatch status [--json]``: breaker, lock, queue, outbox, ticks and Redis commands."""
    try:
        report = await collect_status(settings)
    except (*REDIS_ERRORS, OSError) as exc:
        shown = driver_error(exc)
        return _fail(f"Redis unavailable: {shown.__class__.__name__}: {shown}")
    if as_json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return Exit.OK
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
        f"outbox    pending={o.get('pending')} failed={o.get('failed')} suppressed={o.get('suppressed')}"
        + (f"  ({o['error']})" if "error" in o else "")
        + _quota_text(o.get("quota"))
    )
    last = t["last"]
    print(f"ticks     last={last['slot'] + ' +' + str(last['enqueued']) if last else 'none'}  next={t['next']}")
    print(_schedule_line(report["schedule"]))
    pg = report["postgres"]
    print(
        f"postgres  {pg['connections_per_daemon']} connections per daemon (a fixed pool), "
        f"{pg['connections_per_command']} per command like this one; statement cache "
        + ("on" if pg["statement_cache"] else "off (transaction-mode pooler)")
    )
    for warning in pg["warnings"]:
        print(f"          warning: {warning}")
    by = ", ".join(f"{k}={v}" for k, v in r["by_purpose"].items()) or "none yet"
    print(
        f"redis     today={r['today']} ({by}); projected {r['projected_day']}/day, {r['projected_month']}/month "
        f"against a budget of {r['budget_per_day']}/day"
    )
    return Exit.OK


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
    """``seatwatch breaker reset``: close the breaker and zero its counts."""
    async with _parts(settings) as parts:
        before = await parts.breaker.status()
        await parts.breaker.reset()
    print(f"breaker reset to CLOSED (was {before.state}, {before.failures} failures)")
    return Exit.OK


async def lock_release(settings: Settings) -> int:
    """``seatwatch lock release --force``: free the cron lock whoever holds it."""
    async with _parts(settings) as parts:
        was = await parts.lock.status()
        released = await parts.lock.force_release()
    if released:
        print(f"cron lock released (was held by {was.holder})")
    else:
        print("cron lock was not held")
    return Exit.OK


async def dlq_list(settings: Settings, *, count: int, as_json: bool) -> int:
    """``seatwatch dlq list``: the oldest dead letters."""
    async with _parts(settings) as parts:
        entries = await parts.queue.dead_letters(count)
    if as_json:
        print(
            orjson.dumps([{"entry_id": eid, **fields} for eid, fields in entries], option=orjson.OPT_INDENT_2).decode()
        )
        return Exit.OK
    if not entries:
        print("no dead letters")
    for eid, f in entries:
        when = iso(int(f.get("failed_ms", "0")) / 1000)
        print(f"{eid}  {f.get('id') or '?'}  attempts={f.get('attempts')}  {when}  {f.get('error')}")
    return Exit.OK


async def dlq_requeue(settings: Settings, ids: Sequence[str]) -> int:
    """``seatwatch dlq requeue [ID...]``: put dead letters (all, or these) back on the queue."""
    bad = [i for i in ids if not re.fullmatch(r"\d+-\d+", i)]
    if bad:
        print(f"seatwatch: not dead-letter entry ids: {', '.join(bad)} (see `seatwatch dlq list`)", file=sys.stderr)
        return Exit.USAGE
    async with _parts(settings) as parts:
        result = await parts.queue.requeue_dead(ids)
    print(
        f"requeued {result['requeued']}, already queued {result['already_queued']}, "
        f"left (no term/class number) {result['invalid']}, not found {result['missing']}"
    )
    return Exit.OK if not result["missing"] else Exit.FAILURE


async def dlq_purge(settings: Settings) -> int:
    """``seatwatch dlq purge``: drop every dead letter."""
    async with _parts(settings) as parts:
        count = await parts.queue.purge_dead()
    print(f"purged {count} dead letters")
    return Exit.OK
