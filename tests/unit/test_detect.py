"""detect(previous, observation) against an independent reference model of SPEC §7 step 3."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from daemon.detect import (
    INSTRUCTOR_ASSIGNED,
    SEAT_AVAILABLE,
    Changes,
    Observation,
    PreviousState,
    detect,
)


def obs(
    seats: int = 0, non_reserved: int | None = None, instructor: str | None = "Staff", capacity: int = 40
) -> Observation:
    return Observation(
        subject="CSE",
        catalog_nbr="110",
        title="Principles of Programming",
        instructor=instructor,
        seats_available=seats,
        seats_capacity=capacity,
        non_reserved_seats=non_reserved,
        location="Tempe",
        meeting_times="MWF 9:00",
    )


def prev(seats: int | None = 0, non_reserved: int | None = None, instructor: str | None = "Staff") -> PreviousState:
    return PreviousState(
        source="seatwatch", instructor=instructor, seats_available=seats, non_reserved_seats=non_reserved
    )


# -- the reference model ------------------------------------------------------------------------------------


def reference(previous: PreviousState | None, new: Observation) -> dict[str, bool]:
    """SPEC §7, written out case by case without sharing code with daemon.detect."""
    result = {"first": False, "opened": False, "filled": False, "instructor": False}
    if previous is None:
        result["first"] = True
        return result
    # open seats: the non-reserved count wins whenever the scraper gave one
    before = previous.seats_available if previous.non_reserved_seats is None else previous.non_reserved_seats
    after = new.seats_available if new.non_reserved_seats is None else new.non_reserved_seats
    if before is not None:
        if before == 0 and after > 0:
            result["opened"] = True
        if before > 0 and after == 0:
            result["filled"] = True
    if previous.instructor is not None and previous.instructor == "Staff":
        name = "" if new.instructor is None else new.instructor.strip()
        if len(name) > 0 and name != "Staff":
            result["instructor"] = True
    return result


seat_counts = st.integers(min_value=0, max_value=6)
instructors = st.one_of(
    st.sampled_from(["Staff", " Staff", "Staff ", "staff", "STAFF", "", "   ", "Ada Lovelace", " Grace Hopper "]),
    st.text(max_size=8),
)
previous_states = st.builds(
    PreviousState,
    source=st.sampled_from(["seatwatch", "class_states"]),
    instructor=st.one_of(st.none(), instructors),
    seats_available=st.one_of(st.none(), seat_counts),
    non_reserved_seats=st.one_of(st.none(), seat_counts),
)
observations = st.builds(
    obs,
    seats=seat_counts,
    non_reserved=st.one_of(st.none(), seat_counts),
    instructor=st.one_of(st.none(), instructors),
)


@given(previous=st.one_of(st.none(), previous_states), new=observations)
def test_detect_matches_reference(previous: PreviousState | None, new: Observation) -> None:
    """For any previous state and observation, detect agrees with the reference model on every flag."""
    changes = detect(previous, new)
    expected = reference(previous, new)
    assert changes.first_observation == expected["first"]
    assert changes.seat_opened == expected["opened"]
    assert changes.seats_filled == expected["filled"]
    assert changes.instructor_assigned == expected["instructor"]
    types = ([SEAT_AVAILABLE] if expected["opened"] else []) + ([INSTRUCTOR_ASSIGNED] if expected["instructor"] else [])
    assert changes.notification_types == types
    assert changes.touches_claims == (expected["filled"] or bool(types))


@given(new=observations)
def test_first_observation_notifies_nobody(new: Observation) -> None:
    """With no previous state nothing is notified and no claims are touched, whatever was scraped."""
    changes = detect(None, new)
    assert changes == Changes(first_observation=True)
    assert changes.notification_types == []
    assert not changes.touches_claims


def test_seat_edge_zero_to_positive() -> None:
    """0 -> 3 open seats is a seat notification."""
    changes = detect(prev(seats=0), obs(seats=3))
    assert changes.seat_opened
    assert changes.notification_types == [SEAT_AVAILABLE]


def test_more_seats_is_not_an_edge() -> None:
    """2 -> 5 open seats sends nothing."""
    changes = detect(prev(seats=2), obs(seats=5))
    assert changes == Changes()
    assert changes.notification_types == []


def test_fill_resets_claims() -> None:
    """3 -> 0 open seats is a fill: claims are reset, nobody notified."""
    changes = detect(prev(seats=3), obs(seats=0))
    assert changes.seats_filled
    assert changes.notification_types == []
    assert changes.touches_claims


def test_non_reserved_zero_is_closed() -> None:
    """non_reserved 0 with seats_available 5 counts as closed: no notification, and a fill from open."""
    assert detect(prev(seats=0), obs(seats=5, non_reserved=0)).notification_types == []
    assert detect(prev(seats=4), obs(seats=5, non_reserved=0)).seats_filled


def test_non_reserved_opening() -> None:
    """Previous non_reserved 0 (seats 5) -> non_reserved 2 is a seat edge."""
    assert detect(prev(seats=5, non_reserved=0), obs(seats=7, non_reserved=2)).seat_opened


def test_unknown_previous_seats_no_edge() -> None:
    """A previous state without any seat count gives neither an opening nor a fill."""
    changes = detect(prev(seats=None, non_reserved=None), obs(seats=4))
    assert not changes.seat_opened
    assert not changes.seats_filled


def test_instructor_assigned_from_staff() -> None:
    """Staff -> a real name is an instructor notification."""
    assert detect(prev(instructor="Staff"), obs(instructor="Ada Lovelace")).notification_types == [INSTRUCTOR_ASSIGNED]


def test_instructor_none_previous_no_edge() -> None:
    """A previous instructor of None (unknown) is not 'Staff': no notification."""
    assert not detect(prev(instructor=None), obs(instructor="Ada Lovelace")).instructor_assigned


def test_instructor_staff_must_be_exact() -> None:
    """Only exactly 'Staff' counts as unassigned before: 'staff' or ' Staff' do not."""
    assert not detect(prev(instructor="staff"), obs(instructor="Ada Lovelace")).instructor_assigned
    assert not detect(prev(instructor=" Staff"), obs(instructor="Ada Lovelace")).instructor_assigned


def test_instructor_blank_or_staff_after_is_not_assigned() -> None:
    """Staff -> blank, or Staff -> ' Staff ' (padded), is not an assignment."""
    assert not detect(prev(instructor="Staff"), obs(instructor="   ")).instructor_assigned
    assert not detect(prev(instructor="Staff"), obs(instructor=" Staff ")).instructor_assigned


def test_instructor_change_between_names_is_not_assigned() -> None:
    """One name -> another name is not an assignment."""
    assert not detect(prev(instructor="Ada Lovelace"), obs(instructor="Grace Hopper")).instructor_assigned


def test_both_notifications_in_order() -> None:
    """A seat opening and an instructor assignment together give both types, seat first."""
    changes = detect(prev(seats=0, instructor="Staff"), obs(seats=1, instructor="Ada Lovelace"))
    assert changes.notification_types == [SEAT_AVAILABLE, INSTRUCTOR_ASSIGNED]


def test_open_seats_properties() -> None:
    """open_seats is non_reserved when known, else seats_available, for states and observations."""
    assert obs(seats=5, non_reserved=2).open_seats == 2
    assert obs(seats=5).open_seats == 5
    assert prev(seats=5, non_reserved=0).open_seats == 0
    assert prev(seats=None, non_reserved=None).open_seats is None


# -- the web app's observation in between (SPEC §6) ----------------------------------------------------------


def via(previous: PreviousState, snapshot: PreviousState) -> PreviousState:
    return PreviousState(
        previous.source, previous.instructor, previous.seats_available, previous.non_reserved_seats, snapshot
    )


def test_fill_seen_only_by_the_web_app_resets_and_the_reopening_notifies() -> None:
    """3 -> (web app) 0 -> 2: the claims are reset and the opening notifies."""
    changes = detect(via(prev(3), prev(0)), obs(2))
    assert changes.seats_filled
    assert changes.seat_opened


def test_opening_seen_only_by_the_web_app_is_owed() -> None:
    """0 -> (web app) 2 -> 2: an opening, no reset."""
    changes = detect(via(prev(0), prev(2)), obs(2))
    assert changes.seat_opened
    assert not changes.seats_filled


def test_opening_gone_again_resets_without_notifying() -> None:
    """0 -> (web app) 2 -> 0: a fill (reset), no opening."""
    changes = detect(via(prev(0), prev(2)), obs(0))
    assert changes.seats_filled
    assert not changes.seat_opened


def test_snapshot_without_movement_changes_nothing() -> None:
    """3 -> (web app) 4 -> 2: no edge anywhere."""
    assert not detect(via(prev(3), prev(4)), obs(2)).touches_claims


def test_instructor_assigned_seen_only_by_the_web_app_is_owed() -> None:
    """Staff -> (web app) a name -> that name: the instructor email is owed; an unknown name in between is not."""
    assert detect(via(prev(0), prev(0, instructor="Ada")), obs(0, instructor="Ada")).instructor_assigned
    assert detect(via(prev(0), prev(0, instructor=None)), obs(0, instructor="Ada")).instructor_assigned
    renamed = via(prev(0, instructor="Ada"), prev(0, instructor="Bo"))
    assert not detect(renamed, obs(0, instructor="Bo")).instructor_assigned
