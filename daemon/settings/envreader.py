"""Reading environment variables for ``Settings``: each reader records a problem instead of raising, so
``config`` can report every problem of a configuration together (exit 78), and no secret value is ever part
of a problem's text."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from daemon.secret import redact_url

if TYPE_CHECKING:
    from collections.abc import Mapping

C = TypeVar("C", bound=str)


class EnvReader:
    """Typed readers over one environment; what is wrong goes into ``problems``."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []
        self._reported: set[str] = set()  # variables that already have a problem of their own

    def raw(self, name: str, *aliases: str) -> str | None:
        """The first of ``name`` and its ``aliases`` that is set, stripped; None when none is."""
        for key in (name, *aliases):
            value = self.env.get(key)
            if value is not None and value.strip() != "":
                return value.strip()
        return None

    def secret(self, name: str, *aliases: str) -> str | None:
        """The value from NAME, NAME_FILE or $CREDENTIALS_DIRECTORY/name, first of each alias."""
        for key in (name, *aliases):
            direct = self.env.get(key)
            file_var = self.env.get(f"{key}_FILE")
            direct = direct.strip() if direct else None
            file_var = file_var.strip() if file_var else None
            if direct and file_var:
                self.problems.append(f"{key} and {key}_FILE are both set; set only one")
                self._reported.add(name)
                return None
            if direct:
                return direct
            if file_var:
                return self._read_secret_file(name, f"{key}_FILE", Path(file_var))
            cred_dir = self.env.get("CREDENTIALS_DIRECTORY")
            # `name`, or `seatwatch_name` from the unit's `LoadCredential=seatwatch:/etc/seatwatch/credentials`
            # (a folder: each file becomes a credential named `seatwatch_<file>`, and a missing one is no error).
            for credential in (key.lower(), f"seatwatch_{key.lower()}"):
                path = Path(cred_dir) / credential if cred_dir else None
                if path is not None and path.is_file():
                    return self._read_secret_file(name, f"credential {credential}", path)
        return None

    def _read_secret_file(self, name: str, label: str, path: Path) -> str | None:
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            self.problems.append(f"{label}: cannot read {path}: {exc.strerror or exc.__class__.__name__}")
            self._reported.add(name)
            return None
        if not value:
            self.problems.append(f"{label}: {path} is empty")
            self._reported.add(name)
            return None
        return value

    def url(self, name: str, value: str, schemes: tuple[str, ...]) -> str:
        """``value``, with a problem unless it is a URL of one of ``schemes`` with a host (shown redacted)."""
        if not value:
            return value
        try:
            parts = urlsplit(value)
        except ValueError:
            self.problems.append(f"{name} is not a valid URL: {redact_url(value)!r}")
            return value
        if parts.scheme not in schemes:
            allowed = ", ".join(f"{s}://" for s in schemes)
            self.problems.append(f"{name} must start with {allowed} (got {redact_url(value)!r})")
        elif parts.scheme != "unix" and not parts.hostname and "host=" not in parts.query:
            self.problems.append(f"{name} has no host: {redact_url(value)!r}")
        elif parts.scheme == "unix" and not parts.path:
            self.problems.append(f"{name} has no socket path: {redact_url(value)!r}")
        else:
            try:
                _ = parts.port
            except ValueError:
                self.problems.append(f"{name} has an invalid port: {redact_url(value)!r}")
        return value

    def choice(self, name: str, default: C, options: tuple[C, ...]) -> C:
        """One of ``options`` (case-insensitive), or ``default`` and a problem."""
        value = (self.raw(name) or default).lower()
        for option in options:
            if value == option:
                return option
        self.problems.append(f"{name} must be one of {', '.join(options)} (got {value!r})")
        return default

    def integer(self, name: str, default: int, *, low: int = 1, high: int = 10**9) -> int:
        """A whole number within ``low``..``high``, or ``default`` and a problem."""
        text = self.raw(name)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            self.problems.append(f"{name} must be a whole number (got {text!r})")
            return default
        if not low <= value <= high:
            self.problems.append(f"{name} must be between {low} and {high} (got {value})")
            return default
        return value

    def seconds(self, name: str, default: float, *, low: float = 0.001, high: float = 86400 * 7) -> float:
        """A duration in seconds (fractions allowed) within ``low``..``high``, or ``default`` and a problem."""
        text = self.raw(name)
        if text is None:
            return default
        try:
            value = float(text)
        except ValueError:
            self.problems.append(f"{name} must be a number of seconds (got {text!r})")
            return default
        if not math.isfinite(value) or not low <= value <= high:
            self.problems.append(f"{name} must be between {low:g} and {high:g} seconds (got {text})")
            return default
        return value
