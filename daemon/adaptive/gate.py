"""The in-flight gate in front of the scraper, and a scraper that feeds the limit its latency and errors.

``Gate`` admits as many scrapes at once as its limit says now (fixed, or adaptive: ``limit.py``).
``MeteredScraper`` times every scrape and reports it to the limit: a 429, a 5xx (other than "not found")
or a timeout is a drop, anything else a latency sample. With ``gate`` it also waits for a slot itself,
which is how the cron mode's queue consumers use ``SEATWATCH_CONCURRENCY=auto``; adaptive checking holds
the slot in the taker instead, so it can skip a check that would start late.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio

from daemon.errors import InvalidScrape, ScrapeError, ScrapeRateLimited, ScrapeRejected, SectionNotFound
from daemon.upstream.scraper import Scraper

if TYPE_CHECKING:
    from collections.abc import Callable

    from daemon.adaptive.limit import Limit
    from daemon.detect import Observation


class Gate:
    """A semaphore whose size is read from ``limit`` at every admission."""

    def __init__(self, limit: Limit, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self.in_flight = 0
        self._freed = anyio.Event()

    def free(self) -> int:
        """Scrape slots free now (the limit ticked first, so an ended probe counts)."""
        self.limit.tick(self.clock())
        return max(0, self.limit.limit - self.in_flight)

    async def acquire(self) -> None:
        """Wait for a free slot and take it."""
        while self.free() <= 0:
            freed = self._freed
            with anyio.move_on_after(1.0):  # a probe ending frees slots without a release
                await freed.wait()
        self.in_flight += 1

    def release(self) -> None:
        """Give a slot back and wake whoever waits for one."""
        self.in_flight -= 1
        self._freed.set()
        self._freed = anyio.Event()


class MeteredScraper(Scraper):
    """A ``Scraper`` that reports each call's latency (or drop) to ``limit``; optionally gated."""

    def __init__(self, inner: Scraper, limit: Limit, gate: Gate | None = None) -> None:
        self.__dict__.update(inner.__dict__)
        self.limit = limit
        self.gate = gate
        self.in_flight = 0

    async def scrape(self, term: str, class_nbr: str) -> Observation:
        """Scrape (inside the gate, when there is one) and report the latency, or the drop, to the limit."""
        if self.gate is not None:
            await self.gate.acquire()
        try:
            return await self._timed(term, class_nbr)
        finally:
            if self.gate is not None:
                self.gate.release()

    async def _timed(self, term: str, class_nbr: str) -> Observation:
        started = time.monotonic()
        self.in_flight += 1
        dropped = False
        try:
            return await super().scrape(term, class_nbr)
        except (SectionNotFound, ScrapeRejected, InvalidScrape):
            raise  # the scraper answered promptly: latency is a fair sample
        except ScrapeRateLimited:
            dropped = True
            raise
        except ScrapeError:
            dropped = True  # 5xx, timeouts, connection errors: the scraper is overloaded or away
            raise
        finally:
            self.in_flight -= 1
            now = time.monotonic()
            self.limit.sample(now - started, now, dropped=dropped, in_flight=self.in_flight)
