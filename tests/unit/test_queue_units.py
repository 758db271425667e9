"""The queue's pure parts: stream entries parsed into jobs, settled jobs as the cycle script takes them, backoff."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.backoff import retry_delay_s
from daemon.jobs import Done, Job, Malformed
from daemon.primitives.queue_wire import done_wire, parse_entry
from tests.support.entries import MALFORMED, VALID, fields

ENTRY = "1736960000000-0"
WIRE_FIELDS = ("entry_id", "id", "action", "delay_ms", "term", "class_nbr", "attempts", "enqueued_ms", "error", "raw")


# -- parse_entry ---------------------------------------------------------------------------------------------


def test_parse_valid_entry() -> None:
    """A well-formed entry becomes a Job with its counts as ints."""
    job = parse_entry(ENTRY, fields())
    assert job == Job(ENTRY, "2261-12431", "2261", "12431", 1, 1736960000000)
    assert isinstance(job, Job)
    assert job.attempt == 2


def test_parse_defaults_counts() -> None:
    """attempts and enqueued_ms default to 0 when absent."""
    job = parse_entry(ENTRY, fields(attempts="<absent>", enqueued_ms="<absent>"))
    assert isinstance(job, Job)
    assert (job.attempts, job.enqueued_ms, job.attempt) == (0, 0, 1)


@pytest.mark.parametrize(("entry_fields", "reason"), MALFORMED)
def test_parse_malformed(entry_fields: dict[str, str], reason: str) -> None:
    """Entries that are not jobs become Malformed with the reason, keeping the raw fields."""
    result = parse_entry(ENTRY, entry_fields)
    assert result == Malformed(ENTRY, entry_fields, reason)


@pytest.mark.parametrize("entry_fields", VALID)
def test_parse_valid_at_the_edges(entry_fields: dict[str, str]) -> None:
    """Entries at the edges of the range (1000 attempts, 2^53 ms, 16 digits) are jobs."""
    assert isinstance(parse_entry(ENTRY, entry_fields), Job)


@given(
    entry_fields=st.dictionaries(
        st.sampled_from(["id", "term", "class_nbr", "attempts", "enqueued_ms", "other"]), st.text(max_size=8)
    )
)
def test_parse_never_raises(entry_fields: dict[str, str]) -> None:
    """Any field mapping gives a Job or a Malformed, never an exception; a Job is self-consistent."""
    result = parse_entry(ENTRY, entry_fields)
    if isinstance(result, Job):
        assert result.id == f"{result.term}-{result.class_nbr}"
        assert result.term
        assert result.class_nbr
        assert result.attempts >= 0
    else:
        assert isinstance(result, Malformed)
        assert result.reason.startswith("malformed entry: ")
        assert result.fields == entry_fields


# -- Done.lua ------------------------------------------------------------------------------------------------


JOB = Job(ENTRY, "2261-12431", "2261", "12431", 1, 1736960000000)


@pytest.mark.parametrize(
    ("done", "expected"),
    [
        (Done(JOB, "ack"), [ENTRY, "2261-12431", "ack", 0, "2261", "12431", 0, 1736960000000, "", ""]),
        (
            Done(JOB, "retry", delay_s=12.5, error="scraper timed out", attempts=2),
            [ENTRY, "2261-12431", "retry", 12500, "2261", "12431", 2, 1736960000000, "scraper timed out", ""],
        ),
        (
            Done(JOB, "defer", delay_s=120, attempts=1),
            [ENTRY, "2261-12431", "defer", 120000, "2261", "12431", 1, 1736960000000, "", ""],
        ),
        (
            Done(JOB, "requeue", attempts=1),
            [ENTRY, "2261-12431", "requeue", 0, "2261", "12431", 1, 1736960000000, "", ""],
        ),
        (
            Done(JOB, "dead", error="400: bad term", attempts=2),
            [ENTRY, "2261-12431", "dead", 0, "2261", "12431", 2, 1736960000000, "400: bad term", ""],
        ),
    ],
)
def test_done_wire_for_jobs(done: Done, expected: list[object]) -> None:
    """A settled job is {entry_id, id, action, delay_ms, term, class_nbr, attempts, enqueued_ms, error, raw: ''}."""
    assert done_wire(done) == dict(zip(WIRE_FIELDS, expected, strict=True))


def test_done_wire_for_malformed() -> None:
    """A malformed entry is sent as poison with its raw fields as JSON, whatever action was asked."""
    raw = {"id": "x", "junk": "y"}
    done = Done(Malformed(ENTRY, raw, "malformed entry: no term or class_nbr"), "poison", error="no term")
    wire: dict[str, object] = dict(done_wire(done))
    assert [wire[f] for f in WIRE_FIELDS[:9]] == [ENTRY, "x", "poison", 0, "", "", 0, 0, "no term"]
    assert json.loads(str(wire["raw"])) == raw


def test_done_wire_for_malformed_without_id() -> None:
    """A malformed entry without an id field is sent with an empty id."""
    wire = done_wire(Done(Malformed(ENTRY, {}, "malformed entry: no term or class_nbr"), "poison"))
    assert wire["id"] == ""
    assert json.loads(wire["raw"]) == {}


@given(delay_s=st.floats(min_value=0, max_value=86400))
def test_done_delay_in_whole_ms(delay_s: float) -> None:
    """The delay goes to the script as a whole number of milliseconds, never more than asked."""
    delay_ms = done_wire(Done(JOB, "retry", delay_s=delay_s))["delay_ms"]
    assert isinstance(delay_ms, int)
    assert delay_ms <= delay_s * 1000 < delay_ms + 1.000001


def test_done_wire_is_json_serialisable() -> None:
    """What done_wire returns survives the JSON the script receives."""
    done = Done(JOB, "retry", delay_s=1.5, error='quote " and \\ backslash', attempts=2)
    assert json.loads(json.dumps(done_wire(done))) == done_wire(done)


# -- retry_delay_s -------------------------------------------------------------------------------------------


def test_retry_delay_grows_fourfold() -> None:
    """Without jitter (rand 0.5) the delay is base, 4x base, 16x base, ..."""
    delays = [retry_delay_s(attempt, 30, rand=lambda: 0.5) for attempt in (1, 2, 3, 4)]
    assert delays == pytest.approx([30, 120, 480, 1800])


def test_retry_delay_first_attempt_is_base() -> None:
    """Attempt 0 or 1 both use the base delay."""
    assert retry_delay_s(0, 10, rand=lambda: 0.5) == pytest.approx(10)
    assert retry_delay_s(1, 10, rand=lambda: 0.5) == pytest.approx(10)


def test_retry_delay_jitter_extremes() -> None:
    """rand 0 gives -20 %, rand close to 1 gives +20 %."""
    assert retry_delay_s(2, 30, rand=lambda: 0.0) == pytest.approx(96)
    assert retry_delay_s(2, 30, rand=lambda: 0.999999) == pytest.approx(144, rel=1e-5)


def test_retry_delay_capped() -> None:
    """Past the cap the un-jittered delay stays at the cap."""
    assert retry_delay_s(10, 30, cap_s=600, rand=lambda: 0.5) == pytest.approx(600)
    assert retry_delay_s(50, 30, rand=lambda: 0.5) == pytest.approx(1800)


@given(
    attempt=st.integers(min_value=0, max_value=60),
    base_s=st.floats(min_value=0.1, max_value=600),
    cap_s=st.floats(min_value=1, max_value=7200),
    rand=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_retry_delay_bounds(attempt: int, base_s: float, cap_s: float, rand: float) -> None:
    """The delay stays within +/-20 % of min(cap, base * 4^(attempt-1))."""
    nominal = min(cap_s, base_s * 4.0 ** max(0, attempt - 1))
    delay = retry_delay_s(attempt, base_s, cap_s=cap_s, rand=lambda: rand)
    assert nominal * 0.8 - 1e-9 <= delay <= nominal * 1.2 + 1e-9


@given(
    attempt=st.integers(min_value=1, max_value=30),
    base_s=st.floats(min_value=0.1, max_value=600),
    rand=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_retry_delay_never_shrinks(attempt: int, base_s: float, rand: float) -> None:
    """With the same jitter draw, a later attempt never waits less than an earlier one."""
    assert retry_delay_s(attempt + 1, base_s, rand=lambda: rand) >= retry_delay_s(attempt, base_s, rand=lambda: rand)


def test_parse_entry_takes_raw_bytes_and_never_raises_on_bad_utf8() -> None:
    """The reader hands raw bytes: valid ones decode to a job; invalid UTF-8 is Malformed, not a crash."""
    good = parse_entry(b"1-0", {k.encode(): v.encode() for k, v in fields().items()})
    assert isinstance(good, Job)
    assert good.id == "2261-12431"
    bad = parse_entry(b"1-1", {b"id": b"\xff\xfe", b"term": b"2261", b"class_nbr": b"12431"})
    assert isinstance(bad, Malformed)
    assert bad.reason == "malformed entry: id does not match term and class_nbr"
    assert bad.fields["id"] == "\\xff\\xfe"
    worse = parse_entry(b"1-2", {b"id": b"2261-\xff", b"term": b"2261", b"class_nbr": b"\xff"})
    assert isinstance(worse, Malformed)
    assert worse.reason == "malformed entry: term or class_nbr is not printable ASCII"
