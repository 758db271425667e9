"""The scraper client: ``POST {SCRAPER_URL}/scrape`` and strict validation of what comes back.

It knows nothing of the queue or the breaker; it maps wire outcomes onto the error tree, and each error
class says whether the breaker should count it (``ScrapeError.breaker_failure``):

* 200 whose seat counts are counts -> an ``Observation``; any other 200 -> ``InvalidScrape`` (a failure,
  never a state change: a missing seat count must not read as 0 and fake a fill). The describing fields
  (instructor, title, location, meeting times, subject, catalog number) never fail a body: odd values are
  normalised or read as unknown, and reported as drift (SPEC §7.2);
* 500 whose error says the section was not found -> ``SectionNotFound`` (the job completes);
* 400 -> ``ScrapeRejected`` (permanent); 429 -> ``ScrapeRateLimited`` with Retry-After;
* 401/403, other statuses, timeouts, connection errors -> ``ScrapeError``.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx
import orjson

from daemon.detect import STAFF, Drift, Observation
from daemon.errors import (
    InvalidScrape,
    ScrapeError,
    ScrapeRateLimited,
    ScrapeRejected,
    SectionNotFound,
)

MAX_BODY_BYTES: Final = 1_000_000
MAX_SEATS: Final = 100_000
DEFAULT_RETRY_AFTER_S: Final = 60.0
_MAX_INT_DIGITS: Final = 4000  # below Python's int-from-text limit (4300 digits)
MAX_RETRY_AFTER_S: Final = 3600.0
_NOT_FOUND = re.compile(r"not\s+found", re.IGNORECASE)


class Scraper:
    """The scraper service's client: one POST per section, answers validated into an ``Observation``."""

    def __init__(self, client: httpx.AsyncClient, base_url: str, token: str, timeout_s: float = 90) -> None:
        self.client = client
        self.url = scrape_url(base_url)
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"Scraper(url={self.url!r})"

    async def scrape(self, term: str, class_nbr: str) -> Observation:
        """Scrape one section; a validated ``Observation`` or a ``ScrapeError`` saying what went wrong."""
        body = orjson.dumps({"sectionNumber": class_nbr, "term": term})
        try:
            # httpx's timeout bounds each phase; this bounds the whole call, so a job cannot outlive it.
            with anyio.fail_after(self.timeout_s):
                async with self.client.stream(
                    "POST", self.url, content=body, headers=self._headers, timeout=self.timeout_s
                ) as response:
                    content = await _read_capped(response)
        except TimeoutError as exc:
            raise ScrapeError(f"scraper timed out after {self.timeout_s:g}s") from exc
        except httpx.TimeoutException as exc:
            raise ScrapeError(f"scraper timed out after {self.timeout_s:g}s") from exc
        except httpx.HTTPError as exc:
            raise ScrapeError(f"scraper unreachable: {exc.__class__.__name__}") from exc
        return interpret(response.status_code, content, response.headers.get("retry-after"))


async def _read_capped(response: httpx.Response) -> bytes:
    """The body, or InvalidScrape as soon as it grows past MAX_BODY_BYTES (it is never fully buffered)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise InvalidScrape(f"scraper body larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def interpret(status: int, content: bytes, retry_after: str | None = None) -> Observation:
    """Map one scraper response onto an observation or an error of the tree."""
    if len(content) > MAX_BODY_BYTES:
        raise InvalidScrape(f"scraper body too large ({len(content)} bytes)")
    message = _error_message(content)
    if status == 200:
        return parse_observation(_decode(content))
    if status == 500 and _NOT_FOUND.search(message):
        raise SectionNotFound(f"scraper: {message}")
    if status == 400:
        raise ScrapeRejected(f"scraper rejected the request (400): {message}")
    if status == 429:
        raise ScrapeRateLimited(f"scraper rate limit (429): {message}", parse_retry_after(retry_after))
    if status in (401, 403):
        raise ScrapeError(f"scraper refused our token ({status})")
    raise ScrapeError(f"scraper answered {status}: {message}")


def _decode(content: bytes) -> Any:
    """The JSON body of a 200, read as leniently as the seat decision allows.

    orjson is strict: it refuses a lone surrogate escape (``"\\ud800"``, which JavaScript's JSON.stringify
    writes for a broken character in a scraped title), an invalid UTF-8 byte, and integers past 64 bits.
    None of those touch a seat count, so the standard library gets a second go: bad bytes become U+FFFD,
    integers too long for Python's int parser stay text (not a count, so a seat count like that is still
    invalid), and only NaN and Infinity are refused outright.
    """
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(content.decode("utf-8", "replace"), parse_constant=_refuse_constant, parse_int=_int_or_text)
    except (ValueError, RecursionError) as exc:
        raise InvalidScrape("scraper answered 200 with a body that is not JSON") from exc


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _int_or_text(digits: str) -> int | str:
    return int(digits) if len(digits) <= _MAX_INT_DIGITS else digits


def _error_message(content: bytes) -> str:
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return content[:200].decode("utf-8", "replace")
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])[:500]
    return ""


def parse_retry_after(value: str | None) -> float:
    """Seconds from a Retry-After header (seconds form); a sane default otherwise."""
    if value is None:
        return DEFAULT_RETRY_AFTER_S
    try:
        seconds = float(value.strip())
    except ValueError:
        return DEFAULT_RETRY_AFTER_S
    if seconds != seconds:  # NaN
        return DEFAULT_RETRY_AFTER_S
    return min(MAX_RETRY_AFTER_S, max(1.0, seconds))


def parse_observation(body: Any) -> Observation:
    """Validate a 200 body; raise ``InvalidScrape`` only when the seat decision cannot be trusted.

    Two kinds of field (SPEC §7.2): the seat counts decide, and a count that is missing, not an integer,
    negative or absurd fails the whole observation (no state change, a breaker failure, a retry). Every
    other field only describes the section: it is normalised by ``describe`` and never fails anything;
    what was odd about it is reported in ``Observation.drift``.
    """
    if not isinstance(body, dict) or body.get("success") is not True:
        raise InvalidScrape("scraper body is not {success: true, ...}")
    data = body.get("data")
    if not isinstance(data, dict):
        raise InvalidScrape("scraper body has no data object")
    problems: list[str] = []

    def count(name: str, *, required: bool) -> int | None:
        value = data.get(name)
        if value is None:
            if required:
                problems.append(f"{name} is missing")
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEATS:
            problems.append(f"{name} is not a seat count")
            return None
        return value

    seats_available = count("seats_available", required=True)
    seats_capacity = count("seats_capacity", required=True)
    non_reserved_seats = count("non_reserved_seats", required=False)
    if problems or seats_available is None or seats_capacity is None:
        raise InvalidScrape("invalid scraper data: " + "; ".join(problems))

    drift: list[Drift] = []
    if not KNOWN_FIELDS.issuperset(data):
        drift.append(("extra", "unknown_field"))  # one fixed label: field names must not grow the metric

    def text(name: str) -> str | None:
        value, kinds = describe(name, data.get(name))
        drift.extend((name, kind) for kind in kinds)
        return value

    return Observation(
        subject=text("subject"),
        catalog_nbr=text("catalog_nbr"),
        title=text("title"),
        instructor=text("instructor"),
        seats_available=seats_available,
        seats_capacity=seats_capacity,
        non_reserved_seats=non_reserved_seats,
        location=text("location"),
        meeting_times=text("meeting_times"),
        drift=tuple(drift),
    )


# -- describing fields ---------------------------------------------------------------------------------------

# A describing field longer than its bound is cut there (with an ellipsis).
TEXT_LIMITS: Final[dict[str, int]] = {
    "subject": 32,
    "catalog_nbr": 32,
    "title": 500,
    "instructor": 500,
    "location": 500,
    "meeting_times": 1000,
}
# A subject or catalog number not of a course code's shape ("N/A", "TBA", a sentence) is unknown instead, so
# the email names the course as the student's watch does. The scraper sends 2-4 capitals and 3 digits.
CODE_SHAPES: Final = {
    "subject": re.compile(r"[A-Za-z]{1,8}"),
    "catalog_nbr": re.compile(r"[0-9A-Za-z]{1,8}"),
}
# Fields the scraper always sends: their absence is drift. title, location and meeting times may be absent.
EXPECTED_FIELDS: Final = frozenset({"subject", "catalog_nbr", "instructor"})
KNOWN_FIELDS: Final = frozenset(
    {*TEXT_LIMITS, "seats_available", "seats_capacity", "non_reserved_seats", "class_nbr", "term"}
)
_LIST_ITEMS: Final = 20
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_BREAKS: Final = re.compile(r"[\t\n\r]+")
_SURROGATE: Final = re.compile(r"[\ud800-\udfff]")
_JOINERS: Final = frozenset("\u200c\u200d")  # kept in text: emoji and some scripts need them


def describe(name: str, value: Any) -> tuple[str | None, list[str]]:
    """A describing field as the text a reader would prefer, or None for unknown; plus what was odd.

    Never raises. Strings are cleaned (control and invisible format characters dropped, line breaks made
    spaces, lone surrogates replaced, trimmed) and cut to the field's bound; numbers become their text; a list
    of scalars becomes its items joined with "; " (meeting times sent as a list); booleans, objects and
    blanks are unknown. The instructor is stricter, because a name is an edge (Staff -> a name emails): a
    number is not a name, invisible characters do not make "Staff" a name, and a list is its names.
    """
    if value is None:
        return None, ["missing"] if name in EXPECTED_FIELDS else []
    if isinstance(value, bool):
        return None, ["bool"]
    if name == "instructor" and isinstance(value, list):
        return _instructors(value)
    kinds: list[str] = []
    if isinstance(value, str):
        raw = value
    elif isinstance(value, int | float):
        if name == "instructor" or not math.isfinite(value):
            return None, ["number"]
        kinds.append("number")
        raw = _number_text(value)
    elif isinstance(value, list):
        kinds.append("list")
        raw = "; ".join(item for item in (_scalar_text(item, name) for item in value[:_LIST_ITEMS]) if item)
    else:
        return None, ["object"]
    text = _clean(raw, name)
    if text != raw.strip():
        kinds.append("control_chars")
    if not text:
        return None, [*kinds, "blank"]
    if name in CODE_SHAPES:
        if not CODE_SHAPES[name].fullmatch(text):
            return None, [*kinds, "not_a_code"]
        return text, kinds
    limit = TEXT_LIMITS[name]
    if len(text) > limit:
        kinds.append("too_long")
        text = text[: limit - 1].rstrip() + "\u2026"
    return text, kinds


def _instructors(items: list[Any]) -> tuple[str | None, list[str]]:
    """Several instructors: their names, once each, "; "-joined; Staff entries are not names."""
    names: list[str] = []
    staff = False
    for item in items[:_LIST_ITEMS]:
        name = _clean(item, "instructor") if isinstance(item, str) else ""
        if name == STAFF:
            staff = True
        elif name and name not in names:
            names.append(name)
    if names:
        text = "; ".join(names)
        limit = TEXT_LIMITS["instructor"]
        return (text if len(text) <= limit else text[: limit - 1].rstrip() + "\u2026"), ["list"]
    return (STAFF, ["list"]) if staff else (None, ["list", "blank"])


def _number_text(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _scalar_text(item: Any, name: str) -> str:
    if isinstance(item, str):
        return _clean(item, name)
    if isinstance(item, int | float) and not isinstance(item, bool) and math.isfinite(item):
        return _number_text(item)
    return ""


def _clean(text: str, name: str) -> str:
    """Printable, storable text: no control characters (Postgres refuses NUL), no lone surrogates, and no
    invisible format characters (zero-width spaces, soft hyphens, direction overrides) that could hide what
    a value says; joiners stay in free text, where emoji need them, but never in a name or a code."""
    text = _CONTROL.sub("", _BREAKS.sub(" ", _SURROGATE.sub("\ufffd", text)))
    if not text.isascii():
        keep = _JOINERS if name not in EXPECTED_FIELDS else frozenset()
        text = "".join(ch for ch in text if ch in keep or unicodedata.category(ch) != "Cf")
    return text.strip()


def scrape_url(base: str) -> str:
    """``{SCRAPER_URL}/scrape`` joined without a double slash (production had a trailing slash)."""
    parts = urlsplit(base)
    path = parts.path.rstrip("/") + "/scrape"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))
