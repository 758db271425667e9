"""The environment the systemd unit gives the daemon, rebuilt for ``seatwatch check --env-file``.

The unit reads its settings from ``EnvironmentFile=`` and hands the secrets over with
``LoadCredential=seatwatch:/etc/seatwatch/credentials``: every file there becomes a credential named
``seatwatch_<file>`` in ``$CREDENTIALS_DIRECTORY``. ``check`` run by root reads the same two places itself,
so what it validates is what the service will get. Nothing else of the caller's environment is used.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from daemon import envfile
from daemon.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path


def service_environment(env_file: Path, credentials: Path) -> tuple[dict[str, str], list[str]]:
    """(environment, notes for the operator); ``ConfigError`` when the environment file cannot be read."""
    try:
        values, notes = envfile.read(env_file)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc.__class__.__name__
        raise ConfigError([f"cannot read the environment file {env_file}: {reason}"]) from None
    notes = [f"{env_file}: {note}" for note in notes]
    env = {name: value for name, value in values.items() if name != "CREDENTIALS_DIRECTORY"}
    if os.access(credentials, os.R_OK | os.X_OK) and credentials.is_dir():
        env["CREDENTIALS_DIRECTORY"] = str(credentials)
    elif credentials.exists():
        notes.append(f"cannot read the credentials folder {credentials} (run as root): its secrets are not checked")
    else:
        notes.append(f"no credentials folder {credentials}: secrets come only from {env_file}")
    return env, notes
