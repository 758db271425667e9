"""Time to notify, cron against adaptive checking, at the same scraper capacity (SPEC §11), in compressed time.

    .venv/bin/python bench/notify_latency.py [--compress 60] [--hours 3] [--hot 150] [--cold 150]

Real `seatwatch run` processes against a private redis-server and a scratch database per phase on the local
Postgres; in this process, a loopback scraper with a fixed capacity (``--slots`` served at once, ``--service-s``
each, the rest wait their turn inside it) and a loopback Resend that time-stamps every email it accepts.

Time is compressed ``--compress`` times (an hour into a minute at 60): intervals, service time, the scrape
budget and the Redis day are scaled alike, and every figure below is reported in uncompressed seconds.

W = hot + cold watched sections; each hot section has one eligible watcher, each cold one a watcher with
notifications off (an opening there emails nobody). Each hot section's seats open once at a random moment
(seeded, the same moments in every phase) and stay open 75 minutes, so each mode sees every opening.

Phases:
1. cron: the default daemon (fixed concurrency 4); ticks every 30 minutes alternating even/odd, fired with
   `seatwatch tick --group ...` (cron expressions stop at minutes; the tick itself is the daemon's code).
2. adaptive: one daemon, SEATWATCH_SCHEDULE=adaptive, SEATWATCH_CONCURRENCY=auto.
3. two adaptive daemons on the same Redis, sharing every budget.
4. Redis cost at one check per second (real time, no compression, the production intervals, 300 watched
   sections over 4 minutes by default): billed commands per check by MONITOR on the private redis-server,
   all-in (what scripts run included, as Upstash bills) and top-level side by side, and by the daemon's own
   count (which should agree with MONITOR's all-in figure within 5%).

Reported: open -> email accepted p50/p90, openings missed, scrapes in the busiest one-minute window against
the budget, median wait inside the scraper for a slot, the shortest gap between two checks of one section.
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
import random
import re
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from daemon.commands.embedded import RedisServer, free_port
from daemon.store.pool import connect
from tests.support.capacity import CapacityScraper
from tests.support.monitor import Monitor, billable
from tests.support.scratch import drop_database, migrated_database
from tests.support.stubs import RESEND_KEY, SCRAPER_TOKEN, Reply, ResendStub

TERM = "2261"
OPEN_FOR_S = 75 * 60
SUBJECT_NBR = re.compile(r"\((\d+)\)")


class TimedResend(ResendStub):
    """Resend that notes when it accepted each email."""

    def __init__(self) -> None:
        super().__init__()
        self.accepted: list[tuple[float, dict[str, Any]]] = []
        self.order = threading.Lock()

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> Reply:
        with self.order:
            before = len(self.deliveries)
            reply = super().handle(path, headers, body)
            now = time.time()
            self.accepted.extend((now, d.message) for d in self.deliveries[before:])
        return reply


@dataclass
class Args:
    compress: float
    hours: float
    hot: int
    cold: int
    slots: int
    service_s: float
    scrapes_per_hour: int
    redis_per_day: int
    seed: int


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def scratch_database(a: Args, last_checked_span_s: float) -> str:
    url = await migrated_database("bench_notify")
    conn = await connect(url)
    rng = random.Random(a.seed)
    for i in range(a.hot + a.cold):
        user = uuid.uuid4()
        nbr = str(10000 + i)
        await conn.execute("INSERT INTO auth.users (id, email) VALUES ($1, $2)", user, f"s{nbr}@example.edu")
        if i >= a.hot:
            await conn.execute("INSERT INTO user_profiles (user_id, notifications_enabled) VALUES ($1, false)", user)
        await conn.execute(
            "INSERT INTO class_watches (user_id, term, subject, catalog_nbr, class_nbr) "
            "VALUES ($1, $2, 'CSE', '240', $3)",
            user,
            TERM,
            nbr,
        )
        # Full, and last checked within the past hour (as the cron mode before it would have left it).
        await conn.execute(
            "INSERT INTO seatwatch_section_states (term, class_nbr, subject, catalog_nbr, instructor_name, "
            "seats_available, seats_capacity, last_checked_at, last_changed_at) VALUES ($1, $2, 'CSE', '240', "
            "'Staff', 0, 30, now() - make_interval(secs => $3), now() - interval '3 days')",
            TERM,
            nbr,
            rng.random() * last_checked_span_s,
        )
    await conn.close()
    return url


def openings(a: Args) -> dict[str, float]:
    """Bench seconds after the start at which each hot section opens."""
    rng = random.Random(a.seed + 1)
    span = a.hours * 3600
    return {str(10000 + i): rng.uniform(600, max(900, span - OPEN_FOR_S - 600)) for i in range(a.hot)}


class Phase:
    """Stubs, a scratch database, daemon processes, and what they did."""

    def __init__(self, a: Args, redis: RedisServer, work: Path, name: str, *, adaptive: bool, daemons: int = 1):
        self.a, self.redis, self.work, self.name = a, redis, work, name
        self.adaptive, self.daemons = adaptive, daemons
        self.opens = openings(a)
        self.t0 = float("inf")
        self.scraper = CapacityScraper(slots=a.slots, service_s=a.service_s / a.compress, seats=self.seats).start()
        self.resend = TimedResend().start()
        self.prefix = f"bench-{name}-{uuid.uuid4().hex[:6]}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []

    def bench_s(self, wall: float) -> float:
        return (wall - self.t0) * self.a.compress

    def seats(self, term: str, nbr: str, now: float) -> int:
        at = self.opens.get(nbr)
        t = self.bench_s(now)
        return 2 if at is not None and at <= t < at + OPEN_FOR_S else 0

    def env(self, database_url: str, consumer: str, port: int, **extra: Any) -> dict[str, str]:
        a = self.a
        env = {
            "PATH": os.environ["PATH"],
            "PYTHONUNBUFFERED": "1",
            "DATABASE_URL": database_url,
            "REDIS_URL": self.redis.url,
            "SCRAPER_URL": self.scraper.url,
            "SCRAPER_SECRET_TOKEN": SCRAPER_TOKEN,
            "RESEND_API_KEY": RESEND_KEY,
            "RESEND_API_URL": self.resend.url,
            "NOTIFICATION_FROM_EMAIL": "notifications@pickmyclass.test",
            "SUPABASE_SERVICE_ROLE_KEY": "bench-signing-key",
            "SEATWATCH_REDIS_PREFIX": self.prefix,
            "SEATWATCH_HEALTH_LISTEN": f"127.0.0.1:{port}",
            "SEATWATCH_CONSUMER": consumer,
            "SEATWATCH_CRON": "0 0 1 1 *",  # never within the run: phase 1 fires its ticks itself
            "SEATWATCH_SCRAPER_TIMEOUT_S": "30",
            "SEATWATCH_VISIBILITY_TIMEOUT_S": "60",
            "SEATWATCH_LOG_LEVEL": "info",
            "SEATWATCH_EMAIL_QUOTA_PER_DAY": "0",  # the stand-in Resend has no quota
            "SEATWATCH_EMAIL_QUOTA_PER_MONTH": "0",
        }
        if self.adaptive:
            env.update(
                {
                    "SEATWATCH_SCHEDULE": "adaptive",
                    "SEATWATCH_CONCURRENCY": "auto",
                    "SEATWATCH_MIN_CHECK_INTERVAL_S": str(max(1, round(120 / a.compress))),
                    "SEATWATCH_MAX_CHECK_INTERVAL_S": str(max(1, round(3600 / a.compress))),
                    "SEATWATCH_SCRAPES_PER_HOUR": str(round(a.scrapes_per_hour * a.compress)),
                    "SEATWATCH_REDIS_BUDGET_PER_DAY": str(round(a.redis_per_day * a.compress)),
                }
            )
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def start(self, database_url: str, **extra: Any) -> None:
        for i in range(self.daemons):
            port = free_port()
            log = (self.work / f"{self.name}-{i}.log").open("wb")
            env = self.env(database_url, f"{self.name}-{i}", port, **extra)
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "daemon", "run"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
                )
            )
            self.ports.append(port)
        for port in self.ports:
            deadline = time.time() + 60
            while time.time() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code in (200, 503):
                        break
                time.sleep(0.2)

    def health(self, i: int = 0) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"http://127.0.0.1:{self.ports[i]}/health", timeout=5).json()
        return body

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.scraper.stop()
        self.resend.stop()

    def results(self) -> dict[str, Any]:
        a = self.a
        first_email: dict[str, float] = {}
        for at, message in self.resend.accepted:
            match = SUBJECT_NBR.search(str(message.get("subject", "")))
            if match and match[1] not in first_email:
                first_email[match[1]] = at
        latencies, missed = [], 0
        end = self.bench_s(time.time())
        for nbr, open_s in self.opens.items():
            if open_s + OPEN_FOR_S > end:
                continue  # still open when the run ended
            emailed = first_email.get(nbr)
            if emailed is None or self.bench_s(emailed) < open_s:
                missed += 1
            else:
                latencies.append(self.bench_s(emailed) - open_s)
        served = [s for s in self.scraper.snapshot() if s.arrived >= self.t0]
        waits = [s.waited_s * a.compress for s in served]
        window_wall = 60 / a.compress
        busiest = self.scraper.max_in_window(window_wall, since=self.t0 + window_wall)
        gap = self.scraper.min_gap_s()
        return {
            "openings": len(latencies) + missed,
            "missed": missed,
            "p50_s": pct(latencies, 0.5),
            "p90_s": pct(latencies, 0.9),
            "scrapes": len(served),
            "scrapes_per_hour": len(served) / max(1e-9, end / 3600),
            "busiest_minute": busiest,
            "wait_p50_s": statistics.median(waits) if waits else None,
            "min_gap_s": None if gap is None else gap * a.compress,
        }


def run_cron(a: Args, redis: RedisServer, work: Path) -> dict[str, Any]:
    phase = Phase(a, redis, work, "cron", adaptive=False)
    url = asyncio.run(scratch_database(a, 3600 / a.compress))
    try:
        phase.start(url)
        phase.t0 = time.time()
        half_hour_wall = 1800 / a.compress
        k = 0
        env = phase.env(url, "cron-tick", free_port())
        while phase.bench_s(time.time()) < a.hours * 3600:
            group = "even" if k % 2 == 0 else "odd"
            subprocess.run(
                [sys.executable, "-m", "daemon", "tick", "--group", group],
                env=env,
                cwd=ROOT,
                capture_output=True,
                check=False,
            )
            k += 1
            time.sleep(max(0.0, phase.t0 + k * half_hour_wall - time.time()))
        time.sleep(2)
        result = phase.results()
        result["schedule"] = phase.health()["checks"].get("schedule")
        return result
    finally:
        phase.stop()
        asyncio.run(drop_database(url))


def run_adaptive(a: Args, redis: RedisServer, work: Path, *, daemons: int, hours: float) -> dict[str, Any]:
    name = "adaptive" if daemons == 1 else f"adaptive{daemons}"
    phase = Phase(a, redis, work, name, adaptive=True, daemons=daemons)
    url = asyncio.run(scratch_database(a, 3600 / a.compress))
    try:
        phase.start(url)
        phase.t0 = time.time()
        while phase.bench_s(time.time()) < hours * 3600:
            time.sleep(1)
        result = phase.results()
        result["schedule"] = phase.health()["checks"].get("schedule")
        result["budget_per_minute"] = a.scrapes_per_hour / 60
        return result
    finally:
        phase.stop()
        asyncio.run(drop_database(url))


def run_cost(a: Args, redis: RedisServer, work: Path, window_s: float, hot: int, cold: int) -> dict[str, Any]:
    """Real time, the production intervals: SEATWATCH_SCRAPES_PER_HOUR=3600 (one check a second binds),
    ``hot`` + ``cold`` watched sections; MONITOR (all-in and top-level) against the daemon's own count."""
    cost = Args(**{**a.__dict__, "compress": 1.0, "service_s": 0.2, "hot": hot, "cold": cold})
    phase = Phase(cost, redis, work, "cost", adaptive=True)
    url = asyncio.run(scratch_database(cost, 3600))
    monitor = Monitor(redis.port)
    try:
        phase.start(
            url,
            SEATWATCH_MIN_CHECK_INTERVAL_S=120,
            SEATWATCH_MAX_CHECK_INTERVAL_S=3600,
            SEATWATCH_SCRAPES_PER_HOUR=3600,
            SEATWATCH_REDIS_BUDGET_PER_DAY=16000,
        )
        phase.t0 = time.time()
        time.sleep(20)  # start-up (script loads, first plan) is not the steady state

        def own_count() -> dict[str, int]:
            text = httpx.get(f"http://127.0.0.1:{phase.ports[0]}/metrics", timeout=5).text
            return {
                purpose: int(float(v))
                for purpose, v in re.findall(r'^seatwatch_redis_commands\{purpose="([^"]*)"[^}]*\} (\S+)$', text, re.M)
            }

        start, own_start = time.time(), own_count()
        time.sleep(window_s)
        end, own_end = time.time(), own_count()
        checks = sum(1 for s in phase.scraper.snapshot() if start <= s.arrived < end)
        seen = billable(monitor.commands(start, end))
        top = billable(monitor.commands(start, end, top_level=True))
        own = {k: own_end.get(k, 0) - own_start.get(k, 0) for k in own_end}
        own_total = sum(own.values())
        schedule = phase.health()["checks"].get("schedule") or {}
        return {
            "checks": checks,
            "window_s": end - start,
            "checks_per_s": checks / (end - start),
            "monitor": seen,
            "monitor_top_level": top,
            "own": own_total,
            "own_by_purpose": {k: v for k, v in sorted(own.items()) if v},
            "per_check_monitor": seen / max(1, checks),
            "per_check_top_level": top / max(1, checks),
            "per_check_own": own_total / max(1, checks),
            "by_command": dict(monitor.commands(start, end).most_common(8)),
            "schedule": schedule,
        }
    finally:
        monitor.close()
        phase.stop()
        asyncio.run(drop_database(url))


def fmt(value: Any, unit: str = "s") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}{unit}" if value >= 10 else f"{value:.2f}{unit}"
    return f"{value}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compress", type=float, default=60)
    parser.add_argument("--hours", type=float, default=3, help="bench hours per phase")
    parser.add_argument("--hot", type=int, default=150)
    parser.add_argument("--cold", type=int, default=150)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--service-s", type=float, default=8.0)
    parser.add_argument("--scrapes-per-hour", type=int, default=1500)
    parser.add_argument("--redis-per-day", type=int, default=16000)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--cost-window-s", type=float, default=240)
    parser.add_argument("--cost-hot", type=int, default=150)
    parser.add_argument("--cost-cold", type=int, default=150)
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: cron,adaptive,two,cost")
    ns = parser.parse_args()
    a = Args(
        ns.compress,
        ns.hours,
        ns.hot,
        ns.cold,
        ns.slots,
        ns.service_s,
        ns.scrapes_per_hour,
        ns.redis_per_day,
        ns.seed,
    )
    skip = set(filter(None, ns.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="bench-notify-"))
    redis = RedisServer(work / "redis").start()
    capacity_h = a.slots / a.service_s * 3600
    print(
        f"W={a.hot + a.cold} watched sections ({a.hot} with an eligible watcher), scraper {a.slots} slots x "
        f"{a.service_s:g}s (capacity {capacity_h:,.0f}/h), scrape budget {a.scrapes_per_hour}/h, Redis "
        f"{a.redis_per_day}/day, time compressed {a.compress:g}x, {a.hours:g} h per phase, seed {a.seed}"
    )
    results: dict[str, dict[str, Any]] = {}
    try:
        if "cron" not in skip:
            results["cron (concurrency 4)"] = run_cron(a, redis, work)
        if "adaptive" not in skip:
            results["adaptive (auto)"] = run_adaptive(a, redis, work, daemons=1, hours=a.hours)
        if "two" not in skip:
            results["adaptive, 2 daemons"] = run_adaptive(a, redis, work, daemons=2, hours=a.hours)
        cost = run_cost(a, redis, work, ns.cost_window_s, ns.cost_hot, ns.cost_cold) if "cost" not in skip else None
    finally:
        redis.stop()
    budget_minute = a.scrapes_per_hour / 60
    print()
    print(
        "| mode | openings (missed) | open->email p50 | p90 | scrapes/h | busiest minute (budget) | "
        "wait for a slot p50 | closest two checks |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['openings']} ({r['missed']}) | {fmt(r['p50_s'])} | {fmt(r['p90_s'])} | "
            f"{r['scrapes_per_hour']:,.0f} | {r['busiest_minute']} ({budget_minute:g}) | {fmt(r['wait_p50_s'])} | "
            f"{fmt(r['min_gap_s'])} |"
        )
    cron, adaptive = results.get("cron (concurrency 4)"), results.get("adaptive (auto)")
    if cron and adaptive and cron["p50_s"] and adaptive["p50_s"]:
        print(
            f"\nadaptive / cron: p50 {adaptive['p50_s'] / cron['p50_s']:.3f} (target <= 0.167), "
            f"p90 {adaptive['p90_s'] / cron['p90_s']:.3f}"
        )
    for name, r in results.items():
        s = r.get("schedule") or {}
        print(
            f"{name}: health schedule {s.get('status')} coverage={s.get('coverage')} behind={s.get('behind')} "
            f"interval p50/p95={s.get('interval_p50_s')}/{s.get('interval_p95_s')} (compressed s) "
            f"binding={s.get('binding')} concurrency={s.get('concurrency', {}).get('limit') if s else None} "
            f"checks={s.get('checks_here')} skipped late={s.get('skipped_late')} hot={s.get('hot')}"
        )
    if cost:
        agree = abs(cost["own"] - cost["monitor"]) / max(1, cost["monitor"])
        sched = cost["schedule"]
        print(
            f"\nRedis cost, real time: {ns.cost_hot + ns.cost_cold} watched ({ns.cost_hot} with someone waiting), "
            f"SEATWATCH_SCRAPES_PER_HOUR=3600, intervals 120-3600 s, over {cost['window_s']:.0f}s: "
            f"{cost['checks']} checks ({cost['checks_per_s']:.2f}/s), {sched.get('take_calls')} take calls in all"
        )
        print("\n| billed commands | in the window | per check |")
        print("|---|---|---|")
        for label, total, per in (
            ("all-in (MONITOR, what a script runs included)", cost["monitor"], cost["per_check_monitor"]),
            ("top-level (MONITOR, script calls as one)", cost["monitor_top_level"], cost["per_check_top_level"]),
            ("the daemon's own count (all-in)", cost["own"], cost["per_check_own"]),
        ):
            print(f"| {label} | {total} | {per:.3f} |")
        print(f"\nown vs MONITOR: {agree:.1%} apart (target within 5%); own by purpose {cost['own_by_purpose']}")
        print(f"by command (all-in): {cost['by_command']}")
    print(f"logs: {work}")


if __name__ == "__main__":
    main()
