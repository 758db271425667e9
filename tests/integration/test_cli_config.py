"""The real `seatwatch` process refusing bad configuration: exit 78, every problem listed, no secret shown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import run_cli

TOKEN = "cli-scraper-token-6d0b91"
RESEND = "re_cli_resend_key_44e2aa"
SIGNING = "cli-service-role-key-c7f3"
DB_PASSWORD = "cli-db-pass-91ac"
REDIS_PASSWORD = "cli-redis-pass-08fe"
SECRETS = (TOKEN, RESEND, SIGNING, DB_PASSWORD, REDIS_PASSWORD)


def base_env() -> dict[str, str]:
    # Nothing inherited but PATH: the process sees only what the test sets.
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1"}


def broken_env() -> dict[str, str]:
    """Secrets set everywhere, and six problems at once."""
    env = base_env()
    env.update(
        {
            # bad: the port is not a number (the message must show the URL without its password)
            "DATABASE_URL": f"postgresql://seatwatch:{DB_PASSWORD}@db.example.com:port/postgres",
            # bad: wrong scheme for Redis
            "REDIS_URL": f"http://default:{REDIS_PASSWORD}@redis.example.com:6379",
            # SCRAPER_URL missing
            "SCRAPER_SECRET_TOKEN": TOKEN,
            "RESEND_API_KEY": RESEND,
            "NOTIFICATION_FROM_EMAIL": "notify@pickmyclass.app",
            "SUPABASE_SERVICE_ROLE_KEY": SIGNING,
            "SEATWATCH_CONCURRENCY": "lots",
            "SEATWATCH_CRON": "99 * * * *",
            "SEATWATCH_SCRAPER_TIMEOUT_S": "300",
            "SEATWATCH_VISIBILITY_TIMEOUT_S": "300",
        }
    )
    return env


EXPECTED_PROBLEMS = (
    "DATABASE_URL has an invalid port",
    "REDIS_URL must start with redis://, rediss://, unix://",
    "SCRAPER_URL is required",
    "SEATWATCH_CONCURRENCY must be a whole number (got 'lots')",
    "SEATWATCH_CRON is not a valid cron expression: '99 * * * *'",
    "SEATWATCH_VISIBILITY_TIMEOUT_S (300) must be greater than SEATWATCH_SCRAPER_TIMEOUT_S (300)",
)


def assert_no_secret(*outputs: str) -> None:
    for output in outputs:
        for secret in SECRETS:
            assert secret not in output, f"secret {secret!r} printed:\n{output}"


@pytest.mark.parametrize("command", ["check", "run"])
def test_every_problem_listed_without_secrets(command: str) -> None:
    """`check` and `run` with several problems exit 78, list every one on stderr, and print no secret."""
    result = run_cli(command, env=broken_env())
    assert result.returncode == 78, result.stderr
    assert result.stderr.startswith("seatwatch: invalid configuration:")
    for problem in EXPECTED_PROBLEMS:
        assert f"  - {problem}" in result.stderr, (problem, result.stderr)
    assert "postgresql://seatwatch:***@db.example.com:port/postgres" in result.stderr
    assert_no_secret(result.stdout, result.stderr)


def test_migrate_bad_database_url() -> None:
    """`migrate` with only a bad DATABASE_URL exits 78 naming it alone, password hidden."""
    env = base_env()
    env["DATABASE_URL"] = f"postgresql://seatwatch:{DB_PASSWORD}@db.example.com:99999/postgres"
    result = run_cli("migrate", env=env)
    assert result.returncode == 78, result.stderr
    problems = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert problems == [
        "  - DATABASE_URL has an invalid port: 'postgresql://seatwatch:***@db.example.com:99999/postgres'"
    ]
    assert_no_secret(result.stdout, result.stderr)


def test_migrate_without_database_url() -> None:
    """`migrate` with nothing set asks for DATABASE_URL only (it needs nothing else)."""
    result = run_cli("migrate", env=base_env())
    assert result.returncode == 78, result.stderr
    problems = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert problems == ["  - DATABASE_URL is required"]


@pytest.mark.parametrize(
    "args",
    [
        ("frobnicate",),
        (),
        ("tick", "--group", "weird"),
        ("lock", "release"),
        ("dlq",),
        ("status", "--yaml"),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    """An unknown command, a missing one, or bad arguments exit 2 with usage on stderr, before any config."""
    result = run_cli(*args, env=broken_env())
    assert result.returncode == 2, result.stderr
    assert "usage: seatwatch" in result.stderr
    assert "invalid configuration" not in result.stderr
    assert_no_secret(result.stdout, result.stderr)


def test_keyword_dsn_password_not_printed() -> None:
    """A libpq keyword DSN refused by `migrate` does not have its password printed."""
    env = base_env()
    env["DATABASE_URL"] = f"host=db.example.com user=seatwatch password={DB_PASSWORD} dbname=postgres"
    result = run_cli("migrate", env=env)
    assert result.returncode == 78, result.stderr
    assert "DATABASE_URL" in result.stderr
    assert_no_secret(result.stdout, result.stderr)


def test_check_hides_password_query_parameter() -> None:
    """`check` reporting an unreachable database does not print a password given as ?password=."""
    env = base_env()
    env.update(
        {
            "DATABASE_URL": f"postgresql://seatwatch@127.0.0.1:1/postgres?password={DB_PASSWORD}",
            "REDIS_URL": f"redis://default:{REDIS_PASSWORD}@127.0.0.1:1/0",
            "SCRAPER_URL": "http://127.0.0.1:1",
            "SCRAPER_SECRET_TOKEN": TOKEN,
            "RESEND_API_KEY": RESEND,
            "NOTIFICATION_FROM_EMAIL": "notify@pickmyclass.app",
            "SUPABASE_SERVICE_ROLE_KEY": SIGNING,
        }
    )
    result = run_cli("check", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL postgres" in result.stdout
    assert "FAIL redis" in result.stdout
    assert_no_secret(result.stdout, result.stderr)


def run_under_journald(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """``seatwatch ARGS`` with stdout and stderr on one stream that $JOURNAL_STREAM names, as systemd runs it."""
    read_end, write_end = os.pipe()
    info = os.fstat(write_end)
    env = {**env, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}", "SEATWATCH_INSTALL_ROOT": "/nonexistent"}
    with os.fdopen(read_end, "rb") as reader:
        process = subprocess.Popen([sys.executable, "-m", "daemon", *args], env=env, stdout=write_end, stderr=write_end)
        os.close(write_end)
        output = reader.read().decode()
    return process.wait(30), output


def test_why_a_start_failed_is_logged_at_err_under_journald() -> None:
    """Under journald every line of a configuration error carries <3>, so the guide's `journalctl -p err` shows it."""
    code, output = run_under_journald("run", env=broken_env())
    assert code == 78
    lines = output.splitlines()
    assert lines, output
    assert all(line.startswith("<3>") for line in lines), output
    assert any("SCRAPER_URL is required" in line for line in lines)
    assert_no_secret(output)
    guide = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    assert "`journalctl -u seatwatch -b -p err`" in guide  # "why it stopped": err is priority 3 and below
