"""Secrets and redaction: a string that never shows itself, and URLs shown without their passwords.

Used by the settings (``config``), the log filter (``logs``) and every message that names a URL.
"""

from __future__ import annotations

import re


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or an f-string."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The value itself: call it only where the value is used, never to show it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


# A URL with its scheme, up to the next blank or quote. Its user info ends at the LAST '@' (a password may
# hold '/' or '@'; a host holds neither), and its password starts after the first ':' of the user info.
_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<rest>[^\s'\"<>]+)")
# libpq and redis-py also take the password as a parameter: ``?password=...`` or ``password=...`` (keyword DSN).
_PASSWORD_PARAM = re.compile(r"(?i)(?P<key>\bpassword=)(?P<pw>[^&\s'\"]+)")


def _split_userinfo(rest: str) -> tuple[str, str, str] | None:
    """(user, password, host and beyond) of what follows ``scheme://``, or None without a password."""
    at = rest.rfind("@")
    if at < 0 or ":" not in rest[:at]:
        return None
    user, password = rest[:at].split(":", 1)
    return user, password, rest[at + 1 :]


def _redact_one(scheme: str, rest: str) -> str:
    parts = _split_userinfo(rest)
    if parts is None:
        return scheme + rest
    user, _, host = parts
    return f"{scheme}{user}:***@{host}"


_WHOLE_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<rest>\S*)")


def redact_url(text: str) -> str:
    """``redis://default:hunter2@host`` -> ``redis://default:***@host``, and ``password=x`` -> ``password=***``.

    A whole value (a configured URL) is taken as one URL, whatever its password holds; in free text (a log
    line, an error) a URL ends at a blank or a quote.
    """
    whole = _WHOLE_URL.fullmatch(text)
    if whole:
        text = _redact_one(whole["scheme"], whole["rest"])
    else:
        text = _URL.sub(lambda m: _redact_one(m["scheme"], m["rest"]), text)
    return _PASSWORD_PARAM.sub(lambda m: f"{m['key']}***", text)


def url_passwords(url: str) -> list[str]:
    """Every password written into the URL value ``url`` (user info or ``password=``), for the log scrubber."""
    found = [m["pw"] for m in _PASSWORD_PARAM.finditer(url)]
    whole = _WHOLE_URL.fullmatch(url)
    parts = _split_userinfo(whole["rest"]) if whole else None
    if parts is not None and parts[1]:
        found.append(parts[1])
    return found
