"""Email rendering and the unsubscribe token; the transports are ``upstream.resend`` and ``upstream.files``.

Rendering happens once, in the transaction that claims the notification; the outbox stores the exact JSON
object posted to Resend for each email, so every retry sends identical bytes.

The unsubscribe token must stay byte-compatible with the web app that verifies it:
``base64url("{user_id}:{expires_at_ms}:{hex HMAC-SHA256(key, "{user_id}:{expires_at_ms}")}")``, no padding.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Final

import orjson

from daemon.detect import INSTRUCTOR_ASSIGNED, SEAT_AVAILABLE, Observation

TOKEN_LIFETIME_MS: Final = 90 * 86400 * 1000


# -- token ---------------------------------------------------------------------------------------------------


def unsubscribe_token(user_id: str, key: str, expires_at_ms: int) -> str:
    """The web app's unsubscribe token for ``user_id``, signed with ``key``, valid until ``expires_at_ms``."""
    payload = f"{user_id}:{expires_at_ms}"
    signature = hmac.new(key.encode(), payload.encode(), hashlib.sha256).hexdigest()
    return base64.urlsafe_b64encode(f"{payload}:{signature}".encode()).decode().rstrip("=")


# -- rendering -----------------------------------------------------------------------------------------------

_ESCAPES: Final = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#039;"})


def escape(value: object) -> str:
    """HTML-escape ``& < > " '`` exactly as the original templates did."""
    return str(value).translate(_ESCAPES)


def digits(value: str) -> str:
    """Only the digits of ``value`` (class and term numbers in links)."""
    return re.sub(r"\D", "", value)


@dataclass(frozen=True)
class Rendered:
    """One email: the JSON object for Resend (as text) and its unsubscribe token."""

    payload: str
    token: str
    subject: str


@dataclass(frozen=True)
class Renderer:
    """Renders the two notification emails, each with its own unsubscribe link."""

    site_url: str
    from_email: str
    signing_key: str

    def __repr__(self) -> str:
        return f"Renderer(site_url={self.site_url!r}, from_email={self.from_email!r})"

    def render(
        self, kind: str, term: str, class_nbr: str, obs: Observation, *, to: str, user_id: str, now_ms: int
    ) -> Rendered:
        """The ``kind`` email for ``to`` about the section: the payload Resend takes, signed link included."""
        token = unsubscribe_token(user_id, self.signing_key, now_ms + TOKEN_LIFETIME_MS)
        unsubscribe_url = f"{self.site_url}/api/unsubscribe?token={token}"
        catalog_url = f"{self.site_url}/go/asu?classNbr={digits(class_nbr)}&term={digits(term)}"
        course = _course(obs)
        if kind == SEAT_AVAILABLE:
            subject = f"🎉 Seat Available: {course} ({class_nbr})"
            html, text = _seat_body(obs, class_nbr, catalog_url, unsubscribe_url)
        elif kind == INSTRUCTOR_ASSIGNED:
            subject = f"👨‍🏫 Instructor Assigned: {course} ({class_nbr})"
            html, text = _instructor_body(obs, class_nbr, catalog_url, unsubscribe_url)
        else:
            raise ValueError(f"unknown notification type {kind!r}")
        message = {
            "from": self.from_email,
            "to": [to],
            "subject": subject,
            "html": html,
            "text": text,
            "headers": {
                "List-Unsubscribe": f"<{unsubscribe_url}>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            },
        }
        return Rendered(orjson.dumps(message).decode(), token, subject)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _details(obs: Observation, class_nbr: str) -> tuple[list[str], list[str]]:
    """The Section / Instructor / Location / Meeting Times rows, as HTML and as text."""
    rows = [("Section", class_nbr)]
    if obs.instructor:
        rows.append(("Instructor", obs.instructor))
    if obs.location:
        rows.append(("Location", obs.location))
    if obs.meeting_times:
        rows.append(("Meeting Times", obs.meeting_times))
    html = [f'<p style="margin:4px 0"><strong>{escape(k)}:</strong> {escape(v)}</p>' for k, v in rows]
    text = [f"{k}: {v}" for k, v in rows]
    return html, text


def _course(obs: Observation) -> str:
    """ "CSE 110"; the pipeline fills an unknown subject or catalog number from the watch, so a blank here
    is a watch without one too, and the line still reads."""
    return " ".join(part for part in (obs.subject, obs.catalog_nbr) if part) or "Class"


def _heading(obs: Observation) -> str:
    course = _course(obs)
    return f"{course}: {obs.title}" if obs.title else course


def _page(heading: str, lines: list[str], catalog_url: str, unsubscribe_url: str, why: str) -> str:
    body = "\n".join(lines)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{escape(heading)}</title></head>
<body style="font-family:Arial,Helvetica,sans-serif;color:#1f2937;max-width:600px;margin:0 auto;padding:24px">
<h1 style="font-size:20px;margin:0 0 16px">{escape(heading)}</h1>
{body}
<p style="margin:24px 0"><a href="{escape(catalog_url)}" style="background:#8c1d40;color:#ffffff;padding:12px 20px;border-radius:6px;text-decoration:none;display:inline-block">View Class on ASU Catalog</a></p>
<hr style="border:none;border-top:1px solid #e5e7eb;margin:24px 0">
<p style="font-size:12px;color:#6b7280">{escape(why)} <a href="{escape(unsubscribe_url)}" style="color:#6b7280">Unsubscribe</a></p>
</body></html>"""


_WHY: Final = "You are receiving this because you are watching this section on PickMyClass."


def _bodies(
    obs: Observation, class_nbr: str, catalog_url: str, unsubscribe_url: str, middle: list[tuple[str, str]]
) -> tuple[str, str]:
    """HTML and plain text of one email: heading, details, ``middle`` (each line as HTML and as text), link."""
    heading = _heading(obs)
    details_html, details_text = _details(obs, class_nbr)
    html = _page(heading, [*details_html, *(h for h, _ in middle)], catalog_url, unsubscribe_url, _WHY)
    text = "\n".join(
        [
            heading,
            "",
            *details_text,
            "",
            *(t for _, t in middle),
            "",
            f"View the class: {catalog_url}",
            "",
            _WHY,
            f"Unsubscribe: {unsubscribe_url}",
        ]
    )
    return html, text


def _seat_body(obs: Observation, class_nbr: str, catalog_url: str, unsubscribe_url: str) -> tuple[str, str]:
    seats = _plural(obs.open_seats, "open seat")
    if obs.non_reserved_seats is not None:
        note = "These are general-enrollment seats: seats reserved for specific groups are not counted."
    else:
        note = "Reserved seats could not be verified: some of these seats may be reserved for specific groups."
    return _bodies(
        obs,
        class_nbr,
        catalog_url,
        unsubscribe_url,
        [
            (
                f'<p style="font-size:18px;color:#047857;margin:16px 0"><strong>{escape(seats)} available</strong></p>',
                f"{seats} available",
            ),
            (f'<p style="font-size:13px;color:#4b5563">{escape(note)}</p>', note),
        ],
    )


def _instructor_body(obs: Observation, class_nbr: str, catalog_url: str, unsubscribe_url: str) -> tuple[str, str]:
    seats = f"{obs.seats_available} of {obs.seats_capacity} seats available"
    colour = "#047857" if obs.seats_available > 0 else "#b91c1c"
    line = f'<p style="font-size:16px;color:{colour};margin:16px 0"><strong>{escape(seats)}</strong></p>'
    return _bodies(obs, class_nbr, catalog_url, unsubscribe_url, [(line, seats)])
