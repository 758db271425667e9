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
import re
from typing import Any, Final

import anyio
import httpx
import orjson

from daemon.config import scrape_url
from daemon.detect import Drift, Observation
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
    """The JSON body of a 200. orjson refuses a lone surrogate escape (``"\\ud800"``), which a title scraped
    from a web page can carry and JavaScript's JSON.stringify writes; the standard library takes it, and
    ``describe`` replaces it, so one odd character in a title does not fail a seat decision."""
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(content, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidScrape("scraper answered 200 with a body that is not JSON") from exc


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


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

# A describing field longer than its bound is cut there (with an ellipsis). A subject or catalog number over
# its bound is not a course code at all, so it is unknown instead (the email then uses the watch's own).
TEXT_LIMITS: Final[dict[str, int]] = {
    "subject": 32,
    "catalog_nbr": 32,
    "title": 500,
    "instructor": 500,
    "location": 500,
    "meeting_times": 1000,
}
CODE_FIELDS: Final = frozenset({"subject", "catalog_nbr"})
# Fields the scraper always sends: their absence is drift. title, location and meeting times may be absent.
EXPECTED_FIELDS: Final = frozenset({"subject", "catalog_nbr", "instructor"})
_LIST_ITEMS: Final = 20
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_BREAKS: Final = re.compile(r"[\t\n\r]+")
_SURROGATE: Final = re.compile(r"[\ud800-\udfff]")


def describe(name: str, value: Any) -> tuple[str | None, list[str]]:
    """A describing field as the text a reader would prefer, or None for unknown; plus what was odd.

    Never raises. Strings are cleaned (control characters dropped, line breaks made spaces, lone surrogates
    replaced, trimmed) and cut to the field's bound; numbers become their text; a list of scalars becomes
    its items joined with "; " (meeting times sent as a list); booleans, objects and blanks are unknown.
    """
    if value is None:
        return None, ["missing"] if name in EXPECTED_FIELDS else []
    if isinstance(value, bool):
        return None, ["bool"]
    kinds: list[str] = []
    if isinstance(value, str):
        raw = value
    elif isinstance(value, int | float):
        if name == "instructor":  # a number is not somebody's name: it must not read as an assignment
            return None, ["number"]
        kinds.append("number")
        raw = _number_text(value)
    elif isinstance(value, list):
        kinds.append("list")
        raw = "; ".join(item for item in map(_scalar_text, value[:_LIST_ITEMS]) if item)
    else:
        return None, ["object"]
    text = _clean(raw)
    if text != raw.strip():
        kinds.append("control_chars")
    if not text:
        return None, [*kinds, "blank"]
    limit = TEXT_LIMITS[name]
    if len(text) > limit:
        kinds.append("too_long")
        if name in CODE_FIELDS:
            return None, kinds
        text = text[: limit - 1].rstrip() + "\u2026"
    return text, kinds


def _number_text(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _scalar_text(item: Any) -> str:
    if isinstance(item, str):
        return _clean(item)
    if isinstance(item, int | float) and not isinstance(item, bool):
        return _number_text(item)
    return ""


def _clean(text: str) -> str:
    """Printable, storable text: no control characters (Postgres refuses NUL), no lone surrogates."""
    return _CONTROL.sub("", _BREAKS.sub(" ", _SURROGATE.sub("\ufffd", text))).strip()
