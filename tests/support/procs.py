"""Real ``seatwatch`` processes for the tests: environment, start, READY over a real notify socket, signals."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from daemon.commands.embedded import free_port
from tests.support.stubs import RESEND_KEY, SCRAPER_TOKEN

if TYPE_CHECKING:
    from tests.support.stubs import ResendStub, ScraperStub

SIGNING_KEY = "test-signing-key-3c2b1a"


def daemon_env(
    *,
    redis_url: str,
    database_url: str,
    prefix: str,
    scraper_url: str,
    resend_url: str = "http://127.0.0.1:9",
    health_port: int | None = None,
    **overrides: Any,
) -> dict[str, str]:
    """A complete environment for ``seatwatch run`` against the test servers and stubs."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONUNBUFFERED": "1",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "SCRAPER_URL": scraper_url,
        "SCRAPER_SECRET_TOKEN": SCRAPER_TOKEN,
        "RESEND_API_KEY": RESEND_KEY,
        "RESEND_API_URL": resend_url,
        "NOTIFICATION_FROM_EMAIL": "notifications@pickmyclass.test",
        "NEXT_PUBLIC_SITE_URL": "https://pickmyclass.test",
        "SUPABASE_SERVICE_ROLE_KEY": SIGNING_KEY,
        "SEATWATCH_REDIS_PREFIX": prefix,
        "SEATWATCH_HEALTH_LISTEN": f"127.0.0.1:{health_port or free_port()}",
        "SEATWATCH_CONSUMER": f"test-{os.getpid()}-{time.monotonic_ns() % 10**6}",
        "SEATWATCH_SCRAPER_TIMEOUT_S": "5",
        "SEATWATCH_VISIBILITY_TIMEOUT_S": "30",
        "SEATWATCH_SHUTDOWN_GRACE_S": "10",
        "SEATWATCH_LOG_LEVEL": "debug",
        # The stand-in Resend has no quota unless a test gives it one (and sets these to match).
        "SEATWATCH_EMAIL_QUOTA_PER_DAY": "0",
        "SEATWATCH_EMAIL_QUOTA_PER_MONTH": "0",
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def stub_env(
    redis_url: str, database_url: str, prefix: str, scraper: ScraperStub, resend: ResendStub, **extra: Any
) -> dict[str, str]:
    """``daemon_env`` against the stand-in scraper and Resend."""
    return daemon_env(
        redis_url=redis_url,
        database_url=database_url,
        prefix=prefix,
        scraper_url=scraper.url,
        resend_url=resend.url,
        **extra,
    )


def quiet_cron() -> dict[str, str]:
    """A daily cron an hour ago: the daemon runs no tick of its own while the test drives it."""
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    return {"SEATWATCH_CRON": f"{hour_ago.minute} {hour_ago.hour} * * *", "SEATWATCH_TIMEZONE": "UTC"}


class NotifySocket:
    """A datagram socket bound where ``NOTIFY_SOCKET`` points, collecting sd_notify messages."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sw-notify-")
        self.path = str(Path(self.dir) / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def collect(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                return self.messages
            self.messages.append(data.decode())

    def wait_for(self, field: str, timeout_s: float = 30) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for message in self.collect():
                if field in message.split("\n"):
                    return message
        raise AssertionError(f"no {field} within {timeout_s}s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self.dir)


class DaemonProcess:
    """``python -m daemon run`` with its output in a log file."""

    def __init__(self, env: dict[str, str], *, notify: NotifySocket | None = None, args: tuple[str, ...] = ("run",)):
        self.env = dict(env)
        if notify is not None:
            self.env["NOTIFY_SOCKET"] = notify.path
        self.args = args
        self.log_path = Path(tempfile.mkstemp(prefix="seatwatch-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def health_url(self) -> str:
        return f"http://{self.env['SEATWATCH_HEALTH_LISTEN']}/api/monitoring/health"

    def start(self) -> DaemonProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daemon", *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )
        log.close()
        return self

    def wait_healthy(self, timeout_s: float = 30) -> dict[str, Any]:
        """Poll the health endpoint until it answers 200; return its JSON."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            self.assert_running()
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(self.health_url, timeout=2)
                last = response.json()
                if response.status_code == 200:
                    return dict(last)
            time.sleep(0.1)
        raise AssertionError(f"not healthy within {timeout_s}s: {last}\n{self.logs()}")

    def health(self) -> tuple[int, dict[str, Any]]:
        response = httpx.get(self.health_url, timeout=5)
        return response.status_code, response.json()

    def assert_running(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"daemon exited with {self.process.returncode}\n{self.logs()}")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout_s: float = 30) -> int:
        assert self.process is not None
        return self.process.wait(timeout_s)

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.logs():
                return
            self.assert_running()
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not logged within {timeout_s}s\n{self.logs()}")


class Daemons:
    """What the ``daemons`` fixture hands a test: ``start`` a ``seatwatch run`` process; any left running at the end
    of the test is killed (a test that means to stop one says so, and checks its exit status)."""

    def __init__(self) -> None:
        self.started: list[DaemonProcess] = []

    def start(
        self,
        env: dict[str, str],
        *,
        notify: NotifySocket | None = None,
        args: tuple[str, ...] = ("run",),
        healthy: bool = False,
    ) -> DaemonProcess:
        """Start a daemon with ``env``; with ``healthy``, wait until its health endpoint answers 200."""
        proc = DaemonProcess(env, notify=notify, args=args).start()
        self.started.append(proc)
        if healthy:
            proc.wait_healthy()
        return proc

    def logs(self) -> str:
        """Every started daemon's log, for a failure message."""
        return "\n".join(proc.logs() for proc in self.started)

    def kill_all(self) -> None:
        """Kill the daemons still running."""
        for proc in self.started:
            if proc.process is not None and proc.process.poll() is None:
                proc.process.kill()
                proc.process.wait()


def run_cli(*args: str, env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m daemon ARGS`` to completion, output captured.

    The installed unit's files are looked for under a folder that does not exist unless ``env`` names one
    (``SEATWATCH_INSTALL_ROOT``), so a host where seatwatch is installed does not change what a test sees.
    """
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        env={"SEATWATCH_INSTALL_ROOT": "/nonexistent-seatwatch-install-root", **env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
