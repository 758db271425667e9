"""What the unit gives the daemon, checked from outside it: `check --env-file` and migrations inside `run`.

`seatwatch check --env-file FILE` reads systemd's EnvironmentFile syntax and (as root) the credentials folder,
ignoring the caller's own environment, so the installer's advice checks what the service will see. `run`
applies pending migrations itself; one that cannot apply ends it with 78, which systemd does not restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis as redis_sync

from daemon.primitives.scripts import SCRIPTS
from tests.conftest import delete_prefix
from tests.support.procs import DaemonProcess, daemon_env, run_cli

if TYPE_CHECKING:
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
    # Nothing made: as root it would be root's folder, which the daemon (user seatwatch) could not write.
    assert not (tmp_path / "outbox").exists()
    assert "(made by the daemon at its first email)" in result.stdout


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
    # The guide's cutover step 3, as typed there.
    guide = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    step = re.search(r"^3\. `seatwatch ([a-z ]+)`", guide, re.MULTILINE)
    assert step, "the guide's cutover has no step 3 command"
    assert step.group(1) == "migrate"
    for command in ((step.group(1),), ("status", "--json"), ("breaker", "reset"), ("dlq", "list")):
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


def write_unit(path: Path, timeout_stop: str) -> Path:
    path.write_text(f"[Unit]\nDescription=x\n\n[Service]\nExecStart=/bin/true\nTimeoutStopSec={timeout_stop}\n")
    return path


def test_check_refuses_a_shutdown_grace_the_units_stop_timeout_would_cut(
    tmp_path: Path, database_url: str, redis_url: str, scraper: ScraperStub
) -> None:
    """`check` refuses SEATWATCH_SHUTDOWN_GRACE_S=120 against the unit's TimeoutStopSec=90, as `run` under it does."""
    env_file = write_settings(tmp_path, scraper.url)
    env_file.write_text(env_file.read_text() + "SEATWATCH_SHUTDOWN_GRACE_S=120\n")
    credentials = write_credentials(tmp_path / "credentials", database_url, redis_url)
    given = ("--env-file", str(env_file), "--credentials", str(credentials))

    result = run_cli("check", *given, "--unit", str(write_unit(tmp_path / "a.service", "90")), env=minimal_env())
    assert result.returncode == 78, result.stdout + result.stderr
    assert "SEATWATCH_SHUTDOWN_GRACE_S (120) must be less than systemd's TimeoutStopSec (90)" in result.stderr

    # By default the installed unit's (here a staged installation's), in systemd's timespan syntax.
    root = tmp_path / "root"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    write_unit(root / "etc" / "systemd" / "system" / "seatwatch.service", "1min 30s")
    result = run_cli("check", *given, env={**minimal_env(), "SEATWATCH_INSTALL_ROOT": str(root)})
    assert result.returncode == 78, result.stdout + result.stderr
    assert "TimeoutStopSec (90)" in result.stderr

    result = run_cli("check", *given, "--unit", str(write_unit(tmp_path / "b.service", "3min")), env=minimal_env())
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_runs_every_lua_script_once_on_throwaway_keys_and_removes_them(
    tmp_path: Path, database_url: str, redis_url: str, scraper: ScraperStub, prefix: str
) -> None:
    """`check` executes each of the daemon's scripts, under {prefix}:check-*, and leaves no key behind."""
    env_file = write_settings(tmp_path, scraper.url)
    env_file.write_text(env_file.read_text() + f"SEATWATCH_REDIS_PREFIX={prefix}\n")
    credentials = write_credentials(tmp_path / "credentials", database_url, redis_url)
    result = run_cli("check", "--env-file", str(env_file), "--credentials", str(credentials), env=minimal_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"each of the {len(SCRIPTS)} Lua scripts ran once on throwaway keys (removed)" in result.stdout
    with contextlib.closing(redis_sync.Redis.from_url(redis_url)) as client:
        assert list(client.scan_iter(match=f"{prefix}:*")) == []


def test_check_fails_naming_the_script_a_redis_refuses_to_run(
    tmp_path: Path, database_url: str, redis_url: str, scraper: ScraperStub
) -> None:
    """A Redis that loads the scripts but refuses a command inside one (TIME, by ACL here) fails `check`."""
    user, password = f"swcheck{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    parts = urlsplit(redis_url)
    limited = urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port or 6379}"))
    env_file = write_settings(tmp_path, scraper.url)
    credentials = write_credentials(tmp_path / "credentials", database_url, limited)
    with contextlib.closing(redis_sync.Redis.from_url(redis_url)) as admin:
        admin.acl_setuser(
            user, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"], commands=["+@all", "-time"]
        )
        try:
            result = run_cli("check", "--env-file", str(env_file), "--credentials", str(credentials), env=minimal_env())
        finally:
            admin.acl_deluser(user)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL redis" in result.stdout
    assert "Redis refused the lock_acquire script when it ran" in result.stdout
    assert password not in result.stdout + result.stderr


def test_run_under_the_unit_without_its_env_file_exits_78_naming_it(tmp_path: Path) -> None:
    """The unit's env file gone: `run` gets only its credentials, reads the file itself and stops with 78 (no loop)."""
    unit = (Path(__file__).resolve().parents[2] / "seatwatch.service").read_text()
    assert "\nEnvironmentFile=-/etc/seatwatch/seatwatch.env\n" in unit
    assert "RestartPreventExitStatus=78 243" in unit
    root = tmp_path / "root"
    (root / "etc" / "seatwatch" / "credentials").mkdir(parents=True)
    handed = tmp_path / "run-credentials"  # what systemd's LoadCredential= makes
    handed.mkdir()
    env = {**minimal_env(), "SEATWATCH_INSTALL_ROOT": str(root), "CREDENTIALS_DIRECTORY": str(handed)}
    result = run_cli("run", env=env)
    assert result.returncode == 78, result.stdout + result.stderr
    assert f"cannot read the environment file {root / 'etc/seatwatch/seatwatch.env'}" in result.stderr
    assert "No such file or directory" in result.stderr
