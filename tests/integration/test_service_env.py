"""What the unit gives the daemon, checked from outside it: `check --env-file` and migrations inside `run`.

`seatwatch check --env-file FILE` reads systemd's EnvironmentFile syntax and (as root) the credentials folder,
ignoring the caller's own environment, so the installer's advice checks what the service will see. `run`
applies pending migrations itself; one that cannot apply ends it with 78, which systemd does not restart.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

import asyncpg

from tests.conftest import delete_prefix
from tests.support.procs import DaemonProcess, daemon_env, run_cli

if TYPE_CHECKING:
    from pathlib import Path

    from tests.support.stubs import ScraperStub

TOKEN = "tok-env-file-9a8b7c"


def minimal_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1"}


def write_settings(tmp_path: Path, scraper_url: str) -> Path:
    """An env file as operators write them: comments, a cron with blanks, quotes; the outbox under tmp_path."""
    env_file = tmp_path / "seatwatch.env"
    env_file.write_text(
        "# seatwatch settings\n"
        "; an old-style comment\n"
        f"SCRAPER_URL={scraper_url}\n"
        "SEATWATCH_CRON=0,30 * * * *\n"
        "SEATWATCH_TIMEZONE='America/Phoenix'\n"
        'SEATWATCH_EMAIL_TRANSPORT="file"\n'
        f"SEATWATCH_OUTBOX_DIR={tmp_path / 'outbox'}\n"
    )
    return env_file


def write_credentials(folder: Path, database_url: str, redis_url: str) -> Path:
    folder.mkdir(mode=0o700)
    for name, value in {"database_url": database_url, "redis_url": redis_url, "scraper_secret_token": TOKEN}.items():
        (folder / name).write_text(value + "\n")
        (folder / name).chmod(0o600)
    return folder


def test_check_reads_the_env_file_and_credentials_and_ignores_the_callers_environment(
    tmp_path: Path, database_url: str, redis_url: str, scraper: ScraperStub
) -> None:
    """`check --env-file` passes on the file's settings and the folder's secrets, whatever the shell exports."""
    env_file = write_settings(tmp_path, scraper.url)
    credentials = write_credentials(tmp_path / "credentials", database_url, redis_url)
    shell = {**minimal_env(), "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "SEATWATCH_CRON": "nonsense"}
    result = run_cli("check", "--env-file", str(env_file), "--credentials", str(credentials), env=shell)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cron '0,30 * * * *' in America/Phoenix" in result.stdout
    for name in ("configuration", "postgres", "redis", "scraper", "email"):
        assert f"ok   {name}" in result.stdout, result.stdout
    assert TOKEN not in result.stdout + result.stderr


def test_check_without_the_credentials_folder_says_so_and_lists_what_is_missing(
    tmp_path: Path, scraper: ScraperStub
) -> None:
    """No credentials folder: a note names it, and the configuration error lists the missing secrets (exit 78)."""
    env_file = write_settings(tmp_path, scraper.url)
    missing = tmp_path / "no-such-folder"
    result = run_cli("check", "--env-file", str(env_file), "--credentials", str(missing), env=minimal_env())
    assert result.returncode == 78, result.stdout + result.stderr
    assert f"note: no credentials folder {missing}" in result.stderr
    assert "DATABASE_URL is required" in result.stderr
    assert "SCRAPER_SECRET_TOKEN is required" in result.stderr


def test_check_with_an_unreadable_env_file_exits_78(tmp_path: Path) -> None:
    """A missing environment file is a configuration error that names the file."""
    result = run_cli("check", "--env-file", str(tmp_path / "absent.env"), env=minimal_env())
    assert result.returncode == 78
    assert f"cannot read the environment file {tmp_path / 'absent.env'}" in result.stderr


def test_run_applies_pending_migrations_before_ready(
    empty_database_url: str, redis_url: str, prefix: str, scraper: ScraperStub
) -> None:
    """`run` on an empty database migrates it, then becomes healthy (the unit has no ExecStartPre)."""
    env = daemon_env(redis_url=redis_url, database_url=empty_database_url, prefix=prefix, scraper_url=scraper.url)
    daemon = DaemonProcess({**env, "SEATWATCH_CRON": "0 0 1 1 *"}).start()
    try:
        daemon.wait_healthy()
        assert "migrations applied: 0001_base_schema" in daemon.logs()
    finally:
        assert daemon.stop() == 0, daemon.logs()
        asyncio.run(delete_prefix(redis_url, prefix))


async def make_read_only(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        name = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    finally:
        await conn.close()


def test_a_migration_that_cannot_apply_ends_run_with_78(
    empty_database_url: str, redis_url: str, prefix: str, scraper: ScraperStub
) -> None:
    """A migration Postgres refuses (a read-only database) stops `run` with 78, so systemd does not restart it."""
    asyncio.run(make_read_only(empty_database_url))
    env = daemon_env(redis_url=redis_url, database_url=empty_database_url, prefix=prefix, scraper_url=scraper.url)
    daemon = DaemonProcess(env).start()
    assert daemon.wait(60) == 78, daemon.logs()
    assert "cannot start: a migration failed: ReadOnlySQLTransactionError" in daemon.logs()
    assert "restarting cannot fix this" in daemon.logs()
    asyncio.run(delete_prefix(redis_url, prefix))


def install_root(tmp_path: Path, scraper_url: str, database_url: str, redis_url: str) -> Path:
    """A staged installation (as `install.sh --root` lays it out): the unit's env file and credentials."""
    root = tmp_path / "root"
    etc = root / "etc" / "seatwatch"
    etc.mkdir(parents=True)
    write_settings(tmp_path, scraper_url).rename(etc / "seatwatch.env")
    write_credentials(etc / "credentials", database_url, redis_url)
    return root


def test_every_command_reads_the_installed_settings_when_the_environment_names_none(
    tmp_path: Path, database_url: str, redis_url: str, scraper: ScraperStub
) -> None:
    """`seatwatch migrate` and `status` typed with no settings exported read the unit's files, and say so."""
    root = install_root(tmp_path, scraper.url, database_url, redis_url)
    env = {**minimal_env(), "SEATWATCH_INSTALL_ROOT": str(root)}
    for command in (("migrate",), ("status", "--json"), ("breaker", "reset"), ("dlq", "list")):
        result = run_cli(*command, env=env)
        assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
        etc = root / "etc" / "seatwatch"
        said = f"settings from the installed unit's {etc / 'seatwatch.env'} and {etc / 'credentials'}"
        assert said in result.stderr, result.stderr
        assert TOKEN not in result.stdout + result.stderr


def test_a_setting_in_the_environment_wins_over_the_installed_files(
    tmp_path: Path, database_url: str, redis_url: str, scraper: ScraperStub
) -> None:
    """An environment naming any setting is used as it is: the installed files are not read."""
    root = install_root(tmp_path, scraper.url, database_url, redis_url)
    env = {**minimal_env(), "SEATWATCH_INSTALL_ROOT": str(root), "SEATWATCH_LOG_LEVEL": "info"}
    result = run_cli("migrate", env=env)
    assert result.returncode == 78
    assert "DATABASE_URL is required" in result.stderr
    assert "installed unit" not in result.stderr


def test_env_file_and_credentials_work_on_every_command(
    tmp_path: Path, database_url: str, redis_url: str, scraper: ScraperStub
) -> None:
    """`--env-file FILE --credentials DIR` is taken by tick, status, lock and migrate, not only by check."""
    env_file = write_settings(tmp_path, scraper.url)
    credentials = write_credentials(tmp_path / "credentials", database_url, redis_url)
    given = ("--env-file", str(env_file), "--credentials", str(credentials))
    for command in (("migrate",), ("status",), ("lock", "release", "--force"), ("tick", "--group", "all")):
        result = run_cli(*command, *given, env=minimal_env())
        assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
