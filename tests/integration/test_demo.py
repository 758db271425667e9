"""`seatwatch demo` with nothing configured: embedded servers, simulated scraper, emails as files, health."""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_with_nothing_configured(tmp_path: Path) -> None:
    """Without REDIS_URL/DATABASE_URL the demo starts embedded servers, answers health 200 and writes emails."""
    os.chmod(tmp_path, 0o755)  # noqa: S103 - pgserver runs postgres as its own user when the tests run as root
    env = {"PATH": os.environ["PATH"], "PYTHONUNBUFFERED": "1", "HOME": str(tmp_path)}
    demo = subprocess.Popen(
        [sys.executable, "-m", "daemon", "demo", "--dir", str(tmp_path / "demo"), "--port", "0", "--duration", "25"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert demo.stdout is not None
        lines: list[str] = []
        health_url = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the banner ends with the "stop" line
            line = demo.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"health\s+(http://127\.0\.0\.1:\d+/api/monitoring/health)", line)
            if match:
                health_url = match.group(1)
            if line.startswith("  stop"):
                break
        assert health_url is not None, "".join(lines)
        assert any(line.startswith("  servers  embedded Redis and PostgreSQL") for line in lines), lines

        outbox = tmp_path / "demo" / "outbox"
        status = None
        while time.monotonic() < deadline and not (status == 200 and list(outbox.glob("*.eml"))):
            try:
                status = httpx.get(health_url, timeout=2).status_code
            except httpx.HTTPError:
                status = None
            time.sleep(0.5)
        assert status == 200
        rest, _ = demo.communicate(timeout=90)
        assert demo.returncode == 0, "".join(lines) + rest
    finally:
        # Never leave the demo (and its embedded servers) running past the test, whatever failed above.
        if demo.poll() is None:
            demo.kill()
            demo.communicate(timeout=30)
        if demo.stdout is not None:
            demo.stdout.close()

    messages = [
        email.message_from_bytes(p.read_bytes(), policy=email.policy.default) for p in sorted(outbox.glob("*.eml"))
    ]
    assert messages
    recipients = {m["To"] for m in messages}
    assert "muted@example.edu" not in recipients  # the demo's student with notifications off
    assert all(m["List-Unsubscribe"].startswith("<http://localhost:3000/api/unsubscribe?token=") for m in messages)
    subjects = {m["Subject"] for m in messages}
    assert any(s.startswith("🎉 Seat Available:") for s in subjects)


def test_scripts_demo_installs_from_the_hashed_lock(tmp_path: Path) -> None:
    """scripts/demo installs the locked, hashed versions (as CI tests them), then seatwatch itself without deps."""
    repo = Path(__file__).resolve().parents[2]
    tree = tmp_path / "checkout"
    (tree / "scripts").mkdir(parents=True)
    shutil.copy2(repo / "scripts" / "demo", tree / "scripts" / "demo")
    shutil.copytree(repo / "packaging", tree / "packaging")
    bin_dir = tree / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "calls.log"
    for name in ("python", "seatwatch"):  # stand-ins that record how they were called
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n')
        (bin_dir / name).chmod(0o755)
    result = subprocess.run(
        ["bash", str(tree / "scripts" / "demo"), "--duration", "1"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 3, calls
    assert "--require-hashes -r " in calls[0]
    arm64 = os.uname().machine in ("aarch64", "arm64")  # there: the dev lock less the embedded servers
    assert arm64 or calls[0].endswith("-r packaging/requirements-dev.lock")
    assert calls[1].endswith("--no-deps --no-build-isolation -e .")
    assert calls[2] == "seatwatch demo --duration 1"
