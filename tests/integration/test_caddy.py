"""The shipped Caddyfile in a real Caddy (Debian's package) on loopback, plain HTTP, in front of a real daemon.

The site name and the upstream come from Caddy's environment, as in production; only the scheme differs
(``http://`` here, so no certificate is asked for). A missing `caddy` fails these tests, it never skips them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from daemon.commands.embedded import free_port
from daemon.version import version
from tests.conftest import delete_prefix
from tests.support.procs import DaemonProcess, daemon_env

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.support.stubs import ScraperStub

ROOT = Path(__file__).resolve().parents[2]


def caddy() -> str:
    found = shutil.which("caddy")
    if found is None:
        pytest.fail("caddy is missing: apt-get install caddy (.ci/run does it)")
    return found


def caddy_env(tmp_path: Path, **values: str) -> dict[str, str]:
    """Only what Caddy needs: its own folders under tmp_path, and the Caddyfile's placeholders."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    env.update({"XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "config")})
    env.update(values)
    return env


@pytest.fixture
def daemon(redis_url: str, database_url: str, prefix: str, scraper: ScraperStub) -> Iterator[DaemonProcess]:
    """A healthy `seatwatch run` on a free loopback port (no tick fires during the test)."""
    env = daemon_env(
        redis_url=redis_url,
        database_url=database_url,
        prefix=prefix,
        scraper_url=scraper.url,
        SEATWATCH_CRON="0 0 1 1 *",
    )
    process = DaemonProcess(env).start()
    try:
        process.wait_healthy()
        yield process
    finally:
        assert process.stop() == 0, process.logs()
        asyncio.run(delete_prefix(redis_url, prefix))


def test_caddy_passes_health_through_and_hides_metrics(tmp_path: Path, daemon: DaemonProcess) -> None:
    """Through Caddy both health paths answer as the daemon does (with its version); /metrics and the rest are 404."""
    upstream = daemon.env["SEATWATCH_HEALTH_LISTEN"]
    port = free_port()
    env = caddy_env(
        tmp_path,
        SEATWATCH_SITE=f"http://127.0.0.1:{port}",
        SEATWATCH_UPSTREAM=upstream,
        CADDY_ADMIN=f"127.0.0.1:{free_port()}",
    )
    log = (tmp_path / "caddy.log").open("w")
    process = subprocess.Popen(
        [caddy(), "run", "--config", str(ROOT / "Caddyfile"), "--adapter", "caddyfile"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, (tmp_path / "caddy.log").read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code != 502:
                    break
            assert time.monotonic() < deadline, (tmp_path / "caddy.log").read_text()
            time.sleep(0.1)
        for path in ("/api/monitoring/health", "/health"):
            direct = httpx.get(f"http://{upstream}{path}", timeout=5)
            proxied = httpx.get(f"{base}{path}", timeout=5)
            assert proxied.status_code == direct.status_code == 200, proxied.text
            body = proxied.json()
            assert body["status"] == "healthy"
            assert body["version"] == version()
            assert set(body["checks"]) == set(direct.json()["checks"])
        assert httpx.get(f"http://{upstream}/metrics", timeout=5).status_code == 200
        assert httpx.get(f"{base}/metrics", timeout=5).status_code == 404
        assert httpx.get(f"{base}/api/monitoring/healthz", timeout=5).status_code == 404
        assert httpx.get(f"{base}/", timeout=5).status_code == 404
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def test_caddy_refuses_to_start_without_the_site_name(tmp_path: Path) -> None:
    """With SEATWATCH_SITE unset, Caddy refuses the file and its error names the variable."""
    result = subprocess.run(
        [caddy(), "validate", "--config", str(ROOT / "Caddyfile"), "--adapter", "caddyfile"],
        env=caddy_env(tmp_path),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "unset-SEATWATCH_SITE" in result.stdout + result.stderr
