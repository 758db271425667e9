"""The health endpoint of a real ``seatwatch run`` process (SPEC §9): the documented JSON without secrets, no
Redis commands spent on probes, and a listener that malformed clients cannot disturb while a tick's work runs.
"""

from __future__ import annotations

import collections
import contextlib
import re
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

import anyio
import asyncpg
import httpx
import pytest
import redis as redis_sync
from prometheus_client.parser import text_string_to_metric_families

from daemon.commands.embedded import RedisServer, free_port
from daemon.primitives.clients import FREE_COMMANDS
from daemon.store.pool import create_pool
from tests.conftest import delete_prefix
from tests.support.procs import SIGNING_KEY, DaemonProcess, Daemons, NotifySocket, daemon_env, run_cli
from tests.support.seed import owed_emails
from tests.support.stubs import RESEND_KEY, SCRAPER_TOKEN, Reply, ScraperStub, section_data

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from pathlib import Path

    from anyio.abc import SocketStream

DB_PASSWORD = "pw-in-the-dsn-7e3d9c"
# Once a year: no cron tick fires during a test, so the lock, the queue and the scrape counts are the test's.
CRON = "0 0 1 1 *"
TERM = "2261"

CHECK_KEYS: dict[str, set[str]] = {
    "database": set(),
    "redis": set(),
    "circuit_breaker": {"state", "failure_count", "success_count", "last_failure", "last_state_change"},
    "cron_lock": {"locked", "lock_holder", "time_held_ms", "lock_acquired_at", "expires_at"},
    "queue": {"waiting", "pending", "dead_letters"},
    "scheduler": {"schedule", "timezone", "last_tick", "next_tick"},
    "outbox": {"pending", "failed"},
    "email": {"configured"},
    "configuration": set(),
}


def with_password(url: str) -> tuple[str, str]:
    """(a DSN with a password in it, that password): the given one kept as it is (a server that asks for it, as
    Debian's does by default), else a made-up one (the local server trusts loopback, so it still connects)."""
    parts = urlsplit(url)
    if parts.password:
        return url, unquote(parts.password)
    host = f"{parts.hostname}:{parts.port or 5432}" if parts.hostname else ""  # "" with a Unix socket in ?host=
    netloc = f"{parts.username or 'postgres'}:{DB_PASSWORD}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), DB_PASSWORD


@pytest.fixture
def start_daemon(daemons: Daemons) -> Iterator[Callable[[dict[str, str]], DaemonProcess]]:
    """Starts daemons that are healthy; SIGTERMs them (and checks they exit 0) at teardown."""
    yield lambda env: daemons.start(env, healthy=True)
    for daemon in daemons.started:
        assert daemon.stop() == 0, daemon.logs()


@pytest.fixture
async def clean_prefix(redis_url: str, prefix: str) -> AsyncIterator[str]:
    yield prefix
    await delete_prefix(redis_url, prefix)


def blocked_reader(url: str, timeout_s: float = 10) -> None:
    """Wait until a client of the (private) Redis at ``url`` blocks on a command: the daemon's stream reader."""
    deadline = time.monotonic() + timeout_s
    with contextlib.closing(redis_sync.Redis.from_url(url)) as client:
        while int(client.info("clients")["blocked_clients"]) < 1:
            assert time.monotonic() < deadline, "the daemon's reader never blocked on the stream"
            time.sleep(0.02)


def metric_values(text: str, name: str) -> dict[str, float]:
    return {
        ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


# -- the documented JSON ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_health_reports_every_documented_check_and_no_secret(
    redis_url: str,
    database_url: str,
    clean_prefix: str,
    scraper: ScraperStub,
    start_daemon: Callable[[dict[str, str]], DaemonProcess],
) -> None:
    """A running daemon's health has every §9 field and check key, and no secret or URL is in health or metrics."""
    dsn, password = with_password(database_url)
    env = daemon_env(
        redis_url=redis_url, database_url=dsn, prefix=clean_prefix, scraper_url=scraper.url, SEATWATCH_CRON=CRON
    )
    daemon = start_daemon(env)

    response = httpx.get(daemon.health_url, timeout=5)
    assert response.status_code == 200
    body = response.json()
    assert set(body) >= {"timestamp", "status", "checks", "response_time_ms"}
    assert body["status"] == "healthy"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", body["timestamp"])
    assert 0 <= body["response_time_ms"] < 100
    checks = body["checks"]
    for name, keys in CHECK_KEYS.items():
        assert name in checks, f"no {name} check: {sorted(checks)}"
        assert checks[name]["status"] in {"healthy", "degraded", "unhealthy"}
        missing = keys - set(checks[name])
        assert not missing, f"{name} lacks {missing}: {checks[name]}"
    assert checks["database"]["status"] == "healthy"
    assert checks["redis"]["status"] == "healthy"
    assert checks["circuit_breaker"]["state"] == "CLOSED"
    assert checks["cron_lock"]["locked"] is False
    assert checks["scheduler"]["schedule"] == CRON
    assert checks["scheduler"]["timezone"] == "America/Phoenix"
    assert checks["scheduler"]["next_tick"] is not None
    assert checks["email"]["configured"] is True
    assert checks["queue"]["dead_letters"] == 0
    assert checks["outbox"]["pending"] == 0

    alias = httpx.get(daemon.health_url.replace("/api/monitoring/health", "/health"), timeout=5)
    assert alias.status_code == 200
    assert set(alias.json()["checks"]) == set(checks)
    metrics = httpx.get(daemon.health_url.replace("/api/monitoring/health", "/metrics"), timeout=5)
    assert metrics.status_code == 200

    secrets = {
        "SCRAPER_SECRET_TOKEN": SCRAPER_TOKEN,
        "RESEND_API_KEY": RESEND_KEY,
        "SUPABASE_SERVICE_ROLE_KEY": SIGNING_KEY,
        "the database password": password,
        "DATABASE_URL": dsn,
        "DATABASE_URL without password": database_url,
        "REDIS_URL": redis_url,
    }
    for what, value in secrets.items():
        for where, text in (("health", response.text), ("alias", alias.text), ("metrics", metrics.text)):
            assert value not in text, f"{what} appears in {where}"


def test_port_in_use_stops_start_with_a_clear_message(
    redis_url: str, database_url: str, clean_prefix: str, scraper: ScraperStub, daemons: Daemons
) -> None:
    """A daemon whose health port is taken exits 1 at once, logging which address it cannot bind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = daemon_env(
            redis_url=redis_url,
            database_url=database_url,
            prefix=clean_prefix,
            scraper_url=scraper.url,
            health_port=port,
        )
        daemon = daemons.start(env)
        code = daemon.wait(20)
    assert code == 1, daemon.logs()
    assert f"cannot start: health listener cannot bind 127.0.0.1:{port}" in daemon.logs()


# -- probes cost no Redis commands ------------------------------------------------------------------------------


class Monitor:
    """``MONITOR`` on a raw connection: every top-level command the server runs, with the client's address."""

    LINE = re.compile(r'^\+[\d.]+ \[\d+ (?P<client>[^\]]+)\] "(?P<command>[^"]+)"')

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(b"MONITOR\r\n")
        self.buffer = b""
        assert self._read_line(5) == "+OK"
        self.commands: list[tuple[str, str]] = []

    def _read_line(self, timeout_s: float) -> str | None:
        self.sock.settimeout(timeout_s)
        while b"\r\n" not in self.buffer:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line.decode(errors="replace")

    def drain(self, timeout_s: float = 0.3) -> list[tuple[str, str]]:
        """Commands seen so far (client, COMMAND), waiting ``timeout_s`` for stragglers."""
        while (line := self._read_line(timeout_s)) is not None:
            match = self.LINE.match(line)
            if match and match["client"] != "lua":  # commands a script runs are not top-level
                self.commands.append((match["client"], match["command"].upper()))
        return self.commands

    def close(self) -> None:
        self.sock.close()


@pytest.mark.slow
def test_health_probes_cost_no_redis_commands(
    tmp_path: Path,
    database_url: str,
    prefix: str,
    scraper: ScraperStub,
    start_daemon: Callable[[dict[str, str]], DaemonProcess],
) -> None:
    """200 health probes and 20 metrics scrapes send no billable command to Redis: only the daemon's own PINGs."""
    redis = RedisServer(tmp_path / "redis").start()
    try:
        env = daemon_env(
            redis_url=redis.url, database_url=database_url, prefix=prefix, scraper_url=scraper.url, SEATWATCH_CRON=CRON
        )
        daemon = start_daemon(env)
        metrics_url = daemon.health_url.replace("/api/monitoring/health", "/metrics")
        # Start-up traffic (group creation, resume, the first cycle) is over once the reader blocks on the stream.
        blocked_reader(redis.url)
        monitor = Monitor(redis.port)
        try:
            with httpx.Client(timeout=5) as client:
                before = metric_values(client.get(metrics_url).text, "seatwatch_redis_commands")
                # Spaced out, as probes are: back-to-back requests would race the listener's close of a
                # connection after its 100th request (see test_health_listener), which is not what this pins.
                for i in range(220):
                    url = metrics_url if i % 11 == 10 else daemon.health_url
                    assert client.get(url).status_code == 200
                    time.sleep(0.025)
                after = metric_values(client.get(metrics_url).text, "seatwatch_redis_commands")
            seen = monitor.drain()
            deadline = time.monotonic() + 6
            while not any(cmd == "PING" for _, cmd in seen) and time.monotonic() < deadline:
                seen = monitor.drain(0.5)
        finally:
            monitor.close()
        # The window saw the daemon's own liveness PING, so MONITOR does show the daemon's traffic ...
        assert any(cmd == "PING" for _, cmd in seen), f"MONITOR saw no daemon PING in the window: {seen}"
        # ... and nothing billable: health and metrics are served from what the daemon last saw.
        billable = collections.Counter(cmd for _, cmd in seen if cmd not in FREE_COMMANDS)
        assert not billable, f"billable Redis commands during health probes: {billable}"
        assert after == before, "the daemon's own command count moved during the probes"
    finally:
        redis.stop()


# -- malformed clients while a tick's work runs -------------------------------------------------------------------


async def insert_watches(dsn: str, class_nbrs: list[str]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            for class_nbr in class_nbrs:
                user_id = uuid.uuid4()
                await conn.execute(
                    "INSERT INTO auth.users (id, email) VALUES ($1, $2)", user_id, f"u{class_nbr}@x.test"
                )
                await conn.execute(
                    "INSERT INTO class_watches (user_id, term, subject, catalog_nbr, class_nbr) "
                    "VALUES ($1, $2, 'CSE', '240', $3)",
                    user_id,
                    TERM,
                    class_nbr,
                )
    finally:
        await conn.close()


async def processed(dsn: str, class_nbrs: list[str]) -> tuple[int, int]:
    """(seatwatch_section_states rows, class_states rows) for these sections."""
    conn = await asyncpg.connect(dsn)
    try:
        own = await conn.fetchval(
            "SELECT count(*) FROM seatwatch_section_states WHERE term = $1 AND class_nbr = ANY($2)", TERM, class_nbrs
        )
        mirror = await conn.fetchval(
            "SELECT count(*) FROM class_states WHERE term = $1 AND class_nbr = ANY($2)", TERM, class_nbrs
        )
    finally:
        await conn.close()
    return int(own), int(mirror)


class Hammer:
    """Malformed, oversized, slow, wrong-method and flooding clients against one port until cancelled."""

    GARBAGE = (
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(200)),
        b"NOT HTTP\r\n\r\n",
        b"GET /health HTTP/1.1\r\nBad Header\r\n\r\n",
        b"\x00" * 4000 + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    )

    def __init__(self, port: int) -> None:
        self.port = port
        self.done: collections.Counter[str] = collections.Counter()

    async def _connect(self) -> SocketStream:
        return await anyio.connect_tcp("127.0.0.1", self.port)

    async def _quietly(self, kind: str, attempt: Callable[[], Any]) -> None:
        while True:
            with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.EndOfStream):
                await attempt()
            self.done[kind] += 1
            await anyio.sleep(0)

    async def garbage(self) -> None:
        async def once() -> None:
            async with await self._connect() as stream:
                await stream.send(self.GARBAGE[self.done["garbage"] % len(self.GARBAGE)])
                with anyio.move_on_after(0.5):
                    await stream.receive()

        await self._quietly("garbage", once)

    async def huge_header(self) -> None:
        async def once() -> None:
            async with await self._connect() as stream:
                await stream.send(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
                with anyio.move_on_after(0.5):
                    await stream.receive()

        await self._quietly("huge_header", once)

    async def slow(self) -> None:
        async def once() -> None:
            async with await self._connect() as stream:
                for byte in b"GET /api/monitoring/health HTTP/1.1\r\nHost: t\r\n\r\n":
                    await stream.send(bytes([byte]))
                    await anyio.sleep(0.5)

        await self._quietly("slow", once)

    async def wrong_methods(self) -> None:
        async with httpx.AsyncClient(timeout=2) as client:

            async def once() -> None:
                for method in ("POST", "PUT", "DELETE", "PATCH"):
                    with contextlib.suppress(httpx.HTTPError):
                        await client.request(
                            method, f"http://127.0.0.1:{self.port}/api/monitoring/health", content=b"x"
                        )

            await self._quietly("wrong_methods", once)

    async def flood(self) -> None:
        async def once() -> None:
            streams: list[SocketStream] = []
            try:
                for _ in range(200):
                    with contextlib.suppress(OSError):
                        streams.append(await self._connect())
                await anyio.sleep(0.5)
            finally:
                with anyio.CancelScope(shield=True):  # cancelled mid-round: still close every socket
                    for stream in streams:
                        await stream.aclose()

        await self._quietly("flood", once)

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(self.garbage)
                tg.start_soon(self.slow)
            tg.start_soon(self.huge_header)
            tg.start_soon(self.wrong_methods)
            tg.start_soon(self.flood)


@pytest.mark.slow
async def test_malformed_clients_do_not_disturb_a_tick(
    redis_url: str,
    database_url: str,
    clean_prefix: str,
    scraper: ScraperStub,
    start_daemon: Callable[[dict[str, str]], DaemonProcess],
) -> None:
    """A tick's 60 sections are all processed while malformed and flooding clients hit health, which then answers."""
    class_nbrs = [str(31000 + i) for i in range(60)]
    for class_nbr in class_nbrs:
        body = {"success": True, "data": section_data(seats=3, capacity=30, instructor="Ada Lovelace")}
        scraper.script(TERM, class_nbr, Reply(200, body, delay_s=0.2))  # 60 x 0.2 s / 4 workers: ~3 s of work
    await insert_watches(database_url, class_nbrs)
    env = daemon_env(
        redis_url=redis_url,
        database_url=database_url,
        prefix=clean_prefix,
        scraper_url=scraper.url,
        SEATWATCH_CRON=CRON,
    )
    daemon = start_daemon(env)
    port = int(env["SEATWATCH_HEALTH_LISTEN"].rsplit(":", 1)[1])

    hammer = Hammer(port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(hammer.run)
        await anyio.sleep(0.5)  # the listener is under fire before the tick starts
        tick = await anyio.to_thread.run_sync(lambda: run_cli("tick", "--group", "all", env=env))
        assert tick.returncode == 0, tick.stderr
        assert "60 enqueued" in tick.stdout, tick.stdout
        counts = (0, 0)
        with anyio.move_on_after(40):
            # Until the work is done, and the daemon has cut off at least one slow client (5 s request timeout).
            while counts != (60, 60) or not hammer.done["slow"]:
                await anyio.sleep(0.25)
                counts = await processed(database_url, class_nbrs)
        daemon.assert_running()
        tg.cancel_scope.cancel()

    assert counts == (60, 60), f"sections processed under fire (own state, class_states): {counts}"
    assert all(scraper.calls(TERM, n) >= 1 for n in class_nbrs)
    for kind in ("garbage", "huge_header", "slow", "wrong_methods", "flood"):
        assert hammer.done[kind] >= 1, f"the hammer never completed a {kind} round: {hammer.done}"

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(daemon.health_url)
    assert time.perf_counter() - started < 0.5
    assert response.status_code == 200, response.text
    assert response.json()["checks"]["queue"]["dead_letters"] == 0
    daemon.assert_running()
    assert "health listener: unexpected error" not in daemon.logs()


async def _owe_one_email(database_url: str) -> None:
    pool = await create_pool(database_url, min_size=1, max_size=2)
    try:
        await owed_emails(pool, 1)
    finally:
        await pool.close()


@pytest.mark.slow
def test_a_file_transport_that_cannot_write_degrades_health_naming_the_path_and_warns_once(
    tmp_path: Path, redis_url: str, database_url: str, clean_prefix: str, scraper: ScraperStub, daemons: Daemons
) -> None:
    """An outbox folder the daemon cannot write is the `email` check's error (with its path), not a Postgres outage."""
    anyio.run(_owe_one_email, database_url)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the outbox's parent folder should be\n")
    env = daemon_env(
        redis_url=redis_url,
        database_url=database_url,
        prefix=clean_prefix,
        scraper_url=scraper.url,
        SEATWATCH_CRON=CRON,
        SEATWATCH_EMAIL_TRANSPORT="file",
        SEATWATCH_OUTBOX_DIR=str(blocker / "outbox"),
    )
    daemon = daemons.start(env, healthy=False)
    try:
        deadline = time.monotonic() + 30
        while True:
            daemon.assert_running()
            with contextlib.suppress(httpx.HTTPError):
                code, body = daemon.health()
                if body["checks"]["email"].get("error"):
                    break
            assert time.monotonic() < deadline, daemon.logs()
            time.sleep(0.2)
        assert code == 503, body
        assert body["status"] == "degraded"
        assert body["checks"]["email"]["status"] == "degraded"
        assert str(blocker) in body["checks"]["email"]["error"]
        assert body["checks"]["database"]["status"] == "healthy"

        blocker.unlink()  # the operator fixes the folder: the same batch goes at its next retry
        deadline = time.monotonic() + 40
        while not list(tmp_path.glob("not-a-folder/outbox/*.eml")):
            assert time.monotonic() < deadline, daemon.logs()
            time.sleep(0.2)
        eventually_healthy = daemon.wait_healthy(15)
        assert eventually_healthy["checks"]["email"]["error"] is None
        logs = daemon.logs()
        warnings = [line for line in logs.splitlines() if line.startswith("<4>") and "transport" in line]
        assert len(warnings) == 1, logs
        assert str(blocker) in warnings[0]
        assert "Postgres unavailable" not in logs
    finally:
        assert daemon.stop() == 0, daemon.logs()


@pytest.mark.slow
def test_while_waiting_for_postgres_at_start_health_and_status_say_which_store_is_missing(
    redis_url: str, clean_prefix: str, scraper: ScraperStub, daemons: Daemons
) -> None:
    """Redis up, Postgres away at start: health has Redis healthy and Postgres unhealthy, and STATUS= says so."""
    notify = NotifySocket()
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/none"
    env = daemon_env(
        redis_url=redis_url, database_url=nowhere, prefix=clean_prefix, scraper_url=scraper.url, SEATWATCH_CRON=CRON
    )
    daemon = daemons.start(env, notify=notify)
    try:
        status = notify.wait_for("STATUS=starting: waiting for Postgres: ConnectionRefusedError (retry in 1s)", 30)
        assert "READY=1" not in status
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.HTTPError):
                code, body = daemon.health()
                if body["checks"]["redis"]["status"] == "healthy":
                    break
            assert time.monotonic() < deadline, daemon.logs()
            time.sleep(0.1)
        assert code == 500
        assert body["starting"].startswith("waiting for Postgres: ConnectionRefusedError")
        assert body["checks"]["database"]["status"] == "unhealthy"
        assert body["checks"]["database"]["error"] == "ConnectionRefusedError"
    finally:
        assert daemon.stop() == 0, daemon.logs()
        notify.close()
