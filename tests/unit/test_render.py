"""Email rendering (SPEC §8): the unsubscribe token, subjects, headers, bodies, escaping, the .eml form."""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import hmac
import json
import re
from email.message import EmailMessage, Message
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.detect import INSTRUCTOR_ASSIGNED, SEAT_AVAILABLE, Observation
from daemon.upstream.files import to_eml
from daemon.upstream.render import Renderer, escape, unsubscribe_token

SITE = "https://pickmyclass.app"
KEY = "signing-key-for-tests"
USER = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
NOW_MS = 1_700_000_000_000
NINETY_DAYS_MS = 90 * 24 * 60 * 60 * 1000
# Computed outside Python: printf '%s' "$P" | openssl dgst -sha256 -hmac KEY, then base64url without padding.
GOLDEN_MS = 1_707_776_000_000
GOLDEN_TOKEN = (
    "N2M5ZTY2NzktNzQyNS00MGRlLTk0NGItZTA3ZmMxZjkwYWU3OjE3MDc3NzYwMDAwMDA6NmFlMTQyNGYxYjg4ZmE0ZDg3MDMzYThmMTQ2MjFi"
    "NjJmMzc4Y2M1MjdmODg4NTgyZmI3YmJkZjhjOTdmMGM4YQ"
)


def observation(**overrides: Any) -> Observation:
    fields: dict[str, Any] = {
        "subject": "CSE",
        "catalog_nbr": "110",
        "title": "Principles of Programming",
        "instructor": "Ada Lovelace",
        "seats_available": 5,
        "seats_capacity": 150,
        "non_reserved_seats": 3,
        "location": "Tempe - COOR 170",
        "meeting_times": "MWF 9:00 AM - 9:50 AM",
    }
    fields.update(overrides)
    return Observation(**fields)


def render(kind: str = SEAT_AVAILABLE, *, term: str = "2261", class_nbr: str = "12431", **obs: Any) -> dict[str, Any]:
    renderer = Renderer(site_url=SITE, from_email="PickMyClass <notify@pickmyclass.app>", signing_key=KEY)
    rendered = renderer.render(
        kind, term, class_nbr, observation(**obs), to="student@asu.edu", user_id=USER, now_ms=NOW_MS
    )
    message: dict[str, Any] = json.loads(rendered.payload)
    message["_token"] = rendered.token
    message["_subject"] = rendered.subject
    return message


def decode_token(token: str) -> str:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()


def expected_token(user_id: str, key: str, expires_at_ms: int) -> str:
    payload = f"{user_id}:{expires_at_ms}"
    mac = hmac.new(key.encode(), payload.encode(), hashlib.sha256).hexdigest()
    return base64.urlsafe_b64encode(f"{payload}:{mac}".encode()).decode().rstrip("=")


# -- token -------------------------------------------------------------------------------------------------


def test_token_golden_vector() -> None:
    """The token for known inputs equals the one computed with openssl (byte-compatible with the web app)."""
    assert unsubscribe_token(USER, KEY, GOLDEN_MS) == GOLDEN_TOKEN


def test_token_decodes_to_three_parts() -> None:
    """The token decodes to user id, expiry in ms and the hex HMAC-SHA256 of the first two."""
    token = unsubscribe_token(USER, KEY, GOLDEN_MS)
    assert "=" not in token
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    user_id, expires, mac = decode_token(token).split(":")
    assert user_id == USER
    assert expires == str(GOLDEN_MS)
    assert mac == hmac.new(KEY.encode(), f"{USER}:{GOLDEN_MS}".encode(), hashlib.sha256).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", mac)


@given(
    user_id=st.uuids().map(str),
    key=st.text(min_size=1, max_size=64),
    expires_at_ms=st.integers(min_value=0, max_value=10**14),
)
def test_token_matches_independent_computation(user_id: str, key: str, expires_at_ms: int) -> None:
    """For any user, key and expiry the token is base64url("{uid}:{ms}:{hex hmac}") without padding."""
    assert unsubscribe_token(user_id, key, expires_at_ms) == expected_token(user_id, key, expires_at_ms)


def test_token_depends_on_key() -> None:
    """Another key gives another signature."""
    assert unsubscribe_token(USER, "a", GOLDEN_MS) != unsubscribe_token(USER, "b", GOLDEN_MS)


# -- subjects and headers ------------------------------------------------------------------------------------


def test_seat_subject() -> None:
    """The seat email's subject is exactly as SPEC §8."""
    message = render(SEAT_AVAILABLE)
    assert message["subject"] == "🎉 Seat Available: CSE 110 (12431)"
    assert message["_subject"] == message["subject"]


def test_instructor_subject() -> None:
    """The instructor email's subject is exactly as SPEC §8."""
    assert render(INSTRUCTOR_ASSIGNED)["subject"] == "👨‍🏫 Instructor Assigned: CSE 110 (12431)"


def test_unknown_kind_refused() -> None:
    """A notification type other than the two is an error, not an email."""
    with pytest.raises(ValueError, match="unknown notification type"):
        render("waitlist_opened")


@pytest.mark.parametrize("kind", [SEAT_AVAILABLE, INSTRUCTOR_ASSIGNED])
def test_unsubscribe_headers(kind: str) -> None:
    """List-Unsubscribe points at {SITE}/api/unsubscribe?token=... and One-Click is declared."""
    message = render(kind)
    headers = message["headers"]
    assert headers["List-Unsubscribe"] == f"<{SITE}/api/unsubscribe?token={message['_token']}>"
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


@pytest.mark.parametrize("kind", [SEAT_AVAILABLE, INSTRUCTOR_ASSIGNED])
def test_token_expires_in_ninety_days(kind: str) -> None:
    """The header's token is signed for this user and expires now_ms + 90 days."""
    message = render(kind)
    token = parse_qs(urlsplit(message["headers"]["List-Unsubscribe"].strip("<>")).query)["token"][0]
    assert token == message["_token"]
    assert token == expected_token(USER, KEY, NOW_MS + NINETY_DAYS_MS)
    user_id, expires, _ = decode_token(token).split(":")
    assert (user_id, int(expires)) == (USER, NOW_MS + NINETY_DAYS_MS)


@pytest.mark.parametrize("kind", [SEAT_AVAILABLE, INSTRUCTOR_ASSIGNED])
def test_payload_shape(kind: str) -> None:
    """The payload is Resend's JSON object: from, one recipient, subject, html, text, headers."""
    message = render(kind)
    assert message["from"] == "PickMyClass <notify@pickmyclass.app>"
    assert message["to"] == ["student@asu.edu"]
    assert {"subject", "html", "text", "headers"} <= set(message)


# -- bodies ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [SEAT_AVAILABLE, INSTRUCTOR_ASSIGNED])
def test_button_url_digits_only(kind: str) -> None:
    """The catalog link is {SITE}/go/asu?classNbr=digits&term=digits, non-digits stripped."""
    message = render(kind, term="22-61<x>", class_nbr=" 124\"31' ")
    url = f"{SITE}/go/asu?classNbr=12431&term=2261"
    assert f"View the class: {url}" in message["text"]
    assert f'href="{escape(url)}"' in message["html"]
    assert "classNbr=12431&amp;term=2261" in message["html"]


def test_seat_count_uses_non_reserved() -> None:
    """'N open seats' uses non_reserved_seats when the scraper gave it, in HTML and text."""
    message = render(seats_available=9, non_reserved_seats=2)
    assert "2 open seats available" in message["text"]
    assert "2 open seats available" in message["html"]
    assert "9 open seats" not in message["text"]


def test_seat_count_singular() -> None:
    """One open seat reads '1 open seat', not 'seats'."""
    message = render(seats_available=1, non_reserved_seats=None)
    assert "1 open seat available" in message["text"]


def test_seat_count_falls_back_to_available() -> None:
    """Without non_reserved_seats, N is seats_available."""
    message = render(seats_available=4, non_reserved_seats=None)
    assert "4 open seats available" in message["text"]


def test_reserved_note_differs() -> None:
    """The reserved-seats note says whether reserved seats were accounted for."""
    known = render(non_reserved_seats=3)["text"]
    unknown = render(non_reserved_seats=None)["text"]
    assert "reserved seats" in known.lower() or "reserved for specific groups" in known
    assert "could not be verified" in unknown
    assert "could not be verified" not in known
    assert known.replace("3 open", "5 open") != unknown


def test_seat_details() -> None:
    """The seat email shows title, section, instructor, location and meeting times."""
    text = render()["text"]
    for line in (
        "CSE 110: Principles of Programming",
        "Section: 12431",
        "Instructor: Ada Lovelace",
        "Location: Tempe - COOR 170",
        "Meeting Times: MWF 9:00 AM - 9:50 AM",
    ):
        assert line in text


def test_optional_details_omitted() -> None:
    """Location, meeting times and title are left out when unknown, not shown as 'None'."""
    message = render(title=None, location=None, meeting_times=None)
    assert "None" not in message["text"]
    assert "None" not in message["html"]
    assert "Location:" not in message["text"]
    assert "Meeting Times:" not in message["text"]
    assert message["text"].startswith("CSE 110\n")


def test_instructor_email_seats() -> None:
    """The instructor email names the instructor and says 'X of Y seats available'."""
    message = render(INSTRUCTOR_ASSIGNED, instructor="Grace Hopper", seats_available=7, seats_capacity=120)
    assert "Instructor: Grace Hopper" in message["text"]
    assert "7 of 120 seats available" in message["text"]
    assert "7 of 120 seats available" in message["html"]
    assert "Grace Hopper" in message["html"]


def test_unsubscribe_link_in_bodies() -> None:
    """Both bodies carry the unsubscribe link."""
    message = render()
    url = f"{SITE}/api/unsubscribe?token={message['_token']}"
    assert f"Unsubscribe: {url}" in message["text"]
    assert f'href="{url}"' in message["html"]


HOSTILE: dict[str, Any] = {
    "title": "<script>alert('t')</script> & \"Friends\"",
    "instructor": "O'Brien <img src=x onerror=alert(1)>",
    "location": 'Hall "A" & <b>B</b>',
    "meeting_times": "<script>steal()</script>",
    "subject": "CSE&<",
    "catalog_nbr": "110'\"",
}


@pytest.mark.parametrize("kind", [SEAT_AVAILABLE, INSTRUCTOR_ASSIGNED])
def test_hostile_values_escaped_in_html(kind: str) -> None:
    """Scraped values are HTML-escaped (& < > " ' as &#039;): no raw markup from them in the HTML."""
    html = render(kind, **HOSTILE)["html"]
    assert "<script" not in html
    assert "<img" not in html
    assert "<b>B</b>" not in html
    assert "&lt;script&gt;alert(&#039;t&#039;)&lt;/script&gt; &amp; &quot;Friends&quot;" in html
    assert "O&#039;Brien &lt;img src=x onerror=alert(1)&gt;" in html
    assert "CSE&amp;&lt; 110&#039;&quot;" in html


@pytest.mark.parametrize("kind", [SEAT_AVAILABLE, INSTRUCTOR_ASSIGNED])
def test_hostile_values_readable_in_text(kind: str) -> None:
    """The plain-text part keeps scraped values as they are (it is not HTML)."""
    text = render(kind, **HOSTILE)["text"]
    assert "<script>alert('t')</script> & \"Friends\"" in text
    assert "O'Brien <img src=x onerror=alert(1)>" in text
    assert "&amp;" not in text
    assert "&#039;" not in text


@given(value=st.text(max_size=30))
def test_escape_round_trips(value: str) -> None:
    """escape leaves none of & < > " ' raw and unescapes back to the original."""
    escaped = escape(value)
    assert not set("<>\"'") & set(escaped)
    unescaped = (
        escaped.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", '"')
        .replace("&#039;", "'")
        .replace("&amp;", "&")
    )
    assert unescaped == value


# -- the .eml form -------------------------------------------------------------------------------------------


def parts(message: Message) -> dict[str, str]:
    found = {}
    for part in message.walk():
        if part.get_content_maintype() == "text":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            found[part.get_content_type()] = payload.decode(part.get_content_charset() or "utf-8")
    return found


@pytest.mark.parametrize("kind", [SEAT_AVAILABLE, INSTRUCTOR_ASSIGNED])
def test_eml_parses_with_alternatives(kind: str) -> None:
    """to_eml gives an RFC 5322 message with text/plain and text/html alternatives matching the payload."""
    payload = Renderer(SITE, "notify@pickmyclass.app", KEY).render(
        kind, "2261", "12431", observation(**HOSTILE), to="student@asu.edu", user_id=USER, now_ms=NOW_MS
    )
    data = json.loads(payload.payload)
    message = email.message_from_bytes(to_eml(payload.payload), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert message.get_content_type() == "multipart/alternative"
    assert message["To"] == "student@asu.edu"
    assert message["From"] == "notify@pickmyclass.app"
    assert message["Subject"] == data["subject"]
    assert message["Date"] is not None
    assert message["Message-ID"] is not None
    bodies = parts(message)
    assert bodies["text/plain"].rstrip("\n") == data["text"]
    assert bodies["text/html"].rstrip("\n") == data["html"]


def test_eml_list_unsubscribe_header_is_plain() -> None:
    """In the .eml, List-Unsubscribe is the literal <URL> (RFC 2369), not an RFC 2047 encoded word."""
    rendered = Renderer(SITE, "notify@pickmyclass.app", KEY).render(
        SEAT_AVAILABLE, "2261", "12431", observation(), to="student@asu.edu", user_id=USER, now_ms=NOW_MS
    )
    raw = email.message_from_bytes(to_eml(rendered.payload))  # compat32: the header as a mail client sees it
    value = re.sub(r"\r?\n[ \t]+", " ", str(raw["List-Unsubscribe"]))
    assert value == f"<{SITE}/api/unsubscribe?token={rendered.token}>"
    assert raw["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


# -- unknown describing fields (SPEC §7.2) -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", [SEAT_AVAILABLE, INSTRUCTOR_ASSIGNED])
def test_unknown_fields_are_left_out_never_shown_as_none(kind: str) -> None:
    """Unknown title, instructor, location and meeting times are left out: no "None", no empty label."""
    message = render(kind, title=None, instructor=None, location=None, meeting_times=None)
    for part in (message["text"], message["html"]):
        assert "None" not in part
        for label in ("Instructor", "Location", "Meeting Times"):
            assert f"{label}:" not in part
        assert "Section:" in part
    assert message["text"].splitlines()[0] == "CSE 110"


def test_unknown_course_code_still_reads() -> None:
    """With neither subject nor catalog number known (nor the watch's), the subject line still reads."""
    message = render(SEAT_AVAILABLE, subject=None, catalog_nbr=None)
    assert message["subject"] == "🎉 Seat Available: Class (12431)"
