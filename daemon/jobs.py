"""What a job is: one delivery of a section check (``Job``), an entry that is not one (``Malformed``), and the
settled outcome (``Done``). Pure domain, no I/O.

How a job travels (the Stream's entries, and the named objects the queue scripts take and return) is the
wire format beside the scripts, ``daemon.primitives.queue_wire``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal


@dataclass(frozen=True)
class Job:
    """One delivery of a section check. ``attempts`` were spent before this one."""

    entry_id: str
    id: str
    term: str
    class_nbr: str
    attempts: int
    enqueued_ms: int

    @property
    def attempt(self) -> int:
        """1 for the first delivery, 2 for the first retry, ..."""
        return self.attempts + 1


@dataclass(frozen=True)
class Malformed:
    """A stream entry that is not a job: it goes to the dead-letter stream as it is."""

    entry_id: str
    fields: dict[str, str]
    reason: str


PRINTABLE: Final = re.compile(rb"[!-~]+")  # printable ASCII, no blanks: what term and class numbers are


def usable_section(term: str, class_nbr: str) -> bool:
    """Whether (term, class_nbr) can travel as a job: printable ASCII without blanks."""
    return bool(PRINTABLE.fullmatch(term.encode())) and bool(PRINTABLE.fullmatch(class_nbr.encode()))


Action = Literal["ack", "retry", "defer", "requeue", "dead", "poison"]
"""How a delivery was settled: ack (done), retry (spends an attempt), defer (spends none), requeue (back to the
stream now, spends none: interrupted by shutdown), dead (dead-letter), poison (not a job: dead-letter as is)."""


@dataclass(frozen=True)
class Done:
    """A settled delivery: the job (or the entry that was not one), what to do with it, and why."""

    job: Job | Malformed
    action: Action
    delay_s: float = 0.0
    error: str = ""
    attempts: int = 0  # attempts spent after this delivery (what a retry carries forward)
