"""Health latency while a tick's work runs, and the daemon's memory when idle.

Starts a private redis-server, a scratch database on the local Postgres (created, migrated, dropped), a stub
scraper answering each section after ~50 ms, and a real ``seatwatch run`` process with default settings
(4 workers). Seeds 500 watched sections, measures health latency idle, triggers ``python -m daemon tick
--group all`` and measures again while the 500 scrapes run, then reads the daemon's RSS after start and after
the work. Targets: median health latency < 10 ms while a tick runs; idle RSS <= 50 MB.

    .venv/bin/python bench/health.py [--sections 500] [--requests 1000] [--scrape-ms 50] [--pause-ms 5]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder would come first on sys.path, and bench/queue.py would shadow the
# standard library's queue module; the project root goes there instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg
import httpx
import orjson
import psutil

from daemon.commands.embedded import RedisServer, free_port
from daemon.store.pool import connect
from tests.support.scratch import drop_database, migrated_database

ROOT = Path(__file__).resolve().parents[1]
TERM = "2261"
TOKEN = "bench-scraper-token"  # noqa: S105 - a throwaway value for the loopback stub
MEDIAN_TARGET_MS = 10.0
RSS_TARGET_MB = 50.0


# -- a scraper that takes its time ----------------------------------------------------------------------------


class ScraperHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    delay_s = 0.05

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _json(self, status: int, body: Any) -> None:
        payload = orjson.dumps(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        self._json(200, {"status": "ok"})

    def do_POST(self) -> None:
        request = orjson.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        time.sleep(self.delay_s)
        class_nbr = int(request["sectionNumber"])
        data = {
            "subject": "CSE",
            "catalog_nbr": str(100 + class_nbr % 400),
            "title": "Benchmarking Daemons",
            "instructor": "Staff" if class_nbr % 3 else "Grace Hopper",
            "seats_available": class_nbr % 5,
            "seats_capacity": 40,
            "non_reserved_seats": None,
            "location": "Tempe - BYENG 210",
            "meeting_times": "TTh 10:30AM-11:45AM",
        }
        self._json(200, {"success": True, "data": data})


# -- the scratch database ---------------------------------------------------------------------------------------


async def seeded_database(class_nbrs: list[str]) -> str:
    """A migrated scratch database with one watcher per section; its URL."""
    url = await migrated_database("swbench")
    conn = await connect(url)
    try:
        users = [(uuid.uuid4(), f"student{n}@bench.test") for n in class_nbrs]
        await conn.executemany("INSERT INTO auth.users (id, email) VALUES ($1, $2)", users)
        await conn.executemany(
            "INSERT INTO class_watches (user_id, term, subject, catalog_nbr, class_nbr) "
            "VALUES ($1, $2, 'CSE', '240', $3)",
            [(user_id, TERM, n) for (user_id, _), n in zip(users, class_nbrs, strict=True)],
        )
    finally:
        await conn.close()
    return url


async def processed(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM seatwatch_section_states WHERE term = $1", TERM))
    finally:
        await conn.close()


# -- measuring ---------------------------------------------------------------------------------------------------


@dataclass
class Latencies:
    label: str
    ms: list[float]
    errors: int
    processed_before: int
    processed_after: int

    def row(self) -> str:
        q = statistics.quantiles(self.ms, n=100, method="inclusive")
        return (
            f"{self.label:<22} {len(self.ms):>6} {statistics.median(self.ms):>8.2f} {q[94]:>8.2f} {q[98]:>8.2f} "
            f"{max(self.ms):>8.2f} {self.errors:>7}  {self.processed_before:>4} -> {self.processed_after}"
        )


def probe(url: str, requests: int, label: str, db_url: str, pause_s: float) -> Latencies:
    """Sequential GETs on one keep-alive client, ``pause_s`` apart; a failed request is counted and retried."""
    before = asyncio.run(processed(db_url))
    samples: list[float] = []
    errors = 0
    with httpx.Client(timeout=5) as client:
        while len(samples) < requests:
            started = time.perf_counter()
            try:
                response = client.get(url)
            except httpx.TransportError:
                errors += 1
                continue
            samples.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                raise SystemExit(f"health answered {response.status_code}: {response.text}")
            time.sleep(pause_s)
    return Latencies(label, samples, errors, before, asyncio.run(processed(db_url)))


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / (1024 * 1024)


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"daemon exited with {process.returncode}:\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"daemon not healthy within {timeout_s}s:\n{log.read_text()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sections", type=int, default=500)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--scrape-ms", type=float, default=50.0)
    parser.add_argument("--pause-ms", type=float, default=5.0, help="between two health GETs")
    args = parser.parse_args()

    class_nbrs = [str(10000 + i) for i in range(args.sections)]
    workdir = Path(tempfile.mkdtemp(prefix="seatwatch-bench-"))
    with contextlib.ExitStack() as stack:
        redis = RedisServer(workdir / "redis").start()
        stack.callback(redis.stop)
        db_url = asyncio.run(seeded_database(class_nbrs))
        stack.callback(lambda: asyncio.run(drop_database(db_url)))

        ScraperHandler.delay_s = args.scrape_ms / 1000
        scraper = ThreadingHTTPServer(("127.0.0.1", 0), ScraperHandler)
        scraper.daemon_threads = True
        threading.Thread(target=scraper.serve_forever, daemon=True).start()
        stack.callback(scraper.server_close)
        stack.callback(scraper.shutdown)

        health_port = free_port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONUNBUFFERED": "1",
            "DATABASE_URL": db_url,
            "REDIS_URL": redis.url,
            "SCRAPER_URL": f"http://127.0.0.1:{scraper.server_address[1]}",
            "SCRAPER_SECRET_TOKEN": TOKEN,
            "RESEND_API_KEY": "re_bench_unused",
            "RESEND_API_URL": "http://127.0.0.1:9",
            "NOTIFICATION_FROM_EMAIL": "bench@pickmyclass.test",
            "SUPABASE_SERVICE_ROLE_KEY": "bench-signing-key",
            "SEATWATCH_REDIS_PREFIX": "swbench",
            "SEATWATCH_HEALTH_LISTEN": f"127.0.0.1:{health_port}",
            "SEATWATCH_CONSUMER": f"bench-{os.getpid()}",
            "SEATWATCH_CRON": "0 0 1 1 *",  # no scheduled tick interferes: the bench triggers its own
        }
        log = workdir / "daemon.log"
        with log.open("ab") as out:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "daemon", "run"], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )

        def stop_daemon() -> None:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(30)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()

        stack.callback(stop_daemon)
        url = f"http://127.0.0.1:{health_port}/api/monitoring/health"
        wait_healthy(url, daemon, log)
        time.sleep(2.0)
        rss_start = rss_mb(daemon.pid)

        idle = probe(url, args.requests, "idle", db_url, args.pause_ms / 1000)

        tick_started = time.monotonic()
        tick = subprocess.run(
            [sys.executable, "-m", "daemon", "tick", "--group", "all"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        if tick.returncode != 0:
            raise SystemExit(f"tick failed ({tick.returncode}): {tick.stderr}")
        busy = probe(url, args.requests, "while the tick runs", db_url, args.pause_ms / 1000)
        rss_during = rss_mb(daemon.pid)

        deadline = time.monotonic() + 300
        while (done := asyncio.run(processed(db_url))) < args.sections and time.monotonic() < deadline:
            time.sleep(0.2)
        work_s = time.monotonic() - tick_started
        if daemon.poll() is not None:
            raise SystemExit(f"daemon exited with {daemon.returncode}:\n{log.read_text()}")
        time.sleep(3.0)
        rss_after = rss_mb(daemon.pid)
        after = probe(url, args.requests, "idle after the work", db_url, args.pause_ms / 1000)

    print(
        f"seatwatch health bench: {args.sections} sections, scraper {args.scrape_ms:.0f} ms, 4 workers, "
        f"{args.requests} sequential GETs {args.pause_ms:.0f} ms apart per window"
    )
    print(f"tick: {tick.stdout.strip()}")
    print(f"work: {done}/{args.sections} sections stored {work_s:.1f} s after the tick started")
    print()
    print(
        f"{'health GET latency':<22} {'n':>6} {'median':>8} {'p95':>8} {'p99':>8} {'max':>8} {'errors':>7}  processed"
    )
    print(f"{'':<22} {'':>6} {'ms':>8} {'ms':>8} {'ms':>8} {'ms':>8}")
    for result in (idle, busy, after):
        print(result.row())
    print()
    print(f"{'daemon RSS':<22} {'MB':>8}")
    print(f"{'after start (idle)':<22} {rss_start:>8.1f}")
    print(f"{'during the work':<22} {rss_during:>8.1f}")
    print(f"{'after the work (idle)':<22} {rss_after:>8.1f}")
    print()
    median_ok = statistics.median(busy.ms) < MEDIAN_TARGET_MS
    overlap_ok = busy.processed_after < args.sections
    rss_ok = max(rss_start, rss_after) <= RSS_TARGET_MB
    print(f"target median < {MEDIAN_TARGET_MS:.0f} ms while a tick runs: {'ok' if median_ok else 'MISSED'}")
    if not overlap_ok:
        print("note: the work finished before the probes did; raise --sections or --scrape-ms")
    print(f"target idle RSS <= {RSS_TARGET_MB:.0f} MB: {'ok' if rss_ok else 'MISSED'}")
    if busy.errors or idle.errors or after.errors:
        print("errors are requests that failed on a kept-alive connection the daemon had just closed (retried)")
    return 0 if median_ok and rss_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
