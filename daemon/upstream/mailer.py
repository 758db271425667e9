"""Email rendering, the unsubscribe token, and the two transports (Resend's batch API, a folder of files).

Rendering happens once, in the transaction that claims the notification; the outbox stores the exact JSON
object posted to Resend for each email, so every retry sends identical bytes.

The unsubscribe token must stay byte-compatible with the web app that verifies it:
``base64url("{user_id}:{expires_at_ms}:{hex HMAC-SHA256(key, "{user_id}:{expires_at_ms}")}")``, no padding.
"""

from __future__ import annotations

import base64
import email.policy
import hashlib
import hmac
import logging
import os
import re
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio
import httpx
import orjson

from daemon.detect import INSTRUCTOR_ASSIGNED, SEAT_AVAILABLE, Observation
from daemon.errors import EmailError
from daemon.upstream.scraper import parse_retry_after

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

logger = logging.getLogger(__name__)

TOKEN_LIFETIME_MS: Final = 90 * 86400 * 1000
BATCH_LIMIT: Final = 100


# -- token ---------------------------------------------------------------------------------------------------


def unsubscribe_token(user_id: str, key: str, expires_at_ms: int) -> str:
    payload = f"{user_id}:{expires_at_ms}"
    signature = hmac.new(key.encode(), payload.encode(), hashlib.sha256).hexdigest()
    return base64.urlsafe_b64encode(f"{payload}:{signature}".encode()).decode().rstrip("=")


# -- rendering -----------------------------------------------------------------------------------------------

_ESCAPES: Final = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#039;"})


def escape(value: object) -> str:
    """HTML-escape ``& < > " '`` exactly as the original templates did."""
    return str(value).translate(_ESCAPES)


def digits(value: str) -> str:
    return re.sub(r"\D", "", value)


@dataclass(frozen=True)
class Rendered:
    """One email: the JSON object for Resend (as text) and its unsubscribe token."""

    payload: str
    token: str
    subject: str


@dataclass(frozen=True)
class Renderer:
    site_url: str
    from_email: str
    signing_key: str

    def __repr__(self) -> str:
        return f"Renderer(site_url={self.site_url!r}, from_email={self.from_email!r})"

    def render(
        self, kind: str, term: str, class_nbr: str, obs: Observation, *, to: str, user_id: str, now_ms: int
    ) -> Rendered:
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


# -- transports -----------------------------------------------------------------------------------------------


class EmailRetry(EmailError):
    """Try the same batch again later (429, 5xx, network, a key in use).

    ``ambiguous``: the batch may have been delivered (no answer, or a 5xx). ``pause_all``: the cause is
    not this batch (a rate limit, our API key), so no other batch should go before ``retry_after_s``.
    """

    def __init__(
        self, message: str, retry_after_s: float | None = None, *, ambiguous: bool, pause_all: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.ambiguous = ambiguous
        self.pause_all = pause_all


class EmailRejected(EmailError):
    """Resend refused the batch's content (400/422): nothing was sent, retrying the same bytes cannot help."""


@dataclass(frozen=True)
class OutgoingEmail:
    row_id: int
    payload: str


class Transport(Protocol):
    name: str

    async def send(self, key: str, emails: Sequence[OutgoingEmail]) -> list[str]:
        """Send one batch under idempotency ``key``; return one provider id per email, in order."""
        ...


class ResendTransport:
    """``POST {RESEND_API_URL}/emails/batch`` with the batch's stored bytes and its Idempotency-Key."""

    name = "resend"

    def __init__(self, client: httpx.AsyncClient, api_url: str, api_key: str, timeout_s: float = 30) -> None:
        self.client = client
        self.url = f"{api_url.rstrip('/')}/emails/batch"
        self._api_key = api_key
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"ResendTransport(url={self.url!r})"

    async def send(self, key: str, emails: Sequence[OutgoingEmail]) -> list[str]:
        body = b"[" + b",".join(e.payload.encode() for e in emails) + b"]"
        headers = {
            "Authorization": f"Bearer {self._api_key}",
            "Content-Type": "application/json",
            "Idempotency-Key": key,
        }
        try:
            response = await self.client.post(self.url, content=body, headers=headers, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            # A timeout or a reset may come after Resend accepted the batch: delivery is unknown.
            raise EmailRetry(f"Resend unreachable: {exc.__class__.__name__}", ambiguous=True) from exc
        status = response.status_code
        if 200 <= status < 300:
            return _provider_ids(response.content, len(emails))
        reason = _resend_error(response.content)
        retry_after = response.headers.get("retry-after")
        wait_s = parse_retry_after(retry_after) if retry_after else None
        if status == 429:
            raise EmailRetry(f"Resend answered 429: {reason}", wait_s or 60.0, ambiguous=False, pause_all=True)
        if status >= 500:
            raise EmailRetry(f"Resend answered {status}: {reason}", wait_s, ambiguous=True)
        if status == 409 and "concurrent" in reason:
            raise EmailRetry(f"Resend is still processing this key: {reason}", 5.0, ambiguous=True)
        if status in (401, 403):
            # Our key, not the emails: keep them and keep trying (status and health show the failure).
            raise EmailRetry(f"Resend refused the API key ({status}): {reason}", 300.0, ambiguous=False, pause_all=True)
        raise EmailRejected(f"Resend answered {status}: {reason}")


def _provider_ids(content: bytes, count: int) -> list[str]:
    try:
        body = orjson.loads(content)
        ids = [str(item["id"]) for item in body["data"]]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        logger.warning("Resend accepted a batch but its answer has no ids")
        return [""] * count
    return ids + [""] * (count - len(ids))


def _resend_error(content: bytes) -> str:
    try:
        body: Any = orjson.loads(content)
    except orjson.JSONDecodeError:
        return content[:200].decode("utf-8", "replace")
    if isinstance(body, dict):
        name, message = body.get("name", ""), body.get("message", "")
        return f"{name}: {message}".strip(": ")[:500]
    return ""


class FileTransport:
    """Writes each email as an .eml file (and its JSON) into a folder: for the demo and local runs."""

    name = "file"

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __repr__(self) -> str:
        return f"FileTransport(folder={str(self.folder)!r})"

    async def send(self, key: str, emails: Sequence[OutgoingEmail]) -> list[str]:
        return await anyio.to_thread.run_sync(self._write, emails)

    def _write(self, emails: Sequence[OutgoingEmail]) -> list[str]:
        self.folder.mkdir(parents=True, exist_ok=True)
        ids = []
        for outgoing in emails:
            name = f"{outgoing.row_id:08d}"
            _atomic_write(self.folder / f"{name}.eml", to_eml(outgoing.payload))
            ids.append(f"file:{name}")
        return ids


def to_eml(payload: str) -> bytes:
    """The Resend JSON object of one email as an RFC 5322 message with text and HTML parts."""
    data = orjson.loads(payload)
    # RFC 2369 wants List-Unsubscribe as a literal <URL>; the default 78-column policy would encode it.
    message = EmailMessage(policy=email.policy.default.clone(max_line_length=998))
    message["From"] = data["from"] or "seatwatch@localhost"
    message["To"] = ", ".join(data["to"])
    message["Subject"] = data["subject"]
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain="seatwatch.local")
    for name, value in data.get("headers", {}).items():
        message[name] = value
    message.set_content(data["text"])
    message.add_alternative(data["html"], subtype="html")
    return bytes(message)


def _atomic_write(path: Path, content: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)
