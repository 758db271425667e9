"""The scraper's answers mapped onto observations and the error tree (SPEC §7 step 2), without I/O."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.detect import Observation
from daemon.errors import (
    InvalidScrape,
    ScrapeError,
    ScrapeRateLimited,
    ScrapeRejected,
    SectionNotFound,
)
from daemon.upstream.scraper import interpret, parse_observation, parse_retry_after


def data(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "subject": "CSE",
        "catalog_nbr": "110",
        "title": "Principles of Programming",
        "instructor": "Staff",
        "seats_available": 0,
        "seats_capacity": 150,
        "non_reserved_seats": None,
        "location": "Tempe - COOR 170",
        "meeting_times": "MWF 9:00 AM - 9:50 AM",
    }
    fields.update(overrides)
    return fields


def body(**overrides: Any) -> dict[str, Any]:
    return {"success": True, "data": data(**overrides)}


def ok(content: Any) -> Observation:
    return interpret(200, orjson.dumps(content))


# -- valid bodies ------------------------------------------------------------------------------------------


def test_valid_body() -> None:
    """A valid 200 body becomes an Observation carrying every field."""
    observation = ok(body(non_reserved_seats=2, seats_available=4))
    assert observation == Observation(
        subject="CSE",
        catalog_nbr="110",
        title="Principles of Programming",
        instructor="Staff",
        seats_available=4,
        seats_capacity=150,
        non_reserved_seats=2,
        location="Tempe - COOR 170",
        meeting_times="MWF 9:00 AM - 9:50 AM",
    )


def test_optional_fields_may_be_absent() -> None:
    """title, location, meeting_times and non_reserved_seats may be missing: they read as None."""
    minimal = {k: v for k, v in data().items() if k in ("subject", "catalog_nbr", "instructor")}
    minimal.update(seats_available=3, seats_capacity=10)
    observation = ok({"success": True, "data": minimal})
    assert (observation.title, observation.location, observation.meeting_times) == (None, None, None)
    assert observation.non_reserved_seats is None
    assert observation.open_seats == 3


def test_extra_fields_ignored() -> None:
    """Unknown fields in data or at the top level do not make a body invalid."""
    content = body(campus="TEMPE")
    content["timestamp"] = "2025-01-01T00:00:00Z"
    assert ok(content).seats_capacity == 150


def test_zero_counts_are_fine() -> None:
    """0 seats of 0 capacity is a valid (closed) observation."""
    observation = ok(body(seats_available=0, seats_capacity=0, non_reserved_seats=0))
    assert observation.open_seats == 0


# -- invalid bodies ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["seats_available", "seats_capacity"])
def test_missing_seat_count_is_invalid(missing: str) -> None:
    """A missing seat count is an InvalidScrape naming it, never a 0 that would fake a fill."""
    content = body()
    del content["data"][missing]
    with pytest.raises(InvalidScrape, match=f"{missing} is missing"):
        ok(content)


@pytest.mark.parametrize("missing", ["seats_available", "seats_capacity"])
def test_null_seat_count_is_invalid(missing: str) -> None:
    """A null seat count is invalid just like a missing one."""
    with pytest.raises(InvalidScrape, match=missing):
        ok(body(**{missing: None}))


@pytest.mark.parametrize("field", ["seats_available", "seats_capacity", "non_reserved_seats"])
@pytest.mark.parametrize("value", [True, False, -1, 2.0, 2.5, "5", "", [3], {"n": 3}, 100_001])
def test_bad_counts_rejected(field: str, value: Any) -> None:
    """Bools, negatives, floats (even whole), strings, lists, objects and absurd numbers are not seat counts."""
    with pytest.raises(InvalidScrape, match=f"{field} is not a seat count"):
        ok(body(**{field: value}))


@pytest.mark.parametrize(
    ("field", "value", "expected", "kinds"),
    [
        # the bug of issue 9: a blank instructor dead-lettered the section; it is simply not a name
        ("instructor", "", None, [("instructor", "blank")]),
        ("instructor", "   ", None, [("instructor", "blank")]),
        ("instructor", None, None, [("instructor", "missing")]),
        ("instructor", 5, None, [("instructor", "number")]),
        ("instructor", ["Ada L", "Grace H"], "Ada L; Grace H", [("instructor", "list")]),
        ("instructor", {"name": "Ada"}, None, [("instructor", "object")]),
        ("subject", None, None, [("subject", "missing")]),
        ("subject", "", None, [("subject", "blank")]),
        ("subject", "C" * 33, None, [("subject", "not_a_code")]),
        ("subject", "N/A", None, [("subject", "not_a_code")]),
        ("catalog_nbr", "\u202e042", "042", [("catalog_nbr", "control_chars")]),
        ("instructor", ["Staff", "Staff"], "Staff", [("instructor", "list")]),
        ("instructor", ["Staff", 42, None], "Staff", [("instructor", "list")]),
        ("instructor", ["Staff", "Ada L", "Ada L"], "Ada L", [("instructor", "list")]),
        ("instructor", [], None, [("instructor", "list"), ("instructor", "blank")]),
        ("instructor", "\u200b", None, [("instructor", "control_chars"), ("instructor", "blank")]),
        ("instructor", "Sta\u00adff\u200b", "Staff", [("instructor", "control_chars")]),
        ("title", "Chef \U0001f468\u200d\U0001f373", "Chef \U0001f468\u200d\U0001f373", []),
        ("catalog_nbr", 110, "110", [("catalog_nbr", "number")]),
        ("catalog_nbr", 110.0, "110", [("catalog_nbr", "number")]),
        ("title", "x" * 5000, "x" * 499 + "\u2026", [("title", "too_long")]),
        ("title", "Intro\x00 to\tC\n", "Intro to C", [("title", "control_chars")]),
        ("title", True, None, [("title", "bool")]),
        ("location", 170, "170", [("location", "number")]),
        ("location", "", None, [("location", "blank")]),
        ("meeting_times", ["MW 10:30-11:45", 7, None, {"a": 1}], "MW 10:30-11:45; 7", [("meeting_times", "list")]),
        ("meeting_times", [], None, [("meeting_times", "list"), ("meeting_times", "blank")]),
        ("title", None, None, []),
        (
            "location",
            "Tempe \u2013 COOR 170 \u05e2\u05d1\u05e8\u05d9\u05ea",
            "Tempe \u2013 COOR 170 \u05e2\u05d1\u05e8\u05d9\u05ea",
            [],
        ),
    ],
)
def test_describing_fields_never_fail_the_body(field: str, value: Any, expected: str | None, kinds: list[Any]) -> None:
    """An odd describing field is normalised or unknown and reported as drift; the seat counts still decide."""
    observation = ok(body(seats_available=3, **{field: value}))
    assert getattr(observation, field) == expected
    assert list(observation.drift) == kinds
    assert observation.seats_available == 3


def test_lone_surrogate_in_a_title_is_replaced_not_fatal() -> None:
    """A lone surrogate escape (orjson refuses it; JavaScript writes it) does not fail the body."""
    raw = orjson.dumps(body(seats_available=2)).replace(b'"Principles of Programming"', b'"Caf\\ud800 Intro"')
    observation = interpret(200, raw)
    assert observation.title == "Caf\ufffd Intro"
    assert observation.seats_available == 2


def test_strict_json_failures_a_browser_could_cause_are_read_leniently() -> None:
    """An invalid UTF-8 byte in a title and an integer too long for Python in an extra field do not fail."""
    raw = orjson.dumps(body(seats_available=2)).replace(b"Principles", b"Caf\xe9 Principles")
    raw = raw.replace(b'"subject":"CSE"', b'"serial":' + b"9" * 5000 + b',"subject":"CSE"')
    observation = interpret(200, raw)
    assert observation.title == "Caf\ufffd Principles of Programming"
    assert observation.seats_available == 2
    assert ("extra", "unknown_field") in observation.drift


def test_a_seat_count_too_long_for_python_is_invalid_not_a_crash() -> None:
    """A 5,000-digit seat count is not a count: InvalidScrape, never a ValueError from int()."""
    raw = orjson.dumps(body()).replace(b'"seats_available":0', b'"seats_available":' + b"7" * 5000)
    with pytest.raises(InvalidScrape, match="seats_available is not a seat count"):
        interpret(200, raw)


def test_unknown_fields_are_one_drift_label() -> None:
    """Fields nobody asked for are counted as drift under one fixed label, whatever their names."""
    observation = ok(body(campus="TEMPE", **{f"x{i}": i for i in range(50)}))
    assert observation.drift == (("extra", "unknown_field"),)


INVISIBLE = st.lists(st.sampled_from(["\u200b", "\ufeff", "\u00ad", "\u200e", "\u202e", "\u2066", "\x00", "\x7f"]))
INT64 = st.integers(-(2**63), 2**63 - 1)  # what orjson can write (the stub's encoder)
SPACE = st.text(alphabet=" \t\n\r\u00a0\u3000", max_size=3)


@st.composite
def staff_like(draw: st.DrawFn) -> Any:
    """ "Staff" with invisible characters inside and whitespace around, alone or in lists with non-names."""
    chars = list("Staff")
    for extra in draw(INVISIBLE):
        chars.insert(draw(st.integers(0, len(chars))), extra)
    word = draw(SPACE) + "".join(chars) + draw(SPACE)
    return draw(
        st.one_of(
            st.just(word),
            st.lists(st.one_of(st.just(word), st.none(), INT64, st.just(""), st.just("\u200b")), max_size=4),
            INT64,
            st.floats(),
            st.just(draw(SPACE) + "".join(draw(INVISIBLE))),
        )
    )


@given(instructor=staff_like())
def test_staff_in_disguise_is_never_an_instructor_assignment(instructor: Any) -> None:
    """From Staff, an instructor that is Staff, blank or not text once invisible characters go never emails."""
    from daemon.detect import PreviousState, detect

    observation = ok(body(instructor=instructor))
    previous = PreviousState("seatwatch", "Staff", 0, None)
    assert not detect(previous, observation).instructor_assigned
    assert observation.instructor in (None, "Staff")


def test_nan_seat_count_is_still_invalid() -> None:
    """The lenient JSON fallback does not let NaN or Infinity through as a seat count."""
    raw = orjson.dumps(body()).replace(b'"seats_available":0', b'"seats_available":NaN')
    with pytest.raises(InvalidScrape):
        interpret(200, raw + b" ")


def test_more_seats_than_capacity_is_valid() -> None:
    """seats_available above seats_capacity (a raised cap, over-enrolment) is a valid answer."""
    assert ok(body(seats_available=12, seats_capacity=10)).seats_available == 12


def test_all_problems_named() -> None:
    """Every problem with the seat counts of one body is named in the error."""
    with pytest.raises(InvalidScrape) as info:
        ok(body(seats_available=None, instructor="", seats_capacity=-3, non_reserved_seats="n/a"))
    message = str(info.value)
    assert "seats_available is missing" in message
    assert "seats_capacity is not a seat count" in message
    assert "non_reserved_seats is not a seat count" in message
    assert "instructor" not in message


@pytest.mark.parametrize(
    "content",
    [
        {"success": False, "data": data()},
        {"success": "true", "data": data()},
        {"success": 1, "data": data()},
        {"data": data()},
        {"success": True},
        {"success": True, "data": None},
        {"success": True, "data": [data()]},
        {"success": True, "data": "ok"},
        [body()],
        None,
        "success",
        42,
    ],
)
def test_wrong_shape_is_invalid(content: Any) -> None:
    """success not exactly true, no data object, or a body that is not an object: InvalidScrape."""
    with pytest.raises(InvalidScrape):
        ok(content)


@pytest.mark.parametrize("content", [b"", b"<html>502 Bad Gateway</html>", b"{", b"\xff\xfe", b'{"success": tru}'])
def test_non_json_200_is_invalid(content: bytes) -> None:
    """A 200 whose body is not JSON is InvalidScrape (a breaker failure)."""
    with pytest.raises(InvalidScrape) as info:
        interpret(200, content)
    assert info.value.breaker_failure


def test_oversize_body_rejected() -> None:
    """A body over the size limit is rejected before parsing, even if it would validate."""
    content = orjson.dumps(body()) + b" " * 1_000_001
    with pytest.raises(InvalidScrape, match="too large"):
        interpret(200, content)


def test_parse_observation_direct() -> None:
    """parse_observation validates an already-decoded body the same way."""
    assert parse_observation(body(seats_available=7)).seats_available == 7
    with pytest.raises(InvalidScrape):
        parse_observation(body(seats_available="7"))


# -- statuses ------------------------------------------------------------------------------------------------


def test_section_not_found() -> None:
    """500 'Section ... not found' is SectionNotFound: the job completes, not a breaker failure."""
    content = orjson.dumps({"success": False, "error": "Section 12345 not found for term 2261"})
    with pytest.raises(SectionNotFound) as info:
        interpret(500, content)
    assert not info.value.breaker_failure
    assert isinstance(info.value, ScrapeError)
    assert "Section 12345 not found for term 2261" in str(info.value)


def test_other_500_is_breaker_failure() -> None:
    """Any other 500 is a plain ScrapeError that counts against the breaker."""
    content = orjson.dumps({"success": False, "error": "browser crashed"})
    with pytest.raises(ScrapeError) as info:
        interpret(500, content)
    assert type(info.value) is ScrapeError
    assert info.value.breaker_failure


def test_400_rejected() -> None:
    """400 is ScrapeRejected: permanent, not a breaker failure."""
    with pytest.raises(ScrapeRejected) as info:
        interpret(400, orjson.dumps({"success": False, "error": "term must be 4 digits"}))
    assert not info.value.breaker_failure
    assert "term must be 4 digits" in str(info.value)


@pytest.mark.parametrize(("header", "expected_s"), [("120", 120.0), (None, 60.0), ("0", 1.0), ("86400", 3600.0)])
def test_429_rate_limited(header: str | None, expected_s: float) -> None:
    """429 is ScrapeRateLimited with Retry-After seconds (default 60, clamped to 1..3600), not a breaker failure."""
    with pytest.raises(ScrapeRateLimited) as info:
        interpret(429, b'{"error": "slow down"}', header)
    assert info.value.retry_after_s == expected_s
    assert not info.value.breaker_failure


@pytest.mark.parametrize("status", [401, 403, 404, 302, 502, 503, 504, 418])
def test_other_statuses_are_breaker_failures(status: int) -> None:
    """401/403, other 5xx and anything unexpected are plain ScrapeErrors counted by the breaker."""
    with pytest.raises(ScrapeError) as info:
        interpret(status, b"Bad Gateway")
    assert type(info.value) is ScrapeError
    assert info.value.breaker_failure
    assert str(status) in str(info.value)


def test_401_message_does_not_echo_body() -> None:
    """A refused token is reported without echoing what the scraper sent back."""
    with pytest.raises(ScrapeError) as info:
        interpret(401, b'{"error": "bad token Bearer abc123"}')
    assert "abc123" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected_s"),
    [
        (None, 60.0),
        ("", 60.0),
        ("abc", 60.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),
        ("nan", 60.0),
        (" 30 ", 30.0),
        ("1.5", 1.5),
        ("0", 1.0),
        ("-5", 1.0),
        ("99999", 3600.0),
        ("inf", 3600.0),
    ],
)
def test_parse_retry_after(value: str | None, expected_s: float) -> None:
    """Retry-After seconds are read, clamped to 1..3600; anything unreadable gives the 60 s default."""
    assert parse_retry_after(value) == expected_s


@given(value=st.one_of(st.none(), st.text(max_size=20)))
def test_parse_retry_after_always_sane(value: str | None) -> None:
    """Whatever the header says, the delay is a finite number of seconds in 1..3600."""
    seconds = parse_retry_after(value)
    assert math.isfinite(seconds)
    assert 1.0 <= seconds <= 3600.0


# -- property: anything that is not a valid observation is InvalidScrape --------------------------------------


def reference_valid(content: Any) -> bool:
    """SPEC §7.2's validation, written independently of daemon.upstream.scraper: only the seat counts decide."""
    if not isinstance(content, dict) or content.get("success") is not True:
        return False
    fields = content.get("data")
    if not isinstance(fields, dict):
        return False
    for name in ("seats_available", "seats_capacity", "non_reserved_seats"):
        value = fields.get(name)
        if value is None and name == "non_reserved_seats":
            continue
        if type(value) is not int or value < 0 or value > 100_000:
            return False
    return True


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
field_values = st.one_of(
    json_values,
    st.integers(min_value=-2, max_value=100_002),
    st.sampled_from(["", " ", "Staff", "CSE", "x" * 2001]),
)
FIELD_NAMES = list(data())


@st.composite
def mutated_bodies(draw: st.DrawFn) -> Any:
    """A valid body with some fields replaced, deleted, or its envelope changed."""
    content: dict[str, Any] = body()
    for name in draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=3, unique=True)):
        if draw(st.booleans()):
            content["data"][name] = draw(field_values)
        else:
            del content["data"][name]
    if draw(st.integers(0, 9)) == 0:
        content["success"] = draw(json_values)
    if draw(st.integers(0, 9)) == 0:
        content["data"] = draw(json_values)
    return content


def check(content: Any) -> None:
    raw = orjson.dumps(content)
    if reference_valid(content):
        observation = interpret(200, raw)
        assert observation.seats_available == content["data"]["seats_available"]
        instructor = content["data"].get("instructor")
        if isinstance(instructor, str) and instructor.strip().isprintable() and 0 < len(instructor.strip()) <= 400:
            assert observation.instructor == instructor.strip()
        for name in ("subject", "catalog_nbr", "title", "instructor", "location", "meeting_times"):
            value = getattr(observation, name)
            assert value is None or (value and value == value.strip() and "\x00" not in value)
    else:
        with pytest.raises(InvalidScrape):
            interpret(200, raw)


@given(content=json_values)
def test_arbitrary_json_is_observation_or_invalid(content: Any) -> None:
    """Any JSON body that is not a valid observation raises InvalidScrape and nothing else."""
    check(content)


@given(content=mutated_bodies())
def test_mutated_bodies_are_observation_or_invalid(content: Any) -> None:
    """A valid body with fields broken, removed or retyped validates exactly when the reference says so."""
    check(content)


@given(content=st.binary(max_size=64))
def test_arbitrary_bytes_are_observation_or_invalid(content: bytes) -> None:
    """Any bytes with status 200 give an Observation or InvalidScrape, never another exception."""
    try:
        result = interpret(200, content)
    except InvalidScrape:
        return
    assert isinstance(result, Observation)
