"""Retry pacing: one ``Backoff`` for every loop that waits out an outage, and the delay of a job's retry.

A ``Backoff`` doubles its wait from ``initial_s`` up to ``cap_s`` (with optional jitter) and goes back to
``initial_s`` on ``reset``. An ``Outage`` says "X is unavailable" once when it starts and "X is back" once when
it ends, however many loops report it: loops that share a dependency share one ``Outage``.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from collections.abc import Callable

logger = logging.getLogger(__name__)


class Outage:
    """Whether a dependency is down, logged once per outage (warning when it starts, info when it ends)."""

    def __init__(self, what: str, log: logging.Logger | None = None) -> None:
        self.what = what
        self.ok = True
        self._log = log or logger

    def down(self, exc: BaseException | str) -> None:
        """Note a failure; logs only the first of an outage."""
        if self.ok:
            self._log.warning("%s unavailable (%s); retrying with backoff", self.what, exc)
        self.ok = False

    def up(self) -> None:
        """Note a success; logs only the first after an outage."""
        if not self.ok:
            self._log.info("%s is back", self.what)
        self.ok = True


class Backoff:
    """Exponential waits between retries: ``initial_s``, doubling (``factor``), capped at ``cap_s``.

    ``jitter`` spreads each wait by +/- that fraction. ``failed`` returns the wait for this failure (and
    reports it to the ``outage``, if any); ``reset`` (or ``succeeded``) starts over.
    """

    def __init__(
        self,
        initial_s: float = 1.0,
        cap_s: float = 30.0,
        *,
        factor: float = 2.0,
        jitter: float = 0.0,
        outage: Outage | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.initial_s = initial_s
        self.cap_s = cap_s
        self.factor = factor
        self.jitter = jitter
        self.outage = outage
        self.rand = rand
        self._next_s = initial_s

    def failed(self, exc: BaseException | str | None = None) -> float:
        """The wait before the next try; the one after will be longer, up to the cap."""
        if self.outage is not None and exc is not None:
            self.outage.down(exc)
        wait_s = self._next_s
        self._next_s = min(self.cap_s, self._next_s * self.factor)
        if self.jitter:
            wait_s *= 1 - self.jitter + 2 * self.jitter * self.rand()
        return wait_s

    def reset(self) -> None:
        """Start over at ``initial_s``."""
        self._next_s = self.initial_s

    def succeeded(self) -> None:
        """Reset, and end the outage (if any)."""
        self.reset()
        if self.outage is not None:
            self.outage.up()

    async def wait(self, exc: BaseException | str | None = None, stopping: anyio.Event | None = None) -> None:
        """Sleep the next wait, or until ``stopping`` is set."""
        wait_s = self.failed(exc)
        with anyio.move_on_after(wait_s):
            if stopping is None:
                await anyio.sleep_forever()
            else:
                await stopping.wait()


def retry_delay_s(
    attempt: int, base_s: float, *, cap_s: float = 1800, rand: Callable[[], float] = random.random
) -> float:
    """A job's retry delay: base * 4^(attempt-1), +/-20 %, capped (a Backoff that depends on the attempt)."""
    raw = min(cap_s, base_s * 4.0 ** max(0, attempt - 1))
    return float(raw * (0.8 + 0.4 * rand()))
