"""Find real Redis and Postgres servers for the tests, as SPEC §10 says.

``TEST_REDIS_URL`` / ``TEST_DATABASE_URL`` when set; else the local default ports when something answers
there; else embedded servers started from the ``embedded`` extra. Never a skip: if none of these works the
session fails with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from daemon.commands import embedded


def _answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _redis_answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    return False


def local_postgres_url(env: dict[str, str] | os._Environ[str]) -> tuple[str, str]:
    """The local server's DSN from the usual PG variables (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE),
    defaults 127.0.0.1:5432, postgres, no password, postgres; and which variables were used. A password is
    kept as given (Debian's default is scram-sha-256, as on the arm64 VPS), never replaced."""
    used = [name for name in ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE") if env.get(name)]
    user = quote(env.get("PGUSER") or "postgres", safe="")
    password = env.get("PGPASSWORD")
    login = f"{user}:{quote(password, safe='')}" if password else user
    host = env.get("PGHOST") or "127.0.0.1"
    port = env.get("PGPORT") or "5432"
    database = env.get("PGDATABASE") or "postgres"
    return f"postgresql://{login}@{host}:{port}/{database}", ", ".join(used)


class TestServers:
    """The servers of this test session and how they were found (printed in the pytest header)."""

    def __init__(self) -> None:
        self.redis_url = ""
        self.database_url = ""
        self.how: list[str] = []
        self._stack = contextlib.ExitStack()
        self._workdir: Path | None = None

    def _work(self) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="seatwatch-test-servers-"))
            os.chmod(self._workdir, 0o755)  # noqa: S103 - pgserver runs postgres as its own user when we are root
        return self._workdir

    def start(self) -> TestServers:
        env_redis = os.environ.get("TEST_REDIS_URL")
        if env_redis:
            self.redis_url, how = env_redis, "TEST_REDIS_URL"
        elif _redis_answers("127.0.0.1", 6379):
            self.redis_url, how = "redis://127.0.0.1:6379/0", "local port 6379"
        else:
            server = embedded.RedisServer(self._work() / "redis").start()
            self._stack.callback(server.stop)
            self.redis_url, how = server.url, "embedded redis-server"
        self.how.append(f"redis: {how}")

        env_db = os.environ.get("TEST_DATABASE_URL")
        local, named = local_postgres_url(os.environ)
        host, port = urlsplit(local).hostname or "127.0.0.1", urlsplit(local).port or 5432
        if env_db:
            self.database_url, how = env_db, "TEST_DATABASE_URL"
        elif _answers(host, port):
            self.database_url, how = local, f"local port {port}" + (f" ({named})" if named else "")
        else:
            pg = embedded.PostgresServer(self._work() / "postgres").start()
            self._stack.callback(pg.stop)
            self.database_url, how = pg.url, "embedded pgserver"
        self.how.append(f"postgres: {how}")
        return self

    def stop(self) -> None:
        self._stack.close()

    # -- databases ---------------------------------------------------------------------------------

    def url_for(self, database: str) -> str:
        parts = urlsplit(self.database_url)
        return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))

    def create_database(self, label: str, template: str | None = None) -> str:
        name = f"swt_{label}_{uuid.uuid4().hex[:8]}".lower()[:60]
        clause = f' TEMPLATE "{template}"' if template else ""
        asyncio.run(self._admin(f'CREATE DATABASE "{name}"{clause}'))
        return name

    def drop_database(self, name: str) -> None:
        asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.database_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
