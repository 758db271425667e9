"""Odd scraper answers through the real pipeline on real Postgres (SPEC §7.2, issue 9).

Only the seat counts decide. An answer whose counts are counts records the state and queues exactly the
owed emails, however odd its describing fields; an answer whose counts cannot be trusted changes nothing,
counts a breaker failure and is retried.
"""

from __future__ import annotations

import html
import itertools
import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.checks.pipeline import Pipeline, Ticket
from daemon.errors import RetryableJobError
from daemon.jobs import Job
from daemon.runtime.metrics import Metrics
from daemon.upstream.render import Renderer
from daemon.upstream.scraper import Scraper
from tests.support.procs import SIGNING_KEY
from tests.support.seed import add_user, add_watch, clear
from tests.support.stubs import SCRAPER_TOKEN, Reply, ScraperStub, section_data

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import asyncpg

TERM = "2261"
SITE = "https://pickmyclass.test"
WATCH_COURSE = ("WCH", "999")  # what the students typed: distinct from the scraper's "CSE 240"
ABSENT = object()  # a field left out of the answer altogether
_numbers = itertools.count(30000)


@dataclass(frozen=True)
class Case:
    """One odd answer: ``data`` overrides the clean answer's fields (ABSENT deletes one), or ``raw`` is the body."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    raw: bytes | None = None
    course: str = "CSE 240"  # the course as the emails must name it
    instructor_email: bool = False  # whether the answer carries a real name (previous instructor was Staff)


def body_of(case: Case, class_nbr: str) -> bytes:
    if case.raw is not None:
        return case.raw
    data: dict[str, Any] = {**section_data(seats=3), "class_nbr": class_nbr}
    for name, value in case.data.items():
        if value is ABSENT:
            data.pop(name, None)
        else:
            data[name] = value
    return orjson.dumps({"success": True, "data": data})


DECIDABLE = [
    Case("instructor empty (the issue's report)", {"instructor": ""}),
    Case("instructor blank", {"instructor": "   \t "}),
    Case("instructor absent", {"instructor": ABSENT}),
    Case("instructor null", {"instructor": None}),
    Case("instructor a number", {"instructor": 42}),
    Case("instructor an object", {"instructor": {"name": "Ada"}}),
    Case("instructor a list of names", {"instructor": ["Ada Lovelace", "Grace Hopper"]}, instructor_email=True),
    Case("instructor Staff with a NUL", {"instructor": "Staff\u0000"}),
    Case("instructor across lines", {"instructor": "Ada\nLovelace"}, instructor_email=True),
    Case("instructor non-ASCII", {"instructor": "José Núñez-Ölçer"}, instructor_email=True),
    Case("instructor 5,000 characters", {"instructor": "A" * 5000}, instructor_email=True),
    Case("title empty", {"title": ""}),
    Case("title 5,000 characters", {"title": "Very long title " * 320}),
    Case("title unicode and emoji", {"title": "Introducción a la programación 🎉 — 入门"}),
    Case("title right-to-left", {"title": "مقدمة في البرمجة \u202eevil\u202c"}),
    Case("title with HTML", {"title": "<script>alert('x')</script> & \"Co\""}),
    Case("title null", {"title": None}),
    Case("title absent", {"title": ABSENT}),
    Case("title a number", {"title": 12345}),
    Case("title a list", {"title": ["Part 1", "Part 2"]}),
    Case("title an object", {"title": {"en": "Intro"}}),
    Case("location a number", {"location": 170}),
    Case("location empty", {"location": ""}),
    Case("location true", {"location": True}),
    Case("location 5,000 characters", {"location": "Tempe " * 900}),
    Case("meeting times a list", {"meeting_times": ["MW 10:30AM-11:45AM", "F 9:00AM-9:50AM"]}),
    Case("meeting times an object", {"meeting_times": {"days": "MW", "start": "10:30"}}),
    Case("meeting times nested lists", {"meeting_times": [["MW"], [{"x": 1}], None]}),
    Case("subject absent", {"subject": ABSENT}, course="WCH 240"),
    Case("subject empty", {"subject": ""}, course="WCH 240"),
    Case("subject 100 characters", {"subject": "C" * 100}, course="WCH 240"),
    Case("subject a number", {"subject": 123}, course="WCH 240"),
    Case("subject N/A", {"subject": "N/A"}, course="WCH 240"),
    Case("catalog number with a direction override", {"catalog_nbr": "\u202e240"}),
    Case("instructor Staff twice", {"instructor": ["Staff", "Staff"]}),
    Case("instructor Staff and a number", {"instructor": ["Staff", 42]}),
    Case("instructor a zero-width space", {"instructor": "\u200b"}),
    Case("instructor Staff with invisible characters", {"instructor": "Sta\u00adff\u200b\ufeff"}),
    Case(
        "location 1e400 (infinite as a float)",
        raw=b'{"success":true,"data":{"subject":"CSE","catalog_nbr":"240","instructor":"Staff","location":1e400,'
        b'"seats_available":3,"seats_capacity":30}}',
    ),
    Case(
        "invalid UTF-8 byte in the title",
        raw=b'{"success":true,"data":{"subject":"CSE","catalog_nbr":"240","title":"Caf\xe9","instructor":"Staff",'
        b'"seats_available":3,"seats_capacity":30}}',
    ),
    Case(
        "an integer too long for Python in an extra field",
        raw=b'{"success":true,"data":{"subject":"CSE","catalog_nbr":"240","serial":' + b"9" * 5000 + b","
        b'"instructor":"Staff","seats_available":3,"seats_capacity":30}}',
    ),
    Case("catalog number null", {"catalog_nbr": None}, course="CSE 999"),
    Case("catalog number a number", {"catalog_nbr": 240}),
    Case("catalog number a list", {"catalog_nbr": ["240"]}),
    Case("subject and catalog number both gone", {"subject": None, "catalog_nbr": ""}, course="WCH 999"),
    Case(
        "every describing field absent",
        {k: ABSENT for k in ("subject", "catalog_nbr", "title", "instructor", "location", "meeting_times")},
        course="WCH 999",
    ),
    Case("unknown extra fields", {"campus": {"nested": [1, {"a": None}]}, "notes": "x" * 10000, "seats_waitlist": 4}),
    Case("more seats than capacity", {"seats_available": 12, "seats_capacity": 10}),
    Case("zero capacity yet seats", {"seats_available": 2, "seats_capacity": 0}),
    Case(
        "lone surrogate in the title",
        raw=b'{"success":true,"data":{"subject":"CSE","catalog_nbr":"240","title":"Caf\\ud800","instructor":"Staff",'
        b'"seats_available":3,"seats_capacity":30}}',
    ),
]

UNDECIDABLE = [
    Case("seats_available absent", {"seats_available": ABSENT}),
    Case("seats_available null", {"seats_available": None}),
    Case("seats_available a string", {"seats_available": "3"}),
    Case("seats_available a whole float", {"seats_available": 3.0}),
    Case("seats_available negative", {"seats_available": -1}),
    Case("seats_available absurd", {"seats_available": 10**9}),
    Case(
        "seats_available too long for Python",
        raw=b'{"success":true,"data":{"seats_available":' + b"3" * 5000 + b',"seats_capacity":30}}',
    ),
    Case("seats_available a bool", {"seats_available": True}),
    Case("seats_capacity absent", {"seats_capacity": ABSENT}),
    Case("non_reserved_seats not a count", {"non_reserved_seats": "n/a"}),
    Case("success false", raw=b'{"success":false,"data":{"seats_available":3,"seats_capacity":30}}'),
    Case("no data object", raw=b'{"success":true}'),
    Case("not JSON", raw=b"<html>502 Bad Gateway</html>"),
]


class World:
    """A pipeline wired to the loopback scraper and real Postgres, and a section with watchers."""

    def __init__(self, pool: asyncpg.Pool, http: httpx.AsyncClient, scraper: ScraperStub) -> None:
        self.pool = pool
        self.scraper = scraper
        self.metrics = Metrics()
        self.pipeline = Pipeline(
            pool,
            Scraper(http, scraper.url, SCRAPER_TOKEN, timeout_s=5),
            Renderer(SITE, "notifications@pickmyclass.test", SIGNING_KEY),
            self.metrics,
        )

    async def section(self) -> str:
        """A new section with two eligible watchers and one disabled one, observed once: full, Staff."""
        class_nbr = str(next(_numbers))
        for email, flags in [("a@example.edu", {}), ("b@example.edu", {}), ("off@example.edu", {"is_disabled": True})]:
            user = await add_user(self.pool, f"{class_nbr}.{email}", **flags)
            await add_watch(self.pool, user, TERM, class_nbr, subject=WATCH_COURSE[0], catalog_nbr=WATCH_COURSE[1])
        await self.check(class_nbr, orjson.dumps({"success": True, "data": section_data(seats=0)}))
        return class_nbr

    async def check(self, class_nbr: str, body: bytes) -> Ticket:
        self.scraper.script(TERM, class_nbr, Reply(200, body))
        ticket = Ticket(Job("1-0", f"{TERM}-{class_nbr}", TERM, class_nbr, 0, 0))
        await self.pipeline(ticket)
        return ticket

    async def state(self, class_nbr: str) -> asyncpg.Record:
        row = await self.pool.fetchrow(
            "SELECT s.seats_available, s.instructor_name, s.subject, s.catalog_nbr, c.seats_available AS mirror "
            "FROM seatwatch_section_states s JOIN class_states c USING (class_nbr) "
            "WHERE s.term = $1 AND s.class_nbr = $2",
            TERM,
            class_nbr,
        )
        assert row is not None
        return row

    async def owed(self, class_nbr: str) -> list[asyncpg.Record]:
        return list(
            await self.pool.fetch(
                "SELECT notification_type, payload FROM seatwatch_outbox WHERE class_nbr = $1 ORDER BY id", class_nbr
            )
        )


@pytest.fixture
async def world(pool: asyncpg.Pool, scraper: ScraperStub) -> AsyncIterator[World]:
    await clear(pool)
    async with httpx.AsyncClient() as http:
        yield World(pool, http, scraper)


@pytest.mark.parametrize("case", DECIDABLE, ids=lambda c: c.name)
async def test_decidable_answer_records_state_and_queues_the_owed_emails(world: World, case: Case) -> None:
    """An answer with trusted seat counts records the state and owes one email per eligible watcher and edge."""
    class_nbr = await world.section()
    ticket = await world.check(class_nbr, body_of(case, class_nbr))
    assert ticket.breaker == "s"

    state = await world.state(class_nbr)
    seats = orjson.loads(body_of(case, class_nbr))["data"]["seats_available"] if case.raw is None else 3
    assert (state["seats_available"], state["mirror"]) == (seats, seats)
    assert state["subject"]
    assert state["catalog_nbr"]

    owed = await world.owed(class_nbr)
    types = sorted(r["notification_type"] for r in owed)
    expected = ["seat_available"] * 2 + (["instructor_assigned"] * 2 if case.instructor_email else [])
    assert types == sorted(expected)
    for row in owed:
        assert_valid_email(orjson.loads(row["payload"]), row["notification_type"], case.course, class_nbr)

    # A second identical answer owes nothing more: the claims hold.
    await world.check(class_nbr, body_of(case, class_nbr))
    assert len(await world.owed(class_nbr)) == len(owed)


@pytest.mark.parametrize("case", UNDECIDABLE, ids=lambda c: c.name)
async def test_undecidable_answer_changes_nothing_and_is_retried(world: World, case: Case) -> None:
    """An answer whose seat counts cannot be trusted is a breaker failure and a retry; nothing is recorded."""
    class_nbr = await world.section()
    before = await world.state(class_nbr)
    ticket = Ticket(Job("1-0", f"{TERM}-{class_nbr}", TERM, class_nbr, 0, 0))
    world.scraper.script(TERM, class_nbr, Reply(200, body_of(case, class_nbr)))
    with pytest.raises(RetryableJobError):
        await world.pipeline(ticket)
    assert ticket.breaker == "f"
    assert await world.state(class_nbr) == before
    assert await world.owed(class_nbr) == []


async def test_staff_blank_then_a_name_still_notifies_the_assignment(world: World) -> None:
    """A blank instructor between Staff and a name keeps Staff as the known instructor: the assignment emails."""
    class_nbr = await world.section()
    await world.check(class_nbr, orjson.dumps({"success": True, "data": section_data(seats=0, instructor="")}))
    assert (await world.state(class_nbr))["instructor_name"] == "Staff"
    await world.check(class_nbr, orjson.dumps({"success": True, "data": section_data(seats=0, instructor="Ada L")}))
    types = [r["notification_type"] for r in await world.owed(class_nbr)]
    assert types == ["instructor_assigned", "instructor_assigned"]


async def test_drift_is_counted_by_field_and_kind_and_warned_once_an_hour(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Odd fields show in /metrics by field and kind; one warning per field and kind names an example section."""
    first, second = await world.section(), await world.section()
    for class_nbr in (first, second):
        odd = section_data(seats=0, instructor="")
        await world.check(class_nbr, orjson.dumps({"success": True, "data": odd}))
    exposition = world.metrics.exposition().decode()
    assert 'seatwatch_scraper_drift_total{field="instructor",kind="blank"} 2.0' in exposition
    warnings = [r.getMessage() for r in caplog.records if "scraper drift" in r.getMessage()]
    assert warnings == [
        f"scraper drift: instructor is blank (e.g. section {TERM}-{first}); the seat decision "
        "went ahead (this warning repeats at most hourly per field and kind)"
    ]


# -- property: the describing fields never change the seat decision or the claims ---------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
DESCRIBING = ("subject", "catalog_nbr", "title", "location", "meeting_times")
# The instructor is an edge of its own (Staff -> a name): generated values stay away from real names here, so
# the decision must come out exactly as with a clean "Staff" (a name is covered by the corpus above).
NOT_A_NAME = st.one_of(
    st.none(),
    st.integers(),
    st.sampled_from(["", " ", "Staff", "\u200bStaff", "Sta\u00adff", "\ufeff", " Staff\n"]),
    st.lists(st.sampled_from(["Staff", "", "\u200b"]) | st.integers() | st.none(), max_size=3),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    odd=st.fixed_dictionaries({}, optional={**{name: json_values for name in DESCRIBING}, "instructor": NOT_A_NAME}),
    seats=st.sampled_from([(0, 3), (0, 0), (4, 0), (2, 5)]),
)
async def test_describing_fields_never_change_the_decision(
    world: World, odd: dict[str, Any], seats: tuple[int, int]
) -> None:
    """Arbitrary JSON in the describing fields gives the same state and claims as clean fields would."""
    results = []
    for fields in ({}, odd):
        class_nbr = await world.section()
        for count in seats:
            data = {**section_data(seats=count), **fields}
            # The standard library writes integers past 64 bits too, as a scraper may (orjson would refuse).
            await world.check(class_nbr, json.dumps({"success": True, "data": data}).encode())
        state = await world.state(class_nbr)
        owed = [r["notification_type"] for r in await world.owed(class_nbr)]
        claims = await world.pool.fetchval(
            "SELECT count(*) FROM notifications_sent n JOIN class_watches w ON w.id = n.class_watch_id "
            "WHERE w.class_nbr = $1",
            class_nbr,
        )
        results.append((state["seats_available"], state["instructor_name"], owed, claims))
    assert results[0] == results[1]


# -- what a valid rendered email is ------------------------------------------------------------------------

SUBJECTS = {
    "seat_available": "🎉 Seat Available: {course} ({class_nbr})",
    "instructor_assigned": "👨‍🏫 Instructor Assigned: {course} ({class_nbr})",
}
EMPTY_LABEL = re.compile(r"(Section|Instructor|Location|Meeting Times):\s*(</p>|\n|$)")


class _Strict(HTMLParser):
    """Collects the text of a document and fails on tags a rendered value could have smuggled in."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def assert_valid_email(message: dict[str, Any], kind: str, course: str, class_nbr: str) -> None:
    assert message["subject"] == SUBJECTS[kind].format(course=course, class_nbr=class_nbr)
    assert len(message["to"]) == 1
    text, page = message["text"], message["html"]
    assert text.strip()
    assert page.strip()
    for shown in (text, page):
        assert "None" not in shown
        assert not EMPTY_LABEL.search(shown), shown
    parser = _Strict()
    parser.feed(page)
    parser.close()
    assert parser.tags <= {"html", "head", "meta", "title", "body", "h1", "p", "strong", "a", "hr"}
    assert "<script" not in page
    assert html.unescape(page).count("<script>") == page.count("&lt;script&gt;")
    headers = message["headers"]
    assert headers["List-Unsubscribe"].startswith(f"<{SITE}/api/unsubscribe?token=")
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
