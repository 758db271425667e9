"""The exception tree. Callers catch the grouping bases; leaves say what happened.

Wire errors (HTTP, Redis, asyncpg) are translated at the boundary with ``raise ... from exc`` so the
cause stays in the traceback while the type says what the rest of the daemon should do about it.
"""

from __future__ import annotations


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
