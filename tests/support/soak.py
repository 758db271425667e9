"""The soak's machinery (bench/soak.py is its command line; tests/integration/test_soak.py its CI-sized run).

Private servers in the production shape (a TLS-only redis-server, a PostgreSQL cluster in a temp dir behind
PgBouncer in transaction mode), loopback stand-ins for the scraper (seats churning at random) and Resend (its
idempotency keys), two real ``seatwatch run`` processes, a schedule of faults, and the report: the exact email
ledger, per-fault counts and recovery times, RSS, fds, Redis memory and commands per section.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import random
import re
import statistics
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import psutil
import redis

from daemon.commands.embedded import free_port
from daemon.store.migrations import migrate
from daemon.store.pool import connect
from tests.support.procs import DaemonProcess, daemon_env
from tests.support.shapes import OwnPostgres, PgBouncer, RedisProc
from tests.support.stubs import Reply, ResendStub, ScraperStub, section_data

TERM = "2261"
FAULTS = (
    "scraper_errors",
    "scraper_latency",
    "resend_429",
    "resend_500",
    "resend_lost_reply",
    "redis_restart",
    "postgres_restart",
    "pgbouncer_restart",
    "daemon_sigkill",
)
INELIGIBLE_FLAGS = (
    {"notifications_enabled": False},
    {"email_bounced": True},
    {"spam_complained": True},
    {"is_disabled": True},
)


# -- the stand-ins ---------------------------------------------------------------------------------------------


class SoakScraper(ScraperStub):
    """Seats per section that churn at random; a fault mode for errors or latency."""

    def __init__(self, class_nbrs: list[str], rng: random.Random) -> None:
        super().__init__()
        self.rng = rng
        self.seats = dict.fromkeys(class_nbrs, 0)
        self.instructor = dict.fromkeys(class_nbrs, "Staff")
        self.mode = ""
        self.served = 0

    def record(self, path: str, headers: dict[str, str], body: bytes) -> None:
        with self.lock:
            self.served += 1  # 2,000 a minute: counted, not kept

    def next_reply(self, key: tuple[str, str]) -> Reply:
        with self.lock:
            seats = self.seats.get(key[1])
            instructor = self.instructor.get(key[1], "Staff")
            mode = self.mode
            roll = self.rng.random()
            delay_s = self.rng.uniform(3, 8)
        if seats is None:
            return Reply(500, {"success": False, "error": f"Section {key[1]} not found for term {key[0]}"})
        if mode == "errors" and roll < 0.6:
            return Reply(502, {"success": False, "error": "upstream class search unavailable"})
        data = section_data(seats=seats, capacity=40, instructor=instructor)
        return Reply(200, {"success": True, "data": data}, delay_s=delay_s if mode == "latency" and roll < 0.1 else 0)

    def churn(self, fraction: float) -> None:
        """A fraction of sections move: full ones open, open ones fill or change; now and then an instructor."""
        with self.lock:
            for class_nbr in self.rng.sample(sorted(self.seats), max(1, int(len(self.seats) * fraction))):
                seats = self.seats[class_nbr]
                if seats == 0:
                    self.seats[class_nbr] = self.rng.randint(1, 5)
                elif self.rng.random() < 0.6:
                    self.seats[class_nbr] = 0
                else:
                    self.seats[class_nbr] = self.rng.randint(1, 8)
                if self.instructor[class_nbr] == "Staff" and self.rng.random() < 0.02:
                    self.instructor[class_nbr] = f"Prof {class_nbr}"


class SoakResend(ResendStub):
    """Resend with its idempotency keys, plus fault modes: 429, 500, or the reply lost after delivering."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = ""
        self.answered: collections.Counter[int] = collections.Counter()

    def record(self, path: str, headers: dict[str, str], body: bytes) -> None:
        return

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> Reply:
        mode = self.mode
        if mode == "429":
            reply = Reply(429, {"name": "rate_limit_exceeded", "message": "slow down"}, {"Retry-After": "2"})
        elif mode == "500":
            reply = Reply(500, {"name": "internal_server_error", "message": "try again"})
        else:
            reply = super().handle(path, headers, body)
            if mode == "lost" and reply.status == 200:
                reply = dataclasses.replace(reply, drop=True)
        with self.lock:
            self.answered[0 if reply.drop else reply.status] += 1
        return reply


# -- bookkeeping ---------------------------------------------------------------------------------------------


@dataclass
class Injection:
    fault: str
    at: float
    ended: float
    recovered_s: float | None = None
    wall: tuple[float, float] = (0.0, 0.0)  # epoch seconds: injected, ended


@dataclass
class Sample:
    t_s: float
    rss_mb: dict[str, float]
    fds: dict[str, int]
    redis_used_mb: float | None


@dataclass
class Report:
    config: dict[str, Any]
    injections: list[Injection]
    samples: list[Sample]
    ledger: dict[str, int]
    by_fault: list[dict[str, Any]]
    steady: dict[str, Any]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _canonical(message: Any) -> bytes:
    return orjson.dumps(message, option=orjson.OPT_SORT_KEYS)


_METRIC = re.compile(r'^(seatwatch_redis_commands|seatwatch_sections_checked_total)\{(\w+)="([^"]*)"\} ([0-9.e+]+)$')


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    found: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for line in text.splitlines():
        match = _METRIC.match(line)
        if match:
            found[match[1]][match[3]] = float(match[4])
    return found


# -- the soak --------------------------------------------------------------------------------------------------


class Soak:
    def __init__(
        self,
        *,
        minutes: float,
        sections: int,
        fault_every_s: float,
        seed: int,
        calm_s: float,
        faults: tuple[str, ...] = FAULTS,
        first_fault_s: float = 75,
        fault_window_s: float = 35,
        sample_every_s: float = 15,
        aligned: bool = False,
        churn_every_s: float = 20,
        churn_fraction: float = 0.03,
        daemon_overrides: dict[str, str] | None = None,
        wait_for_work: bool = True,
        log: Any = print,
    ) -> None:
        self.wait_for_work = wait_for_work  # recovery of a restart or kill includes a section checked since
        self.aligned = aligned
        self.churn_every_s = churn_every_s
        self.churn_fraction = churn_fraction
        self.daemon_overrides = daemon_overrides or {}
        self.minutes = minutes
        self.sections = sections
        self.fault_every_s = fault_every_s
        self.seed = seed
        self.calm_s = calm_s
        self.faults = faults
        self.first_fault_s = first_fault_s
        self.fault_window_s = fault_window_s
        self.sample_every_s = sample_every_s
        self.log = log
        self.rng = random.Random(seed)
        self.class_nbrs = [str(20000 + i) for i in range(sections)]
        self.workdir = Path(tempfile.mkdtemp(prefix="seatwatch-soak-"))
        self.stack = contextlib.ExitStack()
        self.stop_threads = threading.Event()
        self.samples: list[Sample] = []
        self.counters: dict[tuple[str, int], dict[str, dict[str, float]]] = {}
        self.injections: list[Injection] = []
        self.ineligible: set[str] = set()
        self.daemons: dict[str, DaemonProcess] = {}
        self.t0 = 0.0

    # -- set up ------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.redis = RedisProc(tls=True).start()
        self.stack.callback(self.redis.stop)
        self.postgres = OwnPostgres().start()
        self.stack.callback(self.postgres.stop)
        asyncio.run(self._seed())
        self.bouncer = PgBouncer(self.postgres.url, pool_size=10).start()
        self.stack.callback(self.bouncer.stop)
        self.scraper = SoakScraper(self.class_nbrs, random.Random(self.seed + 1)).start()
        self.stack.callback(self.scraper.stop)
        self.resend = SoakResend().start()
        self.stack.callback(self.resend.stop)
        for name in ("a", "b"):
            env = daemon_env(
                redis_url=self.redis.url,
                database_url=self.bouncer.url_for(self.database_url),
                prefix="soak",
                scraper_url=self.scraper.url,
                resend_url=self.resend.url,
                health_port=free_port(),
                SEATWATCH_CONSUMER=f"soak-{name}",
                SEATWATCH_CRON="* * * * *",
                SEATWATCH_TIMEZONE="UTC",
                SEATWATCH_STAGGER="none",
                SEATWATCH_LOCK_TTL_S="50",
                SEATWATCH_BREAKER_RECOVERY_S="15",
                SEATWATCH_LOG_LEVEL="info",
                SEATWATCH_LOG_FORMAT="text",
            )
            env.update(self.daemon_overrides)
            self.daemons[name] = self._spawn(name, env)
        self.stack.callback(self._stop_daemons)
        for proc in self.daemons.values():
            proc.wait_healthy(60)
        self.t0 = time.monotonic()
        self.wall0 = time.time()

    def _spawn(self, name: str, env: dict[str, str]) -> DaemonProcess:
        proc = DaemonProcess(env)
        proc.log_path = self.workdir / f"daemon-{name}-{len(self.injections)}.log"
        return proc.start()

    def _stop_daemons(self) -> None:
        for proc in self.daemons.values():
            with contextlib.suppress(Exception):
                proc.stop(30)

    async def _seed(self) -> None:
        admin = await asyncpg.connect(self.postgres.url)
        await admin.execute("CREATE DATABASE soak")
        await admin.close()
        self.database_url = self.postgres.url.rsplit("/", 1)[0] + "/soak"
        conn = await connect(self.database_url)
        try:
            await migrate(conn)
            users, watches, profiles = [], [], []
            for i, class_nbr in enumerate(self.class_nbrs):
                watchers = [f"u{class_nbr}@example.edu"]
                if i % 10 == 3:
                    watchers.append(f"v{class_nbr}@example.edu")
                for email in watchers:
                    user = uuid.uuid4()
                    users.append((user, email))
                    watches.append((user, class_nbr))
                if i % 7 == 5:
                    user = uuid.uuid4()
                    email = f"x{class_nbr}@example.edu"
                    users.append((user, email))
                    watches.append((user, class_nbr))
                    flags = INELIGIBLE_FLAGS[i % len(INELIGIBLE_FLAGS)]
                    profiles.append((user, *(flags.get(k, d) for k, d in _PROFILE_DEFAULTS)))
                    self.ineligible.add(email)
            await conn.executemany("INSERT INTO auth.users (id, email) VALUES ($1, $2)", users)
            await conn.executemany(
                "INSERT INTO user_profiles (user_id, notifications_enabled, email_bounced, spam_complained, "
                "is_disabled) VALUES ($1, $2, $3, $4, $5)",
                profiles,
            )
            await conn.executemany(
                "INSERT INTO class_watches (user_id, term, subject, catalog_nbr, class_nbr) "
                "VALUES ($1, '2261', 'CSE', '240', $2)",
                watches,
            )
            await conn.executemany(
                "INSERT INTO class_states (term, subject, catalog_nbr, class_nbr, instructor_name, seats_available, "
                "seats_capacity) VALUES ('2261', 'CSE', '240', $1, 'Staff', 0, 40)",
                [(c,) for c in self.class_nbrs],
            )
        finally:
            await conn.close()

    # -- background: churn and samples ---------------------------------------------------------------------

    def _churner(self) -> None:
        while not self.stop_threads.wait(self.churn_every_s):
            if not self.calm:
                self.scraper.churn(self.churn_fraction)

    calm = False

    def _sampler(self) -> None:
        client = redis.Redis.from_url(self.redis.url, socket_timeout=5)
        while True:
            self._sample(client)
            if self.stop_threads.wait(self.sample_every_s):
                break
        self._sample(client)
        client.close()

    def _sample(self, client: redis.Redis) -> None:
        rss, fds = {}, {}
        for name, proc in self.daemons.items():
            if proc.process is None or proc.process.poll() is not None:
                continue
            with contextlib.suppress(psutil.Error):
                info = psutil.Process(proc.process.pid)
                rss[name] = info.memory_info().rss / 2**20
                fds[name] = info.num_fds()
            with contextlib.suppress(httpx.HTTPError):
                text = httpx.get(f"http://{proc.env['SEATWATCH_HEALTH_LISTEN']}/metrics", timeout=5).text
                self.counters[(name, proc.process.pid)] = parse_metrics(text)
        used: float | None = None
        with contextlib.suppress(redis.RedisError, OSError):
            used = int(client.info("memory")["used_memory"]) / 2**20
        self.samples.append(Sample(time.monotonic() - self.t0, rss, fds, used))

    # -- health ----------------------------------------------------------------------------------------------

    def _health(self, name: str) -> tuple[int, dict[str, Any]]:
        proc = self.daemons[name]
        try:
            response = httpx.get(proc.health_url, timeout=3)
            return response.status_code, response.json()
        except (httpx.HTTPError, ValueError):
            return 0, {}

    def _wait(self, check: Any, since: float, timeout_s: float = 240) -> float | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return time.monotonic() - since
            time.sleep(0.25)
        return None

    def _stores_ok(self) -> bool:
        for name in self.daemons:
            code, body = self._health(name)
            checks = body.get("checks", {})
            if code == 0 or any(checks.get(k, {}).get("status") != "healthy" for k in ("redis", "database")):
                return False
        return True

    def _checked(self) -> dict[str, float]:
        """Sections checked so far by each running daemon process (its /metrics)."""
        counts = {}
        for name, proc in self.daemons.items():
            with contextlib.suppress(httpx.HTTPError):
                text = httpx.get(f"http://{proc.env['SEATWATCH_HEALTH_LISTEN']}/metrics", timeout=3).text
                counts[name] = sum(parse_metrics(text).get("seatwatch_sections_checked_total", {}).values())
        return counts

    def _working_again(self, before: dict[str, float]) -> Any:
        """Both daemons see Redis and Postgres healthy and each has checked a section since ``before``."""

        def check() -> bool:
            if not self.wait_for_work:
                return self._stores_ok()
            now = self._checked()
            return self._stores_ok() and all(now.get(n, -1) > before.get(n, -1) for n in self.daemons)

        return check

    def _breaker_closed_and_drained(self) -> bool:
        for name in self.daemons:
            _code, body = self._health(name)
            checks = body.get("checks", {})
            if checks.get("circuit_breaker", {}).get("state") != "CLOSED":
                return False
            queue = checks.get("queue", {})
            if queue.get("delayed", 1) or queue.get("pending", 1) > 8:
                return False
        return True

    def _owed_before_sent(self, cutoff_wall: float) -> bool:
        async def query() -> int:
            conn = await asyncpg.connect(self.database_url)
            try:
                return int(
                    await conn.fetchval(
                        "SELECT count(*) FROM seatwatch_outbox "
                        "WHERE status <> 'sent' AND created_at <= to_timestamp($1)",
                        cutoff_wall,
                    )
                )
            finally:
                await conn.close()

        try:
            return asyncio.run(query()) == 0
        except (OSError, asyncpg.PostgresError):
            return False

    # -- faults ----------------------------------------------------------------------------------------------

    def inject(self, fault: str) -> Injection:
        at = time.monotonic()
        wall_at = time.time()
        self.log(f"[{at - self.t0:7.1f}s] inject {fault}")
        injection = Injection(fault, at - self.t0, at - self.t0)
        before = self._checked()
        if fault in ("scraper_errors", "scraper_latency"):
            self.scraper.mode = "errors" if fault == "scraper_errors" else "latency"
            time.sleep(self.fault_window_s)
            self.scraper.mode = ""
            end = time.monotonic()
            recovered = self._wait(self._breaker_closed_and_drained, end)
        elif fault.startswith("resend_"):
            self.resend.mode = {"resend_429": "429", "resend_500": "500", "resend_lost_reply": "lost"}[fault]
            time.sleep(self.fault_window_s)
            self.resend.mode = ""
            end, wall_end = time.monotonic(), time.time()
            recovered = self._wait(lambda: self._owed_before_sent(wall_end), end, timeout_s=900)
        elif fault == "redis_restart":
            self.redis.restart_empty()
            end = time.monotonic()
            recovered = self._wait(self._working_again(before), at)
        elif fault == "postgres_restart":
            self.postgres.restart("immediate" if self.postgres.restarts % 2 else "fast")
            end = time.monotonic()
            recovered = self._wait(self._working_again(before), at)
        elif fault == "pgbouncer_restart":
            self.bouncer.restart()
            end = time.monotonic()
            recovered = self._wait(self._working_again(before), at)
        elif fault == "daemon_sigkill":
            victim = self.daemons["b"]
            victim.kill()
            time.sleep(2)  # systemd's RestartSec
            self.daemons["b"] = self._spawn("b", victim.env)
            end = time.monotonic()

            before["b"] = 0.0  # a new process counts from zero
            recovered = self._wait(self._working_again(before), at)
        else:
            raise ValueError(fault)
        injection.ended = end - self.t0
        injection.recovered_s = recovered
        injection.wall = (wall_at, wall_at + (end - at))
        shown = "never" if recovered is None else f"{recovered:.1f}s"
        self.log(f"[{time.monotonic() - self.t0:7.1f}s]   recovered in {shown}")
        return injection

    def _aligned_due(self, fault: str, i: int) -> float:
        """One fault a minute, placed where it hurts: scraper and Resend faults open just before a tick (so the
        tick's scrapes and emails meet them), restarts and the kill land two to six seconds into a tick's work."""
        minute = int((self.wall0 + self.first_fault_s) // 60) + i
        offset = -3.0 if fault.startswith(("scraper_", "resend_")) else 2.0 + (i % 5)
        return self.t0 + (minute * 60 + 60 + offset - self.wall0)

    def schedule(self) -> list[str]:
        duration_s = self.minutes * 60
        every_s = 60.0 if self.aligned else self.fault_every_s
        slots = int(max(0, duration_s - self.calm_s - self.first_fault_s) // every_s) + 1
        order: list[str] = []
        while len(order) < slots:
            batch = list(self.faults)
            self.rng.shuffle(batch)
            order += batch
        return order[:slots]

    # -- run -------------------------------------------------------------------------------------------------

    def run(self) -> Report:
        try:
            self.start()
            threads = [threading.Thread(target=f, daemon=True) for f in (self._churner, self._sampler)]
            for thread in threads:
                thread.start()
            duration_s = self.minutes * 60
            plan = self.schedule()
            self.log(f"soak: {self.sections} sections, {self.minutes} min, faults: {', '.join(plan)}")
            for i, fault in enumerate(plan):
                due = self.t0 + self.first_fault_s + i * self.fault_every_s
                if self.aligned:
                    due = self._aligned_due(fault, i)
                if due > self.t0 + duration_s - self.calm_s:
                    break
                time.sleep(max(0.0, due - time.monotonic()))
                self.injections.append(self.inject(fault))
            self.calm = True
            time.sleep(max(0.0, self.t0 + duration_s - time.monotonic()))
            self.log(f"[{time.monotonic() - self.t0:7.1f}s] end of the soak; draining")
            drained = self._wait(self._drained, time.monotonic(), timeout_s=300)
            self.stop_threads.set()
            for thread in threads:
                thread.join(30)
            report = self.report(drained)
        finally:
            self.stop_threads.set()
            self.stack.close()
        return report

    def _drained(self) -> bool:
        async def query() -> int:
            conn = await asyncpg.connect(self.database_url)
            try:
                return int(await conn.fetchval("SELECT count(*) FROM seatwatch_outbox WHERE status <> 'sent'"))
            finally:
                await conn.close()

        try:
            unsent = asyncio.run(query())
        except (OSError, asyncpg.PostgresError):
            return False
        return unsent == 0 and self._breaker_closed_and_drained()

    # -- the report --------------------------------------------------------------------------------------------

    def report(self, drained_s: float | None) -> Report:
        async def rows() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(self.database_url)
            try:
                return list(
                    await conn.fetch(
                        "SELECT o.id, o.payload, o.status, extract(epoch FROM o.created_at) AS created, u.email "
                        "FROM seatwatch_outbox o JOIN auth.users u ON u.id = o.user_id ORDER BY o.id"
                    )
                )
            finally:
                await conn.close()

        owed_rows = asyncio.run(rows())
        with self.resend.lock:
            delivered = collections.Counter(_canonical(d.message) for d in self.resend.deliveries)
            delivered_to = [addr for d in self.resend.deliveries for addr in d.message["to"]]
        owed_keys = collections.Counter(_canonical(orjson.loads(r["payload"])) for r in owed_rows)
        per_row = [(r, delivered.get(_canonical(orjson.loads(r["payload"])), 0)) for r in owed_rows]
        lost = sum(1 for _, n in per_row if n == 0)
        duplicated = sum(n - 1 for _, n in per_row if n > 1)
        unowed = sum(n for key, n in delivered.items() if key not in owed_keys)
        to_ineligible = sum(1 for addr in delivered_to if addr in self.ineligible)
        ledger = {
            "owed": len(owed_rows),
            "delivered": sum(1 for _, n in per_row if n > 0),
            "lost": lost,
            "duplicated": duplicated,
            "unowed": unowed,
            "to_ineligible": to_ineligible + sum(1 for r in owed_rows if r["email"] in self.ineligible),
            "failed_rows": sum(1 for r in owed_rows if r["status"] == "failed"),
            "sections_checked": 0,
        }

        # Emails owed while a fault was on (from injection to a minute after it ended, or to the next fault)
        # count against it.
        walls = sorted((inj.wall[0], inj.wall[1], inj.fault) for inj in self.injections)
        windows = [
            (fault, start, min(end + 60, walls[i + 1][0] if i + 1 < len(walls) else float("inf")))
            for i, (start, end, fault) in enumerate(walls)
        ]
        by_fault: dict[str, dict[str, Any]] = {
            f: {"fault": f, "injected": 0, "owed": 0, "delivered": 0, "lost": 0, "duplicated": 0, "recovery": []}
            for f in self.faults
        }
        by_fault["none"] = {"fault": "(no fault active)", "injected": 0, "owed": 0, "delivered": 0, "lost": 0,
                            "duplicated": 0, "recovery": []}  # fmt: skip
        for inj in self.injections:
            by_fault[inj.fault]["injected"] += 1
            by_fault[inj.fault]["recovery"].append(inj.recovered_s)
        for row, n in per_row:
            name = next((f for f, start, end in windows if start <= row["created"] < end), "none")
            entry = by_fault[name]
            entry["owed"] += 1
            entry["delivered"] += 1 if n else 0
            entry["lost"] += 0 if n else 1
            entry["duplicated"] += max(0, n - 1)

        # Steady state: the daemon that ran throughout (a), minute 5 against the last minute sampled.
        def at(t_s: float, what: str) -> float | None:
            usable = [s for s in self.samples if "a" in getattr(s, what)]
            if not usable:
                return None
            return float(min(usable, key=lambda s: abs(s.t_s - t_s)).__getattribute__(what)["a"])

        end_s = self.minutes * 60
        late_s = min(1200.0, end_s)  # minute 20 (or the end of a shorter run)
        rss5, rss_end = at(300, "rss_mb"), at(late_s, "rss_mb")
        fds5, fds_end = at(300, "fds"), at(late_s, "fds")
        redis_mb = [s.redis_used_mb for s in self.samples if s.redis_used_mb is not None]
        commands: collections.Counter[str] = collections.Counter()
        checked = 0.0
        for found in self.counters.values():
            commands.update({k: int(v) for k, v in found.get("seatwatch_redis_commands", {}).items()})
            checked += sum(found.get("seatwatch_sections_checked_total", {}).values())
        ledger["sections_checked"] = int(checked)
        per_section = (commands["queue"] + commands["breaker"]) / checked if checked else None
        steady = {
            "rss_mb_minute_5": rss5,
            "rss_mb_end": rss_end,
            "late_minute": late_s / 60,
            "rss_change_pct": (rss_end - rss5) / rss5 * 100 if rss5 and rss_end else None,
            "fds_minute_5": fds5,
            "fds_end": fds_end,
            "redis_used_mb_max": max(redis_mb) if redis_mb else None,
            "redis_used_mb_end": redis_mb[-1] if redis_mb else None,
            "redis_commands": dict(commands),
            "redis_commands_per_section": per_section,
            "scrapes_served": self.scraper.served,
            "resend_answers": dict(self.resend.answered),
            "drained_s": drained_s,
        }
        problems = []
        for key in ("lost", "duplicated", "unowed", "to_ineligible", "failed_rows"):
            if ledger[key]:
                problems.append(f"{key}: {ledger[key]}")
        if drained_s is None:
            problems.append("did not drain within 300 s after the soak")
        if any(inj.recovered_s is None for inj in self.injections):
            problems.append("a fault did not recover within its timeout")
        return Report(
            config={
                "minutes": self.minutes,
                "sections": self.sections,
                "schedule": "one fault a minute aligned to ticks"
                if self.aligned
                else f"a fault every {self.fault_every_s:.0f} s",
                "fault_window_s": self.fault_window_s,
                "seed": self.seed,
                "wait_for_work": self.wait_for_work,
            },
            injections=self.injections,
            samples=self.samples,
            ledger=ledger,
            by_fault=[by_fault[f] for f in (*self.faults, "none")],
            steady=steady,
            problems=problems,
        )


_PROFILE_DEFAULTS = (
    ("notifications_enabled", True),
    ("email_bounced", False),
    ("spam_complained", False),
    ("is_disabled", False),
)


def render(report: Report) -> str:
    lines = []
    led = report.ledger
    lines.append(
        f"soak: {report.config['sections']} sections, {report.config['minutes']} min, two daemons, ticks every "
        f"minute, {report.config['schedule']} (fault windows {report.config['fault_window_s']} s), "
        f"seed {report.config['seed']}"
    )
    lines.append("")
    lines.append("| fault | injected | emails owed | delivered | lost | duplicated | recovery s (median / max) |")
    lines.append("|---|---|---|---|---|---|---|")
    for entry in report.by_fault:
        rec = [r for r in entry["recovery"] if r is not None]
        missing = len(entry["recovery"]) - len(rec)
        text = f"{statistics.median(rec):.1f} / {max(rec):.1f}" if rec else "-"
        if missing:
            text += f" ({missing} not recovered)"
        lines.append(
            f"| {entry['fault']} | {entry['injected']} | {entry['owed']} | {entry['delivered']} | {entry['lost']} | "
            f"{entry['duplicated']} | {text} |"
        )
    lines.append(
        f"| **total** | {len(report.injections)} | {led['owed']} | {led['delivered']} | {led['lost']} | "
        f"{led['duplicated']} | |"
    )
    lines.append("")
    lines.append(
        f"ledger: {led['owed']} owed, {led['delivered']} delivered, {led['lost']} lost, "
        f"{led['duplicated']} duplicated, "
        f"{led['unowed']} delivered but never owed, {led['to_ineligible']} to ineligible users, "
        f"{led['failed_rows']} rows failed; {led['sections_checked']} section checks"
    )
    st = report.steady

    def num(value: Any, fmt: str = ".1f") -> str:
        return "-" if value is None else format(value, fmt)

    lines.append(
        f"daemon a (never killed): RSS {num(st['rss_mb_minute_5'])} MB at minute 5, {num(st['rss_mb_end'])} MB at "
        f"minute {st['late_minute']:.0f} ({num(st['rss_change_pct'], '+.1f')}%); open fds {st['fds_minute_5']} -> "
        f"{st['fds_end']}"
    )
    lines.append(
        f"redis used_memory: max {num(st['redis_used_mb_max'], '.2f')} MB, end {num(st['redis_used_mb_end'], '.2f')} MB"
    )
    lines.append(
        f"redis commands (daemons' own counters, last sample of each process): {st['redis_commands']}; "
        f"queue+breaker per section checked: {num(st['redis_commands_per_section'], '.3f')}"
    )
    lines.append(
        f"scrapes served {st['scrapes_served']}; Resend answers by status (0 = dropped) {st['resend_answers']}; "
        f"drained {num(st['drained_s'])} s after the end"
    )
    lines.append(
        "recovery: scraper faults, from the window's end until both breakers are CLOSED with nothing delayed; "
        "Resend faults, from the window's end until every email owed before it is sent; restarts and the kill, "
        "from the injection until both daemons see Redis and Postgres healthy"
        + (
            " and each has checked a section since (the next tick when the queue was lost)"
            if report.config.get("wait_for_work")
            else ""
        )
    )
    lines.append("verdict: " + ("PASS" if report.ok else "FAIL: " + "; ".join(report.problems)))
    return "\n".join(lines)
