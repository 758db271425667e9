"""Where a command's settings come from: the environment, or the installed unit's own files (SPEC §3).

The unit reads its settings from ``EnvironmentFile=/etc/seatwatch/seatwatch.env`` (systemd's syntax, which a
shell cannot source: ``SEATWATCH_CRON=0,30 * * * *`` would glob) and hands the secrets over with
``LoadCredential=seatwatch:/etc/seatwatch/credentials``: every file there becomes a credential named
``seatwatch_<file>`` in ``$CREDENTIALS_DIRECTORY``. Every command therefore reads its settings one of three ways:

* ``--env-file FILE [--credentials DIR]``: that file (read by ``envfile``, as systemd reads it) and that
  folder, and nothing else of the caller's environment;
* the environment, when it names any setting (``DATABASE_URL``, ``SEATWATCH_...``, a ``NAME_FILE``);
* otherwise, on a host where seatwatch is installed (``/etc/seatwatch`` exists), the unit's own env file and
  credentials folder, saying so on stderr: so an operator's ``seatwatch status`` works as typed (as root).
  The daemon under the unit gets here only when the env file is missing (``EnvironmentFile=-``): reading it
  then fails, which is a configuration error (78), not a restart loop.

``SEATWATCH_INSTALL_ROOT`` (default ``/``) is where the installed files are looked for: a folder that
``packaging/install.sh --root DIR`` staged, or a test's. It is not a setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Final

from daemon.errors import ConfigError
from daemon.settings import envfile

if TYPE_CHECKING:
    from collections.abc import Mapping

INSTALL_ROOT_VAR: Final = "SEATWATCH_INSTALL_ROOT"
ETC: Final = Path("/etc/seatwatch")
ENV_FILE: Final = ETC / "seatwatch.env"
CREDENTIALS: Final = ETC / "credentials"
UNIT_FILE: Final = Path("/etc/systemd/system/seatwatch.service")

# The variables ``config.Settings`` reads besides SEATWATCH_*; a NAME_FILE of any of them names it too.
_SETTINGS: Final = frozenset(
    {
        "DATABASE_URL",
        "REDIS_URL",
        "SCRAPER_URL",
        "SCRAPER_SECRET_TOKEN",
        "RESEND_API_KEY",
        "RESEND_API_URL",
        "NOTIFICATION_FROM_EMAIL",
        "NEXT_PUBLIC_SITE_URL",
        "SITE_URL",
        "SUPABASE_SERVICE_ROLE_KEY",
        "UNSUBSCRIBE_SIGNING_SECRET",
    }
)


def installed(path: Path, environ: Mapping[str, str] | None = None) -> Path:
    """Where an installed file is: ``path`` itself, or the same path under ``$SEATWATCH_INSTALL_ROOT``."""
    environ = os.environ if environ is None else environ
    root = environ.get(INSTALL_ROOT_VAR) or "/"
    return Path(root) / path.relative_to("/")


def names_settings(environ: Mapping[str, str]) -> bool:
    """Whether the environment sets any seatwatch setting (``CREDENTIALS_DIRECTORY`` alone is not one)."""
    for name, value in environ.items():
        if not value.strip() or name == INSTALL_ROOT_VAR:
            continue
        base = name.removesuffix("_FILE")
        if base in _SETTINGS or name.startswith("SEATWATCH_"):
            return True
    return False


def service_environment(
    env_file: Path, credentials: Path, *, credentials_directory: str | None = None
) -> tuple[dict[str, str], list[str]]:
    """(environment, notes for the operator) from an env file and a credentials folder.

    ``credentials_directory``: the one systemd already handed over (the daemon under its unit), used instead
    of ``credentials``. ``ConfigError`` when the environment file cannot be read.
    """
    try:
        values, notes = envfile.read(env_file)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc.__class__.__name__
        hint = " (run as root)" if isinstance(exc, PermissionError) else ""
        raise ConfigError([f"cannot read the environment file {env_file}: {reason}{hint}"]) from None
    notes = [f"{env_file}: {note}" for note in notes]
    env = {name: value for name, value in values.items() if name != "CREDENTIALS_DIRECTORY"}
    if credentials_directory:
        env["CREDENTIALS_DIRECTORY"] = credentials_directory
    elif os.access(credentials, os.R_OK | os.X_OK) and credentials.is_dir():
        env["CREDENTIALS_DIRECTORY"] = str(credentials)
    elif credentials.exists():
        notes.append(f"cannot read the credentials folder {credentials} (run as root): its secrets are not checked")
    else:
        notes.append(f"no credentials folder {credentials}: secrets come only from {env_file}")
    return env, notes


def command_environment(
    environ: Mapping[str, str], env_file: Path | None = None, credentials: Path | None = None
) -> tuple[dict[str, str] | None, list[str]]:
    """The settings a command reads: (None for the environment itself, or the unit's; notes for stderr).

    ``ConfigError`` when the file it must read cannot be read.
    """
    if env_file is not None:
        return service_environment(env_file, credentials or installed(CREDENTIALS, environ))
    if names_settings(environ) or not installed(ETC, environ).is_dir():
        return None, []
    env_file, folder = installed(ENV_FILE, environ), credentials or installed(CREDENTIALS, environ)
    handed = environ.get("CREDENTIALS_DIRECTORY")
    try:
        env, notes = service_environment(env_file, folder, credentials_directory=handed)
    except ConfigError as exc:
        raise ConfigError(
            [
                f"the environment names no settings, so they come from the installed unit's files: {p}"
                for p in exc.problems
            ]
        ) from None
    where = f"{env_file} and {handed or folder}"
    return env, [f"settings from the installed unit's {where} (the environment names none)", *notes]
