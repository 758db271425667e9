"""Change detection: (previous state, new observation) -> what happened. Pure; no I/O.

* A first observation (no previous state) records state and notifies nobody.
* open seats = ``non_reserved_seats`` when known, else ``seats_available``.
* A seat notification only on the edge previous open == 0 and new open > 0 (2 -> 5 sends nothing).
* An instructor notification only when the previous instructor was exactly ``Staff`` and the new one is a
  non-empty name other than ``Staff``.
* When open seats drop from > 0 to 0 the seat claims are reset, so the next opening notifies again.
* The web app's own observation (a newer ``class_states`` row of the same term, ``PreviousState.snapshot``)
  sits between the previous state and the new one: the edges are judged along previous -> snapshot -> new.
  A fill seen only by the web app (3 -> 0 -> 2) resets the claims and the opening after it notifies; an
  opening seen only by it (0 -> 2 -> 2) is still owed to those waiting; an opening it saw that is gone
  again (0 -> 2 -> 0) resets the claims and notifies nobody.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Final, TypeVar

STAFF: Final = "Staff"
SEAT_AVAILABLE: Final = "seat_available"
INSTRUCTOR_ASSIGNED: Final = "instructor_assigned"
_T = TypeVar("_T")


Drift = tuple[str, str]
"""One odd describing field of a scraper answer: (field, kind), e.g. ("instructor", "blank")."""


@dataclass(frozen=True)
class Observation:
    """One scrape of a section whose seat counts are trusted.

    The describing fields are None when unknown (absent, blank, or of a type that is not text); a None
    instructor is not a name. ``drift`` lists what was odd about the answer, for metrics and logs only.
    """

    subject: str | None
    catalog_nbr: str | None
    title: str | None
    instructor: str | None
    seats_available: int
    seats_capacity: int
    non_reserved_seats: int | None
    location: str | None
    meeting_times: str | None
    drift: tuple[Drift, ...] = field(default=(), compare=False)

    @property
    def open_seats(self) -> int:
        """Seats open to anyone: the non-reserved count when the class search gives one."""
        return self.non_reserved_seats if self.non_reserved_seats is not None else self.seats_available

    def row(self) -> tuple[object, ...]:
        """The values in the order ``seatwatch_observe_v3`` takes them after term and class_nbr."""
        return (
            self.subject,
            self.catalog_nbr,
            self.title,
            self.instructor,
            self.seats_available,
            self.seats_capacity,
            self.non_reserved_seats,
            self.location,
            self.meeting_times,
        )


@dataclass(frozen=True)
class PreviousState:
    """What the section looked like before; ``source`` is 'seatwatch' or 'class_states' (cutover).

    ``snapshot``: the web app's observation written to ``class_states`` after seatwatch's own, if any.
    """

    source: str
    instructor: str | None
    seats_available: int | None
    non_reserved_seats: int | None
    snapshot: PreviousState | None = None

    @property
    def open_seats(self) -> int | None:
        """Seats that were open (``open_seats`` of the stored counts)."""
        return open_seats(self.seats_available, self.non_reserved_seats)


def open_seats(seats_available: int | None, non_reserved_seats: int | None) -> int | None:
    """The non-reserved count when known, else the available count."""
    return non_reserved_seats if non_reserved_seats is not None else seats_available


@dataclass(frozen=True)
class Changes:
    """What changed between two observations of a section."""

    first_observation: bool = False
    seat_opened: bool = False
    seats_filled: bool = False
    instructor_assigned: bool = False

    @property
    def notification_types(self) -> list[str]:
        """The notification types this change sends (seat available, instructor assigned)."""
        types = []
        if self.seat_opened:
            types.append(SEAT_AVAILABLE)
        if self.instructor_assigned:
            types.append(INSTRUCTOR_ASSIGNED)
        return types

    @property
    def touches_claims(self) -> bool:
        """Whether the transaction has claim work to do (reset or new claims)."""
        return self.seats_filled or bool(self.notification_types)


def detect(previous: PreviousState | None, new: Observation) -> Changes:
    """The changes from ``previous`` (None: never seen) to ``new``; pure, no I/O."""
    if previous is None:
        return Changes(first_observation=True)
    path = [previous] if previous.snapshot is None else [previous, previous.snapshot]
    seats = [state.open_seats for state in path] + [new.open_seats]
    # An instructor unknown in between (None) carries the one before it forward.
    names: list[str | None] = []
    for state in path:
        names.append(state.instructor if state.instructor is not None or not names else names[-1])
    name = (new.instructor or "").strip()
    names.append(name)
    return Changes(
        seat_opened=new.open_seats > 0 and any(a == 0 and b is not None and b > 0 for a, b in _steps(seats)),
        seats_filled=any(a is not None and a > 0 and b == 0 for a, b in _steps(seats)),
        instructor_assigned=name not in ("", STAFF)
        and any(a == STAFF and b is not None and b.strip() not in ("", STAFF) for a, b in _steps(names)),
    )


def _steps(values: list[_T]) -> list[tuple[_T, _T]]:
    """Consecutive pairs: the edges along a path of states."""
    return list(itertools.pairwise(values))
