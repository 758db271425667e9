"""The exception tree. Callers catch the grouping bases; leaves say what happened.

Wire errors (HTTP, Redis, asyncpg) are translated at the boundary with ``raise ... from exc`` so the
cause stays in the traceback while the type says what the rest of the daemon should do about it.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Literal


class Exit(IntEnum):
    """Every exit status seatwatch returns, in one place (systemd's unit and the README rely on these)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    LOCKED = 3  # `tick`: another holder has the cron lock
    CONFIG = 78  # EX_CONFIG: systemd does not restart on it (RestartPreventExitStatus=78)


class SeatwatchError(Exception):
    """Root of every error seatwatch raises on purpose."""


class ConfigError(SeatwatchError):
    """The configuration is unusable; ``problems`` lists every reason at once."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


class UpstreamError(SeatwatchError):
    """An HTTP service seatwatch depends on answered badly or not at all."""


class ScrapeError(UpstreamError):
    """The scraper could not give a usable observation of a section.

    ``breaker_failure`` says whether the circuit breaker should count it against the scraper.
    """

    breaker_failure = True


class SectionNotFound(ScrapeError):
    """The scraper says the section does not exist in that term; the job is complete."""

    breaker_failure = False


class ScrapeRejected(ScrapeError):
    """The scraper refused the request itself (HTTP 400): retrying cannot help."""

    breaker_failure = False


class ScrapeRateLimited(ScrapeError):
    """The scraper answered 429; try again after ``retry_after_s``."""

    breaker_failure = False

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InvalidScrape(ScrapeError):
    """The scraper answered 200 with a body that does not validate: a failure, never a state change."""


class EmailError(UpstreamError):
    """Resend refused or failed a request."""


class EmailRetry(EmailError):
    """Try the same batch again later (429, 5xx, network, a key in use).

    ``ambiguous``: the batch may have been delivered (no answer, or a 5xx). ``pause_all``: the cause is
    not this batch (a rate limit, our API key), so no other batch should go before ``retry_after_s``.
    """

    def __init__(
        self, message: str, retry_after_s: float | None = None, *, ambiguous: bool, pause_all: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.ambiguous = ambiguous
        self.pause_all = pause_all


class EmailQuotaExceeded(EmailRetry):
    """Resend's daily or monthly sending quota is used up (a 429 naming it): nothing goes until it resets.

    ``period`` is ``daily`` (resets at the next UTC midnight) or ``monthly`` (the first of the next month, UTC);
    ``retry_after_s`` is Resend's Retry-After when it sent one.
    """

    def __init__(self, message: str, period: str, retry_after_s: float | None = None) -> None:
        super().__init__(message, retry_after_s, ambiguous=False, pause_all=True)
        self.period = period


class EmailRejected(EmailError):
    """Resend refused the batch's content (400/422): nothing was sent, retrying the same bytes cannot help."""


class JobError(SeatwatchError):
    """Tells the queue what to do with a job that did not complete."""


class RetryableJobError(JobError):
    """Try again later; spends one attempt. ``delay_s`` overrides the backoff when given."""

    def __init__(self, message: str, delay_s: float | None = None) -> None:
        super().__init__(message)
        self.delay_s = delay_s


class DeferJob(JobError):
    """Try again after ``delay_s`` without spending an attempt (rate limits, a database outage)."""

    def __init__(self, message: str, delay_s: float) -> None:
        super().__init__(message)
        self.delay_s = delay_s


class PermanentJobError(JobError):
    """Retrying cannot help: dead-letter the job at once with this reason."""


class LockNotOwned(SeatwatchError):
    """The cron lock is held by someone else, or was lost (expired) before release."""


class LockBusy(LockNotOwned):
    """Someone else holds the lock."""

    def __init__(self, holder: str, acquired_at_ms: int, expires_at_ms: int) -> None:
        super().__init__(f"cron lock is held by {holder!r}")
        self.holder = holder
        self.acquired_at_ms = acquired_at_ms
        self.expires_at_ms = expires_at_ms


class SlotDone(SeatwatchError):
    """The cron slot already ran (on this daemon or another)."""


class StoreUnavailable(SeatwatchError):
    """Redis or Postgres cannot be reached (connection refused, reset, timed out): wait and retry.

    Raised at the client boundary (``primitives.clients``, ``store.pool``) from the driver's error, which stays
    the ``__cause__``; code above catches this name instead of each driver's exception tuple.
    """

    def __init__(self, store: Literal["redis", "postgres"], detail: str) -> None:
        super().__init__(f"{store} unavailable: {detail}")
        self.store = store


class FatalStartError(SeatwatchError):
    """Start cannot succeed by waiting (a script Redis refuses, an unmigrated database)."""


class EmbeddedUnavailable(SeatwatchError, RuntimeError):
    """The embedded servers are not there (x86_64: the ``embedded`` extra; arm64: none exist, use the distro's)."""


def driver_error(exc: BaseException) -> BaseException:
    """The driver's error behind a ``StoreUnavailable`` (what an operator knows), else ``exc`` itself."""
    if isinstance(exc, StoreUnavailable) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


def error_name(exc: BaseException) -> str:
    """The class name of ``driver_error(exc)``."""
    return driver_error(exc).__class__.__name__
