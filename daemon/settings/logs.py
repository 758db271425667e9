"""Log lines for journald (``<N>`` syslog priority on every line) or as JSON, with secrets scrubbed.

Under systemd, stdout goes to the journal and the ``<N>`` prefix sets each line's priority
(``SyslogLevelPrefix=yes`` is systemd's default); ``journalctl -p warning`` then works as expected.
A traceback is one event, so every one of its lines carries the prefix: journald splits on newlines.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

import orjson

from daemon.secret import redact_url

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

# syslog priorities: 2 crit, 3 err, 4 warning, 5 notice, 6 info, 7 debug
_PRIORITY: Final = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def priority(levelno: int) -> int:
    """The syslog priority (0-7) journald shows for a logging level."""
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class _Scrubber:
    """Removes known secret values and URL passwords from any text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = redact_url(text)
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "**********")
        return text


class JournalFormatter(logging.Formatter):
    """``<6>daemon.primitives.queue: message``; a timestamp too when stdout is not the journal."""

    def __init__(self, scrub: _Scrubber, *, timestamps: bool) -> None:
        super().__init__()
        self.scrub = scrub
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        """One line, ``<N>`` priority first, continuation lines indented."""
        text = record.getMessage()
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        elif record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        text = self.scrub(text)
        head = f"<{priority(record.levelno)}>"
        if self.timestamps:
            stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            head += f"{stamp} {record.levelname} "
        head += f"{record.name}: "
        return "\n".join(head + line for line in text.splitlines() or [""])


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, priority, logger, msg, and exc when there is one.

    journald reads a line's priority only from a ``<N>`` prefix (and ignores a ``priority`` field inside
    the message), so when stdout is the journal each line starts with ``<N>``: journald strips it, sets
    PRIORITY=N, and keeps the JSON object as the MESSAGE. Elsewhere (a pipe into jq) the lines are bare JSON.
    """

    def __init__(self, scrub: _Scrubber, *, journal: bool = False) -> None:
        super().__init__()
        self.scrub = scrub
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        """One JSON object per record."""
        event: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "priority": priority(record.levelno),
            "logger": record.name,
            "msg": self.scrub(record.getMessage()),
        }
        if record.exc_info:
            event["exc"] = self.scrub(self.formatException(record.exc_info))
        line = orjson.dumps(event).decode()  # one line: orjson escapes every newline
        return f"<{event['priority']}>{line}" if self.journal else line


def stdout_is_journal(stream: object, env: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journal's stdout socket: ``$JOURNAL_STREAM`` names its device and inode.

    systemd sets JOURNAL_STREAM for a service whose stdout goes to the journal; a child that redirected its
    stdout inherits the variable, hence the comparison (as sd_journal_stream_fd(3) advises).
    """
    env = os.environ if env is None else env
    device, _, inode = env.get("JOURNAL_STREAM", "").partition(":")
    try:
        fd = stream.fileno()  # type: ignore[attr-defined]
        info = os.fstat(fd)
    except (AttributeError, OSError, ValueError):
        return False
    return f"{info.st_dev}:{info.st_ino}" == f"{device}:{inode}"


class _PoolFloorNoise(logging.Filter):
    """asyncpg's pool logs "Failed to restore the pool connection floor; retrying" with a 50-line traceback on
    every reconnect attempt while Postgres is away (hundreds of warning lines a minute). This keeps the first
    of an outage as one warning line naming the error, and turns the rest, and every traceback, into debug
    lines. ``postgres_back`` (the monitor's probe answering again) ends the outage."""

    PREFIX: Final = "Failed to restore the pool connection floor"

    def __init__(self) -> None:
        super().__init__()
        self.warned = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.PREFIX):
            return True
        debug = logging.getLogger().isEnabledFor(logging.DEBUG)
        if self.warned:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return debug
        self.warned = True
        cause = record.exc_info[1] if record.exc_info else None
        if debug and record.exc_info:
            logging.getLogger(record.name).debug("pool connection floor: traceback", exc_info=record.exc_info)
        record.msg = "Postgres: the pool cannot reopen its connections (%s); retrying (said once per outage)"
        record.args = (f"{cause.__class__.__name__}: {cause}" if cause else "unknown error",)
        record.exc_info, record.exc_text = None, None
        return True


_pool_floor = _PoolFloorNoise()
logging.getLogger("asyncpg.pool").addFilter(_pool_floor)


def postgres_back() -> None:
    """Postgres answers again: the next pool-floor failure starts a new outage (and is warned about once)."""
    _pool_floor.warned = False


def configure(*, fmt: str = "text", level: str = "info", secrets: Iterable[str] = (), stream: object = None) -> None:
    """Send every log record to stdout in the chosen format, scrubbing ``secrets``."""
    scrub = _Scrubber(secrets)
    handler = logging.StreamHandler(stream or sys.stdout)  # type: ignore[arg-type]
    # One rule for both formats: the stream is the journal when JOURNAL_STREAM names its device and inode.
    journal = stdout_is_journal(handler.stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(scrub, journal=journal))
    else:
        handler.setFormatter(JournalFormatter(scrub, timestamps=not journal))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Library chatter below warning is noise in the journal.
    for name in ("httpx", "httpcore", "asyncio", "pgserver"):
        logging.getLogger(name).setLevel(logging.WARNING)


def mask_email(address: str) -> str:
    """``ada@example.edu`` -> ``a***@example.edu``: enough to tell users apart, not to mail them."""
    local, _, domain = address.partition("@")
    if not domain:
        return "***"
    return f"{local[:1]}***@{domain}"
