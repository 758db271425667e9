"""What one cron tick of unchanged sections costs in Redis commands, as Upstash bills them (SPEC §5).

    .venv/bin/python bench/cron_tick.py [--sections 2000] [--daemons 1]

Real `seatwatch run` processes with default settings except the schedule (a tick every two minutes of every
section, so one tick checks all of them: `SEATWATCH_CRON='*/2 * * * *'`, `SEATWATCH_STAGGER=none`, and a
lock TTL below that period) against a private redis-server (MONITOR sees only the daemons) and a scratch
database on the local Postgres. The scraper stub answers every section with the same seats, so the first
tick records the first observations and the second changes nothing: the second is measured, from its slot
until every section was checked and the queue is empty. Printed: commands per section checked, all-in (the
commands scripts run included: what Upstash bills) and top-level side by side, by command; the daemons' own
count over the same window (from /metrics) against the server's.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder would come first on sys.path, and bench/queue.py would shadow the
# standard library's queue module; the project root goes there instead.
ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)

import argparse
import asyncio
import collections
import contextlib
import os
import subprocess
import tempfile
import time
import uuid

import httpx
import redis

from daemon.commands.embedded import RedisServer, free_port
from daemon.store.pool import connect
from tests.support.monitor import Monitor, billable
from tests.support.scratch import drop_database, migrated_database
from tests.support.stubs import ScraperStub

TERM = "2261"


async def scratch_database(sections: int) -> str:
    url = await migrated_database("bench_tick")
    conn = await connect(url)
    users = [(uuid.uuid4(), f"u{i}@example.edu") for i in range(sections)]
    await conn.executemany("INSERT INTO auth.users (id, email) VALUES ($1, $2)", users)
    await conn.executemany(
        "INSERT INTO class_watches (user_id, term, subject, catalog_nbr, class_nbr) VALUES ($1, $2, 'CSE', '240', $3)",
        [(user, TERM, str(20000 + i)) for i, (user, _email) in enumerate(users)],
    )
    await conn.close()
    return url


def own_count(client: httpx.Client, port: int) -> int:
    """A daemon's own Redis command count since start (all purposes), from /metrics."""
    text = client.get(f"http://127.0.0.1:{port}/metrics").text
    return sum(
        int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines() if line.startswith("seatwatch_redis_commands{")
    )


def next_even_minute(now: float) -> float:
    return (int(now // 120) + 1) * 120


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", type=int, default=2000)
    parser.add_argument("--daemons", type=int, default=1)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-tick-"))
    server = RedisServer(work / "redis").start()
    scraper = ScraperStub().start()
    for i in range(args.sections):
        scraper.set(TERM, str(20000 + i), seats=0)
    database_url = asyncio.run(scratch_database(args.sections))
    ports = [free_port() for _ in range(args.daemons)]
    monitor = Monitor(server.port)
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    r = redis.Redis.from_url(server.url, decode_responses=True)
    client = httpx.Client(timeout=5)
    try:
        for n, port in enumerate(ports):
            env = {
                "PATH": os.environ["PATH"],
                "DATABASE_URL": database_url,
                "REDIS_URL": server.url,
                "SCRAPER_URL": scraper.url,
                "SCRAPER_SECRET_TOKEN": "test-scraper-token-4f1d",
                "SEATWATCH_EMAIL_TRANSPORT": "file",
                "SEATWATCH_OUTBOX_DIR": str(work / "outbox"),
                "SEATWATCH_HEALTH_LISTEN": f"127.0.0.1:{port}",
                "SEATWATCH_CONSUMER": f"bench-tick-{n}",
                "SEATWATCH_CRON": "*/2 * * * *",
                "SEATWATCH_STAGGER": "none",
                "SEATWATCH_LOCK_TTL_S": "100",
                "SEATWATCH_MISFIRE_GRACE_S": "30",
            }
            log = (work / f"daemon{n}.log").open("wb")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "daemon", "run"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
                )
            )
        for port in ports:
            deadline = time.time() + 60
            while time.time() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"http://127.0.0.1:{port}/health").status_code in (200, 503):
                        break
                time.sleep(0.2)

        def scrapes() -> int:
            with scraper.lock:
                return sum(1 for req in scraper.requests if req.path == "/scrape")

        polls: collections.Counter[str] = collections.Counter()  # the bench's own commands, taken off the count

        def drained() -> bool:
            polls.update(("XPENDING", "XLEN"))
            pending = r.xpending("seatwatch:queue", "workers")
            return r.xlen("seatwatch:queue") == 0 and int(pending["pending"]) == 0

        # The first tick: first observations. Wait for it to be worked through.
        first_slot = next_even_minute(time.time())
        while not (time.time() > first_slot and scrapes() >= args.sections and drained()):
            time.sleep(0.5)
        warm = scrapes()
        # The measured tick: from a little before its slot until everything is checked and settled.
        slot = next_even_minute(time.time())
        while time.time() < slot - 3:
            time.sleep(0.2)
        own_start = sum(own_count(client, port) for port in ports)
        polls.clear()
        window_start = time.time()
        while not (time.time() > slot and scrapes() >= warm + args.sections and drained()):
            time.sleep(0.2)
        worked_s = time.time() - slot
        time.sleep(3)  # the last settlements and flushes
        window_end = time.time()
        own = sum(own_count(client, port) for port in ports) - own_start
        time.sleep(1)  # the MONITOR thread reads behind the server
        all_in = monitor.commands(window_start, window_end) - polls
        top = monitor.commands(window_start, window_end, top_level=True) - polls
        checked = scrapes() - warm
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        for log in logs:
            log.close()
        monitor.close()
        r.close()
        scraper.stop()
        server.stop()
        asyncio.run(drop_database(database_url))

    billed, top_billed = billable(all_in), billable(top)
    print(
        f"cron tick of {args.sections} unchanged sections, {args.daemons} daemon(s), default settings but the "
        f"schedule (every 2 min, stagger none); private redis-server"
    )
    print(f"sections checked in the tick: {checked}; worked through in {worked_s:.1f} s")
    print(
        f"billed commands for the tick: all-in {billed} ({billed / checked:.4f} per section checked), "
        f"top-level {top_billed} ({top_billed / checked:.4f} per section); target <= 0.1 all-in"
    )
    print(f"  all-in by command:    {dict(sorted(all_in.items()))}")
    print(f"  top-level by command: {dict(sorted(top.items()))}")
    diff = (own - billed) / billed * 100 if billed else 0.0
    print(f"the daemons' own count over the window: {own} (server all-in {billed}; {diff:+.1f}%); target within 5%")


if __name__ == "__main__":
    main()
