"""``seatwatch demo``: the whole pipeline on one machine with nothing configured.

Without ``REDIS_URL``/``DATABASE_URL`` it starts embedded Redis and PostgreSQL servers (the ``embedded``
extra); with them, it uses a database ``seatwatch_demo`` of its own on that server and Redis keys under
``seatwatch-demo:``, never the configured database itself. It migrates, seeds a handful of watches (and the
legacy ``class_states`` rows the web app would have written, so the first tick already notifies), runs a
simulated scraper on loopback whose seats open and fill as the minutes pass, writes emails as .eml files,
serves the health endpoint and ticks every minute.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import orjson

from daemon.commands import embedded
from daemon.errors import EmbeddedUnavailable
from daemon.settings import logs
from daemon.settings.config import Settings
from daemon.store import seed as seed_rows
from daemon.store.migrations import migrate
from daemon.store.pool import connect

if TYPE_CHECKING:
    from collections.abc import Iterator

logger = logging.getLogger("daemon.commands.demo")

TERM = "2261"
DEMO_TOKEN = "demo-scraper-token"  # noqa: S105 - a loopback-only demo value, not a secret

# class_nbr -> (subject, catalog_nbr, title, capacity, seat pattern by minute, instructor pattern by minute)
SECTIONS: dict[str, tuple[str, str, str, int, list[int], list[str]]] = {
    "12340": ("CSE", "240", "Introduction to Programming Languages", 120, [0, 3, 3, 0], ["Staff"]),
    "12341": ("MAT", "343", "Applied Linear Algebra", 40, [5], ["Staff", "Ada Lovelace"]),
    "12342": ("PHY", "121", "University Physics I: Mechanics", 200, [0, 0, 1], ["Grace Hopper"]),
    "12343": ("ENG", "101", 'First-Year Composition <Honors & "Writing">', 25, [2, 0], ["Staff"]),
}

USERS = [
    ("00000000-0000-4000-8000-000000000001", "ada@example.edu", True),
    ("00000000-0000-4000-8000-000000000002", "grace@example.edu", True),
    ("00000000-0000-4000-8000-000000000003", "alan@example.edu", True),
    ("00000000-0000-4000-8000-000000000004", "muted@example.edu", False),  # notifications off: gets nothing
]


def simulated(class_nbr: str, now: float) -> dict[str, Any] | None:
    """The section as the simulated catalog shows it this minute."""
    if class_nbr not in SECTIONS:
        return None
    subject, catalog, title, capacity, seats, instructors = SECTIONS[class_nbr]
    minute = int(now // 60)
    open_seats = seats[minute % len(seats)]
    return {
        "subject": subject,
        "catalog_nbr": catalog,
        "title": title,
        "instructor": instructors[min(minute % 3, len(instructors) - 1)],
        "seats_available": open_seats,
        "seats_capacity": capacity,
        "non_reserved_seats": open_seats if class_nbr != "12343" else None,
        "location": "Tempe - COOR 170",
        "meeting_times": "MWF 9:05AM-9:55AM",
    }


class _ScraperHandler(BaseHTTPRequestHandler):
    counts: ClassVar[dict[str, int]] = {}

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {DEMO_TOKEN}":
            self._send(401, {"error": "unauthorized"})
            return
        if self.path != "/scrape":
            self._send(404, {"error": "not found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = orjson.loads(self.rfile.read(length))
            section, term = str(body["sectionNumber"]), str(body["term"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self._send(400, {"success": False, "error": "sectionNumber and term are required"})
            return
        data = simulated(section, time.time()) if term == TERM else None
        if data is None:
            self._send(500, {"success": False, "error": f"Section {section} not found for term {term}"})
            return
        self._send(200, {"success": True, "data": data})

    def _send(self, status: int, body: dict[str, Any]) -> None:
        payload = orjson.dumps(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        return


@contextlib.contextmanager
def simulated_scraper() -> Iterator[str]:
    """A loopback HTTP server speaking the scraper's wire format; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ScraperHandler)
    thread = threading.Thread(target=server.serve_forever, name="demo-scraper", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def seed(database_url: str) -> None:
    """Users, profiles, watches, and legacy class_states rows (full, Staff) as the web app writes them."""
    conn = await connect(database_url)
    try:
        await migrate(conn)
        async with conn.transaction():
            for user_id, email, enabled in USERS:
                await seed_rows.add_user(conn, user_id, email, notifications_enabled=enabled)
            for class_nbr, (subject, catalog, title, capacity, _, _) in SECTIONS.items():
                for user_id, _, _ in USERS:
                    await seed_rows.add_watch(conn, user_id, TERM, subject, catalog, class_nbr)
                await seed_rows.add_full_legacy_state(conn, TERM, subject, catalog, class_nbr, title, capacity)
    finally:
        await conn.close()


async def demo_database(database_url: str) -> str:
    """``seatwatch_demo`` on the server of ``database_url``, created if missing; its URL."""
    parts = urlsplit(database_url)
    demo_url = urlunsplit((parts.scheme, parts.netloc, "/seatwatch_demo", parts.query, parts.fragment))
    conn = await connect(database_url)
    try:
        await seed_rows.ensure_database(conn, "seatwatch_demo")
    finally:
        await conn.close()
    return demo_url


def _port(preferred: int) -> int:
    if preferred == 0:
        return embedded.free_port()
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            return embedded.free_port()
    return preferred


def run_demo(*, dir_: str, port: int, duration_s: float | None, env: dict[str, str]) -> int:
    """``seatwatch demo``: the whole pipeline on this machine, embedded servers and a simulated scraper."""
    folder = Path(dir_).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)  # noqa: S103 - pgserver runs postgres as its own user when we are root
    outbox = folder / "outbox"
    logs.configure(fmt="text", level="info")
    with contextlib.ExitStack() as stack:
        redis_url, database_url = env.get("REDIS_URL"), env.get("DATABASE_URL")
        where = "REDIS_URL (keys under seatwatch-demo:) and a database seatwatch_demo beside DATABASE_URL's"
        if redis_url and database_url:
            # Never the configured database itself: the demo seeds fake students and would send (to files)
            # the real outbox. It works in a database of its own on the same server.
            try:
                database_url = anyio.run(demo_database, database_url)
            except Exception as exc:
                print(
                    f"seatwatch demo: cannot create a demo database beside DATABASE_URL ({exc}); "
                    "unset REDIS_URL and DATABASE_URL to use embedded servers"
                )
                return 1
        else:
            try:
                redis_url, database_url = stack.enter_context(embedded.servers(folder / "servers"))
            except EmbeddedUnavailable as exc:
                print(f"seatwatch demo: {exc}")
                return 1
            where = f"embedded Redis and PostgreSQL under {folder / 'servers'}"
        scraper_url = stack.enter_context(simulated_scraper())
        anyio.run(seed, database_url)
        health_port = _port(port)
        settings = Settings.from_env(
            {
                "DATABASE_URL": database_url,
                "REDIS_URL": redis_url,
                "SCRAPER_URL": scraper_url,
                "SCRAPER_SECRET_TOKEN": DEMO_TOKEN,
                "SEATWATCH_EMAIL_TRANSPORT": "file",
                "SEATWATCH_OUTBOX_DIR": str(outbox),
                "SUPABASE_SERVICE_ROLE_KEY": "demo-signing-key",
                "NEXT_PUBLIC_SITE_URL": "http://localhost:3000",
                "SEATWATCH_CRON": "* * * * *",
                "SEATWATCH_TIMEZONE": "UTC",
                "SEATWATCH_STAGGER": "none",
                "SEATWATCH_LOCK_TTL_S": "50",
                "SEATWATCH_MISFIRE_GRACE_S": "55",
                "SEATWATCH_SCRAPER_TIMEOUT_S": "10",
                "SEATWATCH_HEALTH_LISTEN": f"127.0.0.1:{health_port}",
                "SEATWATCH_REDIS_PREFIX": "seatwatch-demo",
                "SEATWATCH_CONSUMER": "demo",
            }
        )
        print(
            "\n".join(
                [
                    "seatwatch demo",
                    f"  health   http://127.0.0.1:{health_port}/api/monitoring/health",
                    f"  metrics  http://127.0.0.1:{health_port}/metrics",
                    f"  outbox   {outbox}  (one .eml file per email sent)",
                    f"  servers  {where}",
                    f"  sections {', '.join(sorted(SECTIONS))} (term {TERM}), watched by {len(USERS)} students",
                    "  ticks    every minute; seats open and fill as the minutes pass",
                    "  stop     Ctrl-C",
                    "",
                ]
            ),
            flush=True,
        )
        return anyio.run(_run_daemon, settings, duration_s)
    return 0


async def _run_daemon(settings: Settings, duration_s: float | None) -> int:
    from daemon.runtime.supervisor import Daemon

    daemon = Daemon(settings)
    result = 0

    async def main() -> None:
        nonlocal result
        result = await daemon.run()

    async with anyio.create_task_group() as tg:
        tg.start_soon(main)
        if duration_s is not None:
            await anyio.sleep(duration_s)
            daemon.stop()
    return result
