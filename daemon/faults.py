"""Named fault points for the crash tests: off unless ``SEATWATCH_FAULT_POINT`` names one.

The kill -9 matrix (tests/integration/test_kill_matrix.py) starts a real daemon with
``SEATWATCH_FAULT_POINT=after_claim`` (say); the first time the process passes that point it logs the fact
and SIGKILLs itself, so it dies exactly there, between two statements, with no cleanup of any kind.
``name:N`` fires on the N-th passage instead of the first. Unset (production), a point costs one comparison.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Final

logger = logging.getLogger(__name__)

POINTS: Final = frozenset(
    {
        # pipeline, one section
        "after_scrape",
        "after_observe",
        "after_claim",
        "after_outbox_insert",
        "before_commit",
        "after_commit",
        "before_ack",
        # outbox
        "batch_formed",
        "reply_received",
    }
)

_armed: str | None = None
_remaining = 0


def arm(spec: str | None) -> None:
    """Arm ``name`` or ``name:N`` (read from the environment once, at import)."""
    global _armed, _remaining
    if not spec:
        _armed, _remaining = None, 0
        return
    name, _, count = spec.partition(":")
    if name not in POINTS:
        raise ValueError(f"SEATWATCH_FAULT_POINT: unknown point {name!r}")
    _armed, _remaining = name, int(count or 1)


def point(name: str) -> None:
    """The process dies here, by SIGKILL, if this point is armed (and its passage count is reached)."""
    global _remaining
    if _armed != name:
        return
    _remaining -= 1
    if _remaining > 0:
        return
    logger.warning("fault point %s reached: SIGKILL", name)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


arm(os.environ.get("SEATWATCH_FAULT_POINT"))
