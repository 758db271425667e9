"""What an idle daemon costs: Redis commands per day as Upstash bills them (MONITOR on a private redis-server,
the commands scripts run included; the top-level count beside it), the daemon's own count over the same
window, and RSS.

    .venv/bin/python bench/idle.py [--minutes 31] [--sections 0] [--cron '0 0 1 1 *']

By default the daemon's cron fires once a year, so the window holds no tick: the idle floor alone (SPEC §5's
"nothing due, no ticks"). The 48 ticks a day of the default schedule are added separately at the cost of a
manual tick measured after the window.

A real `seatwatch run` process with default settings (cron 0,30 in America/Phoenix, concurrency 4) against a
private redis-server (used by nothing else, so every command MONITOR sees is the daemon's) and a scratch
database on the local Postgres. Health is probed every 5 s the whole time, as a monitor would. Ticks are
counted at their real cadence: the daemon's own ticks during the window are measured as they happen, and the
projection adds 48 ticks a day at the cost a tick was measured to have (a manual `seatwatch tick` run under
MONITOR when none fell in the window).
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
import contextlib
import os
import subprocess
import tempfile
import time
import uuid
from datetime import datetime

import httpx
import psutil

from daemon.commands.embedded import RedisServer, free_port
from daemon.store.pool import connect
from tests.support.monitor import Monitor, billable
from tests.support.scratch import drop_database, migrated_database
from tests.support.stubs import ScraperStub


async def scratch_database(sections: int) -> str:
    url = await migrated_database("bench_idle")
    conn = await connect(url)
    for i in range(sections):
        user = uuid.uuid4()
        await conn.execute("INSERT INTO auth.users (id, email) VALUES ($1, $2)", user, f"u{i}@example.edu")
        await conn.execute(
            "INSERT INTO class_watches (user_id, term, subject, catalog_nbr, class_nbr) "
            "VALUES ($1, '2261', 'CSE', '240', $2)",
            user,
            str(20000 + i),
        )
    await conn.close()
    return url


def _log_time(line: str) -> float:
    """The epoch time of a text-format log line (``<6>2026-11-29T02:35:31.433+00:00 INFO ...``)."""
    stamp = line.split(">", 1)[1].split(" ", 1)[0]
    return datetime.fromisoformat(stamp).timestamp()


def own_count(client: httpx.Client, port: int) -> int:
    """The daemon's own Redis command count since start (all purposes), from /metrics."""
    text = client.get(f"http://127.0.0.1:{port}/metrics").text
    return sum(
        int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines() if line.startswith("seatwatch_redis_commands{")
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    # 31 minutes hold two of the idle loop's 15-minute cycles and at least one :00/:30 tick.
    parser.add_argument("--minutes", type=float, default=31.0)
    parser.add_argument("--sections", type=int, default=0, help="watched sections (0 = a daemon with nothing to do)")
    parser.add_argument(
        "--cron", default="0 0 1 1 *", help="the daemon's SEATWATCH_CRON (default: no tick in the window)"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    redis = RedisServer(work / "redis").start()
    scraper = ScraperStub().start()
    for i in range(args.sections):
        scraper.set("2261", str(20000 + i), seats=0)
    database_url = asyncio.run(scratch_database(args.sections))
    health_port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "DATABASE_URL": database_url,
        "REDIS_URL": redis.url,
        "SCRAPER_URL": scraper.url,
        "SCRAPER_SECRET_TOKEN": "test-scraper-token-4f1d",
        "SEATWATCH_EMAIL_TRANSPORT": "file",
        "SEATWATCH_OUTBOX_DIR": str(work / "outbox"),
        "SEATWATCH_HEALTH_LISTEN": f"127.0.0.1:{health_port}",
        "SEATWATCH_CONSUMER": "bench-idle",
        "SEATWATCH_CRON": args.cron,
    }
    monitor = Monitor(redis.port)
    log = (work / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "daemon", "run"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
    )
    try:
        client = httpx.Client(timeout=5)
        deadline = time.time() + 30
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"http://127.0.0.1:{health_port}/health").status_code in (200, 503):
                    break
            time.sleep(0.2)
        time.sleep(2)
        start_cost = billable(monitor.commands())
        own_start = own_count(client, health_port)
        window_start = time.time()
        window_s = args.minutes * 60
        rss_peak = 0
        probes = 0
        while time.time() < window_start + window_s:
            client.get(f"http://127.0.0.1:{health_port}/api/monitoring/health")
            probes += 1
            rss_peak = max(rss_peak, psutil.Process(daemon.pid).memory_info().rss)
            time.sleep(5)
        window_end = time.time()
        own = own_count(client, health_port) - own_start
        time.sleep(1)  # the MONITOR thread reads behind the server
        in_window = monitor.commands(window_start, window_end)
        top_in_window = monitor.commands(window_start, window_end, top_level=True)
        rss_end = psutil.Process(daemon.pid).memory_info().rss

        # One tick's cost, measured under MONITOR: the daemon's own when one fell in the window, else a manual one.
        ticks_in_window = sum(
            1
            for line in (work / "daemon.log").read_text().splitlines()
            if "daemon.cron.scheduler: tick " in line and window_start <= _log_time(line) < window_end
        )
        tick_start = time.time()
        tick = subprocess.run(
            [sys.executable, "-m", "daemon", "tick"], env=env, capture_output=True, text=True, cwd=ROOT
        )
        time.sleep(1)
        tick_cost = billable(monitor.commands(tick_start, time.time()))
        tick_top = billable(monitor.commands(tick_start, time.time(), top_level=True))
        status = subprocess.run(
            [sys.executable, "-m", "daemon", "status"], env=env, capture_output=True, text=True, cwd=ROOT
        ).stdout
    finally:
        daemon.terminate()
        daemon.wait(30)
        log.close()
        monitor.close()
        scraper.stop()
        redis.stop()
        asyncio.run(drop_database(database_url))

    total = billable(in_window)
    top = billable(top_in_window)
    per_day_window = total * 86400 / window_s
    print(f"idle daemon, private redis-server, {args.sections} watched sections, window {window_s / 60:.1f} min")
    print(f"health probes during the window: {probes} (every 5 s)")
    print(f"start-up commands, all-in (script loads, group): {start_cost}")
    print(f"billable commands in the window: all-in {total}, top-level {top}")
    print(f"  all-in by command: {dict(sorted(in_window.items()))}")
    print(f"the daemon's own count over the window: {own} (server all-in {total}; difference {own - total:+d})")
    print(
        f"daemon ticks in the window: {ticks_in_window}; one tick measured at {tick_cost} all-in, {tick_top} "
        f"top-level (manual tick: {tick.stdout.strip() or tick.stderr.strip()})"
    )
    print(
        f"projected per day, nothing due and no ticks: {per_day_window:.0f} all-in "
        f"({top * 86400 / window_s:.0f} top-level); target <= 400"
    )
    if not ticks_in_window:
        print(f"with the default 48 ticks a day of an empty group: {per_day_window + 48 * tick_cost:.0f} all-in")
    print(f"RSS: peak {rss_peak / 2**20:.1f} MB, end {rss_end / 2**20:.1f} MB; target <= 50 MB")
    print("\nseatwatch status afterwards:\n" + status)


if __name__ == "__main__":
    main()
