"""What the work loops are handed to report on themselves, defined below them so they never import the runtime.

``Progress`` is the watchdog's view (``runtime.systemd.Progress`` is one): a loop promises when it will be
back. ``Metrics`` is the part of the Prometheus registry the loops move (``runtime.metrics.Metrics`` is one):
counters by label and the scrape-duration histogram. Both are structural (``typing.Protocol``): no I/O here.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """What the loops tell the watchdog: when they will be back."""

    def expect(self, name: str, within_s: float) -> None:
        """Loop ``name`` promises to report again within ``within_s``."""

    def done(self, name: str) -> None:
        """Loop ``name`` ended on purpose."""


class Count(Protocol):
    """A counter (or one labelled child of it)."""

    def inc(self, amount: float = 1) -> None:
        """Add ``amount``."""


class LabelledCount(Protocol):
    """A counter with labels: ``labels(...)`` picks the child to move."""

    def labels(self, *labelvalues: str) -> Count:
        """The child counter for these label values."""


class Durations(Protocol):
    """A histogram of durations in seconds."""

    def observe(self, amount: float) -> None:
        """Record one duration."""


class Metrics(Protocol):
    """The counters and histogram the work loops move (read-only attributes, so any richer type fits)."""

    @property
    def sections(self) -> LabelledCount:
        """Section checks by result."""

    @property
    def scrape_seconds(self) -> Durations:
        """Duration of one scrape request."""

    @property
    def scraper_drift(self) -> LabelledCount:
        """Odd describing fields in scraper answers, by field and kind."""

    @property
    def notifications(self) -> LabelledCount:
        """Emails owed, by type."""

    @property
    def emails(self) -> LabelledCount:
        """Emails by type and outcome."""

    @property
    def suppressed(self) -> LabelledCount:
        """Emails kept back by the send-time re-check, by reason."""

    @property
    def ticks(self) -> LabelledCount:
        """Scheduler ticks by result."""

    @property
    def sections_enqueued(self) -> Count:
        """Sections enqueued by ticks."""
