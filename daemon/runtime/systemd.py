"""systemd integration without a dependency: sd_notify over ``$NOTIFY_SOCKET``, and the watchdog.

``Type=notify``: READY=1 once Redis, Postgres and the listener are up; STATUS= a one-line summary;
WATCHDOG=1 only while every loop keeps its promise to come back (``Progress``); STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

logger = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify datagrams; does nothing when not run by systemd (no ``NOTIFY_SOCKET``)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if address.startswith("@"):
            self.address = b"\0" + address[1:].encode()  # abstract namespace
        elif address.startswith("/"):
            self.address = address
        self.watchdog_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1_000_000
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """Whether systemd gave a notify socket."""
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; False (logged once) if it could not be sent."""
        if self.address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            logger.warning("sd_notify failed: %s", exc)
            return False
        return True

    def ready(self, status: str) -> None:
        """READY=1 with the first STATUS= line."""
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """A new STATUS= line."""
        self.notify(f"STATUS={status}")

    def stopping(self, status: str = "draining") -> None:
        """STOPPING=1: the drain began."""
        self.notify("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        """WATCHDOG=1."""
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Progress:
    """Loops promise to come back within some time; the watchdog is fed only while every promise holds.

    A loop about to wait calls ``expect(name, within_s)``; when it comes back around it calls it again (or
    ``done(name)`` when it ends). A loop stuck past its promise stops the WATCHDOG=1 pings, and systemd
    restarts the daemon. A loop that never promised anything is not watched.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._deadlines: dict[str, float] = {}

    def expect(self, name: str, within_s: float) -> None:
        """Loop ``name`` promises to come back within ``within_s``."""
        self._deadlines[name] = self.clock() + within_s

    def done(self, name: str) -> None:
        """Loop ``name`` ended; stop watching it."""
        self._deadlines.pop(name, None)

    def overdue(self) -> list[str]:
        """The loops past their promise."""
        now = self.clock()
        return sorted(name for name, deadline in self._deadlines.items() if deadline < now)


def timeout_stop_s(env: Mapping[str, str] | None = None) -> float | None:
    """systemd's TimeoutStopUSec for the unit running this process, when we can learn it; else None."""
    env = os.environ if env is None else env
    if "INVOCATION_ID" not in env:
        return None
    unit = _own_unit()
    if unit is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["systemctl", "show", "--property=TimeoutStopUSec", "--value", unit],
            capture_output=True,
            text=True,
            timeout=3,
            check=True,
        ).stdout.strip()
        return parse_timespan_s(out)
    return None


def _own_unit() -> str | None:
    with contextlib.suppress(OSError):
        for line in open("/proc/self/cgroup", encoding="utf-8"):  # noqa: SIM115 - tiny file
            match = re.search(r"/([^/]+\.service)", line)
            if match:
                return match.group(1)
    return None


_SPAN_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_timespan_s(text: str) -> float | None:
    """systemd timespans such as ``1min 30s`` or ``90s``; None for ``infinity`` or nonsense."""
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(us|ms|min|s|h|d)", text)
    if not parts or text.strip() == "infinity":
        return None
    for number, unit in parts:
        total += float(number) * _SPAN_UNITS[unit]
    return total


DEFAULT_TIMEOUT_STOP_S = 90.0  # systemd's DefaultTimeoutStopSec=


def unit_file_timeout_stop_s(path: Path) -> float | None:
    """The stop timeout a unit file gives its service (``TimeoutStopSec=``, else ``TimeoutSec=``, else systemd's
    default of 90 s); None when the file cannot be read or says ``infinity``. For ``check``, which runs outside
    the unit but must refuse what ``run`` under it would."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    section = ""
    found: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if sep and section == "Service" and key.strip() in ("TimeoutStopSec", "TimeoutSec"):
            found[key.strip()] = value.strip()  # the last assignment wins, as in systemd
    if "TimeoutStopSec" not in found and "TimeoutSec" not in found:
        return DEFAULT_TIMEOUT_STOP_S
    value = found.get("TimeoutStopSec") or found.get("TimeoutSec") or ""
    if value.replace(".", "", 1).isdigit():
        return float(value)  # a bare number is seconds
    return parse_timespan_s(value)
